"""The file between lossy and lossless: the most sensitive tensors kept exact, the rest still searched.

When no candidate holds ``--max-drop``, the cause is usually a few tensors whose every step
the search can take breaks the tolerance on its own: a weight whose rounding a large gain
amplifies, a tensor whose outliers ``--ram int8`` turns into a coarse floor step. Storing
those few exactly (as the lossless file stores every tensor) and searching the others gives a
file far smaller than the lossless one that still holds the tolerance.

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
from dataclasses import dataclass

import numpy as np

from .intake import Pool
from .sensitivity import TEST_STEP
from .uniform import SiteStats, allocate_steps

SHARES = (0.05, 0.2, 0.5)   # the most sensitive tensors kept exact, up to this share of the weights, in turn
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


@dataclass
class ExactTrial:
    """One set of tensors kept exact, and how far it got."""

    tensors: int
    weights: int
    share: float          # of the pooled weights
    finest_loss: float    # at the finest step the search takes, on the search half
    outcome: str          # "finest step misses", "no candidate", "written file misses", "written"

    def as_dict(self) -> dict:
        return {"tensors": self.tensors, "weights": self.weights, "share": round(self.share, 6),
                "finest_loss": round(self.finest_loss, 6), "outcome": self.outcome}


def kept_exact_report(pool: Pool, exact: Sequence[int], reason: str, trials: Sequence[ExactTrial],
                      lossless_bytes: int) -> dict:
    """The report's account of the tensors the written file keeps exact."""
    weights = sum(pool.sites[i].size for i in exact)
    return {"tensors": [pool.sites[i].name or pool.sites[i].path for i in exact],
            "paths": [pool.sites[i].path for i in exact], "count": len(exact),
            "weights": int(weights), "share": round(weights / max(pool.n_weights, 1), 6), "reason": reason,
            "trials": [t.as_dict() for t in trials], "lossless_bytes": lossless_bytes}


__all__ = ["SHARES", "REASON_KEPT_EXACT", "ExactTrial", "exact_sets", "floor_steps", "kept_exact_report",
           "sensitivity_order"]
