"""The statistics behind the guards (``guards.py``): how uncertain a loss measured on a few samples is.

Running sums over batches, so a scorer keeps a few numbers per unit at most, never the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Z_UPPER = 1.645  # one-sided 95%


def decision_margins(reference: np.ndarray, outputs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per value: how far the original is from ``threshold`` and how far the candidate moves it
    towards the other side (a change at least the margin flips the decision)."""
    ref = np.asarray(reference, np.float64).ravel()
    got = np.asarray(outputs, np.float64).ravel()
    side = np.where(ref > threshold, 1.0, -1.0)
    return np.abs(ref - threshold), np.where(np.isfinite(got), (ref - got) * side, np.inf)


def expected_rate(margins: np.ndarray, changes: np.ndarray) -> float:
    """The mean over units of the share of changes at least that unit's margin
    (metrics.expected_flip_rate), plus Z_UPPER binomial standard errors of a rate seen on that
    many units: new data of the same size would show its own count, not the mean."""
    if not margins.size:
        return 0.0
    at_least = changes.size - np.searchsorted(np.sort(changes), margins, side="left")
    rate = float(np.mean(at_least / changes.size))
    return rate + Z_UPPER * float(np.sqrt(rate * (1.0 - rate) / margins.size))


def per_sample_energy(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """(squared error, squared reference) per sample over the float outputs, or None where the
    outputs do not share one row per sample or a value is not finite (the batch then counts whole)."""
    rows = {int(r.shape[0]) for r in reference if r.dtype.kind == "f" and r.ndim}
    if len(rows) != 1:
        return None
    n = rows.pop()
    err, energy = np.zeros(n), np.zeros(n)
    for o, r in zip(outputs, reference):
        if r.dtype.kind != "f" or not r.ndim:
            continue
        r64 = np.asarray(r, np.float64).reshape(n, -1)
        o64 = np.asarray(o, np.float64).reshape(n, -1)
        if not np.isfinite(o64).all():
            return None
        err += ((o64 - r64) ** 2).sum(axis=1)
        energy += (r64 * r64).sum(axis=1)
    return err, energy


class EnergyMoments:
    """Running sums of the per-sample errors and energies, for the ratio's standard error."""

    def __init__(self) -> None:
        self.n = 0
        self.ee = self.rr = self.er = 0.0

    def add(self, err: np.ndarray, energy: np.ndarray) -> None:
        self.n += err.size
        self.ee += float(err @ err)
        self.rr += float(energy @ energy)
        self.er += float(err @ energy)

    def upper_ratio(self, err_sum: float, energy_sum: float) -> float:
        """err_sum / energy_sum plus Z_UPPER standard errors (delta method for a ratio of means)."""
        if energy_sum <= 0 or self.n < 2:
            return err_sum / energy_sum if energy_sum > 0 else 0.0
        ratio = err_sum / energy_sum
        spread = max(0.0, self.ee - 2 * ratio * self.er + ratio * ratio * self.rr)  # sum of (e_i - R r_i)^2
        return ratio + Z_UPPER * np.sqrt(spread * self.n / (self.n - 1)) / energy_sum


__all__ = ["EnergyMoments", "Z_UPPER", "decision_margins", "expected_rate", "per_sample_energy"]
