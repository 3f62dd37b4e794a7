"""How candidates are chosen: which are within tolerance, trusted, and in what order.

Both modes pick the smallest candidate whose loss is within ``--max-drop``; the losses are
measured on a few hundred samples, so the rules here guard against the winner's curse
(picking the candidate that was merely lucky on those samples): losses fitted monotone in
size, lost units judged as counts, and fallbacks never smaller than a candidate that failed.
"""

from __future__ import annotations

import math

from .candidates import Candidate
from .metrics import counts_units


def feasible(candidate: Candidate, max_drop: float) -> bool:
    return candidate.complete and candidate.loss <= max_drop + 1e-12


def monotone_losses(candidates: list[Candidate], max_drop: float) -> dict[int, float]:
    """id(candidate) -> its loss fitted as a non-increasing function of size (isotonic
    regression, pool-adjacent-violators, equal weights).

    More bins should never be worse; measured on a few hundred samples, losses are
    noisy, and picking the smallest candidate whose measured loss happens to be low
    is the winner's curse: a candidate within tolerance beside larger ones far outside
    it is lucky, not good (docs/decisions/0003). The fit uses complete evaluations and, of
    those stopped early, the ones whose loss is already known to exceed ``max_drop`` (at
    their lower bound: the true loss is higher still); a smaller bound says nothing about
    feasibility.
    """
    points = [c for c in candidates if c.complete or c.loss > max_drop]
    points.sort(key=lambda c: (-c.bits_per_weight, c.name))
    blocks: list[list] = []  # [sum, count, members]; non-decreasing loss as size falls
    for c in points:
        blocks.append([c.loss, 1, [c]])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n, members = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
            blocks[-1][2].extend(members)
    fitted: dict[int, float] = {}
    for s, n, members in blocks:
        for c in members:
            fitted[id(c)] = s / n
    return fitted


def robust_feasible(candidates: list[Candidate], max_drop: float, monotone: bool) -> list[Candidate]:
    """Candidates within tolerance: measured, and (``monotone``) not contradicted by a larger one."""
    ok = [c for c in candidates if feasible(c, max_drop)]
    if not monotone:
        return ok
    fitted = monotone_losses(candidates, max_drop)
    for c in candidates:
        c.fitted_loss = fitted.get(id(c))
    return [c for c in ok if fitted.get(id(c), c.loss) <= max_drop + 1e-12]


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """Smallest first; ties: smaller loss, fewer bins, name."""
    return sorted(candidates, key=lambda c: (c.bits_per_weight, c.loss, c.bins, c.name))


def robust_within_gamma(candidates: list[Candidate], max_drop: float, monotone: bool) -> list[Candidate]:
    """Feasible candidates whose loss, fitted non-increasing in size among candidates of the
    same gamma (where only the step scale differs, so more bits should never be worse),
    stays within the tolerance: the winner's curse guard of the paper mode, per gamma."""
    ok = [c for c in candidates if feasible(c, max_drop)]
    if not monotone:
        return ok
    fitted: dict[int, float] = {}
    for gamma in {c.recipe["gamma"] for c in candidates}:
        fitted.update(monotone_losses([c for c in candidates if c.recipe["gamma"] == gamma], max_drop))
    return [c for c in ok if fitted.get(id(c), c.loss) <= max_drop + 1e-12]


def fallbacks(ranked: list[Candidate], confirmed: list[Candidate], trials: list[dict]) -> list[Candidate]:
    """What the converter may still try, in order, if the confirmed choice misses --max-drop on
    all the data: only candidates larger than every one that failed on the confirm half."""
    failed = {t["name"] for t in trials if not t["passed"]}
    floor = max((c.bits_per_weight for c in ranked if c.name in failed), default=-math.inf)
    return [c for c in ranked if c not in confirmed and c.name not in failed and c.bits_per_weight > floor]


def tolerance(metric: str, max_drop: float, units: int) -> float:
    """The loss a candidate may show on ``units`` units and still count as within ``max_drop``.

    For metrics that count lost units the count is judged by (lost + 1/2) / (units + 1)
    (the Jeffreys estimate of the rate) rather than lost / units: on a few hundred units
    one unit more or less is chance, and the search would otherwise pick candidates that
    were merely lucky. It changes nothing on thousands of units (PP-OCRv4 rec's time
    steps) and allows no lost unit where max_drop * units is below one half."""
    if not counts_units(metric) or units <= 0:
        return max_drop
    return max(0.0, math.floor(max_drop * (units + 1) - 0.5 + 1e-9)) / units
