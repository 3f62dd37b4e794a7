"""Guards that keep the promise when the samples cannot resolve the tolerance.

Two kinds of loss need them:

- A loss that counts decisions that cross their threshold (one logit or probability per sample): on N
  units, none lost still fits a rate up to about 3/N (``resolution.py``). Where that bound is
  above ``--max-drop`` the count cannot tell a safe candidate from one that loses more than the
  tolerance on new data, so the loss becomes the larger of the counted rate and the rate
  estimated from every unit's margin (how far each original decision is from flipping, set
  against how far the candidate moves each one: ``metrics.expected_flip_rate``) at its upper
  bound, which rises with the step instead of resting at 0. Top-1 class metrics keep the
  selection's own rule: there the margin estimate cost the demo model 4.5x in size (21.33x to
  4.79x) for the same held-out accuracy, as it did on the bench's classifiers
  (docs/decisions/0026).
- The relative L2 error of the outputs (``l2``) is a ratio of sums over samples; measured on a
  few hundred samples, the search picks candidates whose error happens to be low there. It is
  judged at its one-sided 95% upper bound (delta method over the per-sample errors), which
  tends to the measured error as samples grow.

Both apply to the choice (search, confirm and the final check); a held-out score (``--test``)
reports the plain measurement. The statistics themselves are in ``uncertainty.py``; this module
says when they apply.
"""

from __future__ import annotations

from .metrics import METRICS
from .resolution import samples_to_resolve, upper_rate
from .selection import tolerance


def estimates_flips(metric: str, units: int, max_drop: float | None) -> bool:
    """Whether a scorer of ``units`` units judges ``metric`` by the margin estimate as well: the
    metric counts lost units and no lost unit among ``units`` still fits a rate above ``max_drop``."""
    info = METRICS[metric]
    return (max_drop is not None and info.counts_units and info.elementwise and units > 0
            and upper_rate(0, units) > max_drop)


def choice_limit(metric: str, max_drop: float, units: int, guard_units: int) -> float:
    """The loss a candidate scored on ``units`` units may show: ``selection.tolerance``, or where
    all the data (``guard_units``) cannot resolve ``max_drop``, ``max_drop`` itself, as the guarded
    loss is then a rate (the counted one and the margin estimate, the larger)."""
    return max_drop if estimates_flips(metric, guard_units, max_drop) else tolerance(metric, max_drop, units)


def bounds_energy(metric: str, max_drop: float | None) -> bool:
    """Whether an ``l2`` loss is judged at its upper bound (only where a choice is made)."""
    return max_drop is not None and METRICS[metric].energy


def resolution_note(metric: str, units: int, max_drop: float) -> str | None:
    """What the closing table says up front when ``units`` cannot resolve ``max_drop``."""
    if not estimates_flips(metric, units, max_drop):
        return None
    needed = samples_to_resolve(max_drop)
    could = f"about {needed} would" if needed is not None else "no finite number would"
    return (f"{units} units cannot show a rate below max drop {max_drop} (none lost still fits "
            f"{100 * upper_rate(0, units):.2f}%); {could}: the choice is held to the rate estimated "
            f"from every unit's margin as well")


__all__ = ["bounds_energy", "choice_limit", "estimates_flips", "resolution_note"]
