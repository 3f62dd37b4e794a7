"""What the adaptive mode measures once on the user's data to round better than to the nearest level.

Two statistics of each layer's input, both from the search half of the data (the confirm
half stays unseen by every choice), both through the converter's Evaluator:

- its mean per channel, for bias correction (``bias_correction.py``);
- its second-moment matrix, for error feedback (``error_feedback.py``).

Each process (the main one and every worker) measures them once per conversion, as an
attribute of its session (``session.py``), with one onnxruntime thread, so every process holds
the same bits and rounds the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .bias_correction import BiasCorrector
from .bias_correction import none as no_correction
from .error_feedback import ErrorFeedback
from .intake import Pool
from .uniform import quantize_pool


@dataclass
class Calibration:
    corrector: BiasCorrector
    feedback: ErrorFeedback | None
    skipped: dict[str, str] = field(default_factory=dict)  # statistic -> why it could not be measured

    def levels(self, pool: Pool, steps: np.ndarray, feedback: bool = True) -> list[np.ndarray]:
        """Every site's levels at ``steps``: nearest rounding, error feedback where it serves
        (unless ``feedback`` is False: a cheaper size estimate), then the corrected biases."""
        levels = quantize_pool(pool, steps)
        if feedback and self.feedback is not None:
            levels = self.feedback.levels(pool, steps, levels)
        return self.corrector.correct_levels(pool, steps, levels)

    def summary(self) -> dict:
        out = {"bias_correction": self.corrector.summary(),
               "error_feedback": self.feedback.summary() if self.feedback is not None else {"layers": 0, "zeroed_weights": 0}}
        for name, why in self.skipped.items():
            out[name] = {**out[name], "skipped": why}
        return out


NONE = Calibration(no_correction(), None)


def measure(model, pool: Pool, data, options) -> Calibration:
    """Both statistics of ``model``'s layers on ``data`` (the search half), as ``options`` ask.

    The probe outputs are extra nodes onnxruntime must accept; if it does not, the conversion
    goes on with nearest rounding for that statistic rather than failing, and says why."""
    if not (options.bias_correction or options.error_feedback):
        return NONE
    skipped: dict[str, str] = {}

    def measured(name: str, measure_one, fallback):
        try:
            return measure_one(model, pool, data)
        except Exception as exc:  # onnxruntime's Fail / InvalidGraph / RuntimeException types
            skipped[name] = " ".join(str(exc).split())[:200]
            return fallback

    corrector = measured("bias_correction", BiasCorrector.measure, no_correction()) if options.bias_correction \
        else no_correction()
    feedback = measured("error_feedback", ErrorFeedback.measure, None) if options.error_feedback else None
    return Calibration(corrector, feedback, skipped)


__all__ = ["Calibration", "NONE", "measure"]
