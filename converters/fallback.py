"""The file between lossy and lossless: the most sensitive tensors kept exact, the rest still searched.

When no candidate holds ``--max-drop``, the cause is usually a few tensors whose every step
the search can take breaks the tolerance on its own: a weight whose rounding a large gain
amplifies, a tensor whose outliers ``--ram int8`` turns into a coarse floor step. Storing
those few exactly (as the lossless file stores every tensor) and searching the others gives a
file far smaller than the lossless one that still holds the tolerance.

Under ``--ram`` the cause is more often the window itself. A MatMul weight that 16 levels cannot
hold within the tolerance at any step: under ``--ram int4`` the most sensitive 4-bit tensors first
get the int8 window back (a compact session then holds them in a byte), in growing shares of the
4-bit weights up to all of them (the ``--ram int8`` file). A tensor whose outliers stretch 256
levels into a step too coarse for the rest (a convolution with BatchNorm folded into it): then
the most sensitive tensors get the int16 window (two bytes in a compact session, half a float32),
in growing shares of the weights, before any tensor is kept exact.

Which tensors: the measured sensitivity (``sensitivity.py``: each tensor's output distortion
with only it quantized at a test step of its sigma / 16) turned into the distortion one of its
weights causes at the finest step it can get, the test step or its floor (``uniform.allocate_steps``
at the finest x: the int8 window, the grid codebook's range), whichever is coarser; per weight,
as keeping a tensor exact costs its size in float bytes. Tensors are kept exact most sensitive
first, in growing shares of the weights (``SHARES``); each set is
first probed at the finest step the search would take (one evaluation), and only a set that
holds there is searched in full. The first set whose search yields a file within the tolerance
is kept; the converter writes it only where it is smaller than the fully lossless file. The
paper mode measures no sensitivity per tensor and writes the lossless file
(docs/decisions/0056).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .intake import Pool
from .sensitivity import TEST_STEP
from .uniform import SiteStats, allocate_steps

SHARES = (0.05, 0.2, 0.5)   # the most sensitive tensors kept exact, up to this share of the weights, in turn
WIDEN_SHARES = (0.05, 0.2, 0.5, 1.0)  # the most sensitive 4-bit tensors given the int8 window, up to this share of the 4-bit weights
REASON_KEPT_EXACT = "kept exact (sensitive)"  # the pass-through reason of a tensor the fallback keeps exact
FINEST_X = -1e3              # below every clip of ``allocate_steps``: each tensor's floor step


def floor_steps(stats: SiteStats) -> np.ndarray:
    """The finest step each tensor can get (the step allocation's clips and floors)."""
    return allocate_steps(stats, stats.log2_sigma, FINEST_X, 0.0).astype(np.float64)


def sensitivity_order(stats: SiteStats, distortions: np.ndarray) -> list[int]:
    """Site numbers, most sensitive first: the distortion per weight at the coarser of the
    tensor's test step and its floor (the distortion grows with the step squared); ties in
    pool order."""
    test = np.exp2(stats.log2_sigma) * TEST_STEP
    at_floor = np.maximum(1.0, (floor_steps(stats) / test) ** 2)
    per_weight = np.asarray(distortions, np.float64) * at_floor / np.maximum(stats.sizes, 1)
    return [int(i) for i in np.argsort(-per_weight, kind="stable")]


def exact_sets(sizes: np.ndarray, order: Sequence[int], shares: Sequence[float] = SHARES) -> list[list[int]]:
    """For each share, the most sensitive sites whose weights stay within it (at least one site),
    in pool order; sets that repeat the one before are left out."""
    total = float(np.sum(sizes))
    sets: list[list[int]] = []
    for share in shares:
        picked, held = [], 0
        for i in order:
            if picked and held + int(sizes[i]) > share * total:
                break
            picked.append(i)
            held += int(sizes[i])
        picked.sort()
        if not sets or picked != sets[-1]:
            sets.append(picked)
    return sets


def four_bit_sets(pool: Pool, order: Sequence[int], shares: Sequence[float] = WIDEN_SHARES) -> list[list[int]]:
    """For each share, the most sensitive of the pool's 4-bit sites (``Pool.four_bit``) whose
    weights stay within that share of the 4-bit weights (at least one), in pool order; the last
    set is all of them. Empty without 4-bit sites."""
    four_bit = [i for i in order if pool.sites[i].path in pool.four_bit]
    if not four_bit:
        return []
    sizes = np.array([pool.sites[i].size for i in range(len(pool.sites))], dtype=np.int64)
    mask = np.zeros(len(pool.sites), dtype=bool)
    mask[four_bit] = True
    return exact_sets(np.where(mask, sizes, 0), four_bit, shares)


def widened(pool: Pool, sites: Sequence[int]) -> Pool:
    """The pool with ``sites`` no longer limited to 4 bits (``--ram int4``'s window): int8's applies."""
    return replace(pool, four_bit=pool.four_bit - {pool.sites[i].path for i in sites})


def sixteen_bit(pool: Pool, sites: Sequence[int]) -> Pool:
    """The pool with ``sites`` given the int16 window (``Pool.sixteen_bit``) in place of ``--ram``'s."""
    return replace(pool, sixteen_bit=pool.sixteen_bit | {pool.sites[i].path for i in sites})


@dataclass
class ExactTrial:
    """One set of tensors kept exact (and of 4-bit tensors given the int8 window), and how far it got."""

    tensors: int
    weights: int
    share: float          # of the pooled weights
    finest_loss: float    # at the finest step the search takes, on the search half
    outcome: str          # "finest step misses", "no candidate", "written file misses", "written"
    widened: int = 0      # 4-bit tensors given the int8 window
    widened_weights: int = 0
    sixteen_bit: int = 0  # tensors given the int16 window
    sixteen_bit_weights: int = 0

    def as_dict(self) -> dict:
        trial = {"tensors": self.tensors, "weights": self.weights, "share": round(self.share, 6),
                 "finest_loss": round(self.finest_loss, 6), "outcome": self.outcome}
        if self.widened:
            trial.update({"widened_to_int8": self.widened, "widened_weights": self.widened_weights})
        if self.sixteen_bit:
            trial.update({"widened_to_int16": self.sixteen_bit, "int16_weights": self.sixteen_bit_weights})
        return trial


def _sites_report(pool: Pool, sites: Sequence[int], reason: str, trials: Sequence[ExactTrial]) -> dict:
    """Which tensors a report entry names, their weights and share of the pool's, and why."""
    weights = sum(pool.sites[i].size for i in sites)
    return {"tensors": [pool.sites[i].name or pool.sites[i].path for i in sites],
            "paths": [pool.sites[i].path for i in sites], "count": len(sites), "weights": int(weights),
            "share": round(weights / max(pool.n_weights, 1), 6), "reason": reason,
            "trials": [t.as_dict() for t in trials]}


def kept_exact_report(pool: Pool, exact: Sequence[int], reason: str, trials: Sequence[ExactTrial],
                      lossless_bytes: int) -> dict:
    """The report's account of the tensors the written file keeps exact."""
    return {**_sites_report(pool, exact, reason, trials), "lossless_bytes": lossless_bytes}


def sixteen_bit_report(pool: Pool, sites: Sequence[int], reason: str, trials: Sequence[ExactTrial]) -> dict:
    """The report's account of the tensors the written file gives the int16 window."""
    return _sites_report(pool, sites, reason, trials)


def widened_report(pool: Pool, widened_sites: Sequence[int], reason: str, trials: Sequence[ExactTrial]) -> dict:
    """The report's account of the 4-bit tensors the written file gives the int8 window."""
    entry = _sites_report(pool, widened_sites, reason, trials)
    four_bit = sum(site.size for site in pool.sites if site.path in pool.four_bit)
    return {**entry, "share_of_four_bit": round(entry["weights"] / max(four_bit, 1), 6)}


__all__ = ["SHARES", "WIDEN_SHARES", "REASON_KEPT_EXACT", "ExactTrial", "exact_sets", "floor_steps", "four_bit_sets",
           "kept_exact_report", "sensitivity_order", "sixteen_bit", "sixteen_bit_report", "widened", "widened_report"]
