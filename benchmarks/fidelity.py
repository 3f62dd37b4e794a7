"""How closely a candidate model behaves like the fp32 original, measured by running both in onnxruntime.

Per model, one primary figure (the one the 99% headline rule reads) and a few secondary ones:
  digits  accuracy against the labels (headline rule: at most 1 point below the fp32 model)
  magika, cls  top-1 agreement with the fp32 model
  rec  per-time-step argmax agreement; whole decoded string match as a secondary figure
  det  IoU of the probability masks thresholded at 0.3 (rapidocr's DB threshold), pooled over pages
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import config as C
from .inputs import load_labels, load_model_and_inputs

METRIC_NAMES = {
    "digits": "accuracy",
    "magika": "top-1 agreement",
    "cls": "top-1 agreement",
    "rec": "per-step agreement",
    "det": "mask IoU @0.3",
}
# samples per run on the test split: small batches are faster (cache) and give the same bits.
# Seconds for the test split at 256 / 32 / 8 / 2 samples: magika 3.81 / 2.61 / 2.56 / 2.38,
# cls 0.65 / 0.37 / 0.29 / 0.48, rec 5.72 / 4.02 / 3.77 / 3.21, det 3.47 / 2.79 / 2.24 / 2.04
# (docs/decisions/0021-batch-size.md).
_BATCH = {"det": 2}
DEFAULT_BATCH = 8


@dataclass
class Fidelity:
    """The primary figure and secondary ones (name -> value), all in [0, 1]."""

    value: float
    metric: str
    extra: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"{self.metric} {100 * self.value:.2f}%"]
        parts += [f"{k} {100 * v:.2f}%" for k, v in self.extra.items()]
        return ", ".join(parts)


def session(model: str | os.PathLike | bytes, threads: int = 0):
    """A CPU onnxruntime session with default graph optimisations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(model: str | os.PathLike | bytes, inputs: dict[str, np.ndarray], name: str = "") -> np.ndarray:
    """The first output over all samples, run in batches."""
    sess = session(model)
    n = len(next(iter(inputs.values())))
    step = _BATCH.get(name, DEFAULT_BATCH)
    out = [sess.run(None, {k: v[i:i + step] for k, v in inputs.items()})[0] for i in range(0, n, step)]
    return np.concatenate(out)


class Evaluator:
    """Holds one model's test inputs and its fp32 outputs; scores candidates against them."""

    def __init__(self, name: str, max_samples: int | None = None) -> None:
        self.name = name
        self.onnx_path, inputs = load_model_and_inputs(name, "test")
        labels = load_labels(name, "test")
        if max_samples is not None:
            inputs = {k: v[:max_samples] for k, v in inputs.items()}
            labels = None if labels is None else labels[:max_samples]
        self.inputs = inputs
        self.labels = labels
        self.n = len(next(iter(inputs.values())))
        self.reference_out = run(self.onnx_path, inputs, name)
        self._decoder = None
        self.reference = self.score(self.reference_out)

    def evaluate(self, model: str | os.PathLike | bytes) -> Fidelity:
        return self.score(run(model, self.inputs, self.name))

    def passes(self, fid: Fidelity) -> bool:
        """The headline rule: 99% of the original's behaviour (digits: within 1 point of its accuracy)."""
        if self.name == "digits":
            return fid.value >= self.reference.value - (1.0 - C.FIDELITY_TARGET) - 1e-12
        return fid.value >= C.FIDELITY_TARGET

    def score(self, out: np.ndarray) -> Fidelity:
        ref = self.reference_out
        if self.name == "digits":
            if self.labels is None:
                return Fidelity(_agreement(ref, out), "top-1 agreement")
            acc = float(np.mean(out.reshape(len(out), -1).argmax(1) == self.labels.reshape(-1)))
            return Fidelity(acc, "accuracy", {"agreement": _agreement(ref, out)})
        if self.name in ("magika", "cls"):
            return Fidelity(_agreement(ref, out), "top-1 agreement")
        if self.name == "rec":
            a, b = ref.argmax(-1), out.argmax(-1)
            strings = self._decode(ref), self._decode(out)
            match = float(np.mean([x == y for x, y in zip(*strings)]))
            return Fidelity(float(np.mean(a == b)), "per-step agreement", {"string match": match})
        if self.name == "det":
            m0, m1 = ref > C.DET_MASK_THRESHOLD, out > C.DET_MASK_THRESHOLD
            union = int(np.count_nonzero(m0 | m1))
            iou = 1.0 if union == 0 else int(np.count_nonzero(m0 & m1)) / union
            return Fidelity(iou, "mask IoU @0.3")
        raise KeyError(self.name)

    def _decode(self, probs: np.ndarray) -> list[str]:
        """Strings by rapidocr's own CTC decoder and the character list stored in the model."""
        from rapidocr_onnxruntime.ch_ppocr_rec.utils import CTCLabelDecode

        if self._decoder is None:
            import onnx

            meta = {p.key: p.value for p in onnx.load(str(self.onnx_path), load_external_data=False).metadata_props}
            # CTCLabelDecode inserts "blank" and " " into the list it is given: hand it its own copy.
            self._decoder = CTCLabelDecode(character=list(meta["character"].splitlines()))
        return [text for text, _ in self._decoder(probs)]


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(len(a), -1)
    b = b.reshape(len(b), -1)
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def evaluate_path(name: str, candidate: Path) -> Fidelity:
    """One-off convenience: fidelity of a candidate .onnx on a model's test split."""
    return Evaluator(name).evaluate(candidate)
