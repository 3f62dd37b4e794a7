"""Guards that keep the promise when the samples cannot resolve the tolerance.

Two kinds of loss need them:

- A loss that counts lost units (top-1 changes, decisions that cross their threshold): on N
  units, none lost still fits a rate up to about 3/N (``resolution.py``). Where that bound is
  above ``--max-drop`` the count cannot tell a safe candidate from one that loses more than the
  tolerance on new data, so the loss becomes the larger of the counted rate and the rate
  estimated from every unit's margin (how far each original decision is from flipping, set
  against how far the candidate moves each one: ``metrics.expected_flip_rate``) at its upper
  bound, which rises with the step instead of resting at 0.
- The relative L2 error of the outputs (``l2``) is a ratio of sums over samples; measured on a
  few hundred samples, the search picks candidates whose error happens to be low there. It is
  judged at its one-sided 95% upper bound (delta method over the per-sample errors), which
  tends to the measured error as samples grow.

Both apply to the choice (search, confirm and the final check); a held-out score (``--test``)
reports the plain measurement.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .metrics import METRICS
from .resolution import samples_to_resolve, upper_rate

Z_UPPER = 1.645  # one-sided 95%


def estimates_flips(metric: str, units: int, max_drop: float | None) -> bool:
    """Whether a scorer of ``units`` units judges ``metric`` by the margin estimate as well: the
    metric counts lost units and no lost unit among ``units`` still fits a rate above ``max_drop``."""
    info = METRICS[metric]
    return (max_drop is not None and info.counts_units and (info.top1 or info.elementwise) and units > 0
            and upper_rate(0, units) > max_drop)


def choice_limit(metric: str, max_drop: float, units: int, guard_units: int) -> float:
    """The loss a candidate scored on ``units`` units may show: ``selection.tolerance``, or where
    all the data (``guard_units``) cannot resolve ``max_drop``, ``max_drop`` itself, as the guarded
    loss is then a rate (the counted one and the margin estimate, the larger)."""
    from .selection import tolerance

    return max_drop if estimates_flips(metric, guard_units, max_drop) else tolerance(metric, max_drop, units)


def bounds_energy(metric: str, max_drop: float | None) -> bool:
    """Whether an ``l2`` loss is judged at its upper bound (only where a choice is made)."""
    return max_drop is not None and METRICS[metric].energy


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


def resolution_note(metric: str, units: int, max_drop: float) -> str | None:
    """What the closing table says up front when ``units`` cannot resolve ``max_drop``."""
    if not estimates_flips(metric, units, max_drop):
        return None
    needed = samples_to_resolve(max_drop)
    could = f"about {needed} would" if needed is not None else "no finite number would"
    return (f"{units} units cannot show a rate below max drop {max_drop} (none lost still fits "
            f"{100 * upper_rate(0, units):.2f}%); {could}: the choice is held to the rate estimated "
            f"from every unit's margin as well")


__all__ = ["EnergyMoments", "bounds_energy", "choice_limit", "decision_margins", "estimates_flips", "expected_rate",
           "per_sample_energy", "resolution_note"]
