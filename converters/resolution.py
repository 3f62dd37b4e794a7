"""How sharply the user's samples can check ``--max-drop``.

A loss of 0 on N samples does not mean the file loses nothing on new data. With
one decision per sample (a classifier's top-1), a change rate up to about 3/N
goes unseen 5% of the time (the "rule of three"; the exact figure is the one-sided
Clopper-Pearson bound): a file with no changed sample among a few hundred can still
lose a few percent on unseen data (docs/decisions/0014). The search picks among many
candidates on the same samples, so unseen data can do worse than the bound; it says
only what even one honest check on these samples cannot rule out.

Only for metrics whose loss counts lost units (``Metric.counts_units``: accuracy and
agreement) on outputs of one prediction per sample ([N, C] scores). Time-step units of
sequence outputs are not independent, and the other metrics have no count of broken
samples, so no bound is given for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .metrics import METRICS, counts_units

CONFIDENCE = 0.95


def upper_rate(failures: int, trials: int, confidence: float = CONFIDENCE) -> float:
    """The one-sided Clopper-Pearson upper bound of a rate seen ``failures`` times in ``trials``:
    the largest rate under which seeing at most ``failures`` still has probability 1 - confidence."""
    from scipy.stats import beta

    if trials < 1:
        raise ValueError("trials must be at least 1")
    if failures >= trials:
        return 1.0
    return float(beta.ppf(confidence, failures + 1, trials - failures))


def samples_to_resolve(max_drop: float, confidence: float = CONFIDENCE) -> int | None:
    """The fewest samples on which a check with no broken sample bounds the rate by ``max_drop``."""
    if not 0.0 < max_drop < 1.0:
        return None
    return math.ceil(math.log(1.0 - confidence) / math.log1p(-max_drop))


def resolution(metric: str | None, reference: Sequence[np.ndarray], loss: float | None, max_drop: float) -> dict | None:
    """The report's ``resolution`` entry for the chosen file's measured ``loss`` on all the
    samples, or None where the metric has no count of broken samples."""
    if not counts_units(metric) or loss is None or not reference or reference[0].ndim != 2:
        return None
    if METRICS[metric].elementwise and reference[0].shape[1] != 1:
        return None  # a decision per value: the lost units are values, not samples
    samples = int(reference[0].shape[0])
    broken = int(round(loss * samples))
    unseen_at_zero = upper_rate(0, samples)
    return {
        "unit": "sample",
        "samples": samples,
        "broken": broken,
        "confidence": CONFIDENCE,
        "upper_rate": round(upper_rate(broken, samples), 6),
        "upper_rate_if_none_broken": round(unseen_at_zero, 6),
        "resolves_max_drop": unseen_at_zero <= max_drop,
        "samples_to_resolve_max_drop": samples_to_resolve(max_drop),
    }


def summary_lines(entry: dict | None, metric: str | None, max_drop: float) -> list[str]:
    """The closing table's lines for a ``resolution`` entry (none when there is no entry)."""
    if not entry:
        return []
    n, broken = entry["samples"], entry["broken"]
    what = METRICS[metric].lost_unit
    lines = [f"{'check':16}{f'{broken} of {n}':>16}   samples {what}: a rate up to "
             f"{100 * entry['upper_rate']:.2f}% fits that ({100 * entry['confidence']:.0f}% bound)"]
    if not entry["resolves_max_drop"]:
        needed = entry["samples_to_resolve_max_drop"]
        could = f"about {needed} could" if needed is not None else "no finite number of samples can show a rate of 0"
        lines.append(f"{'':32}   {n} samples cannot show a rate below max drop {max_drop}; {could}")
    return lines
