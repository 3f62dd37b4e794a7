"""Merging neighbouring bins of one codebook, cheapest first.

The cost of merging two neighbouring bins is the increase of the squared
quantization error it causes (Ward's criterion): n_a n_b / (n_a + n_b) (m_a - m_b)^2
with n the member counts and m the member means. Equal-width bins spend many
entries on sparse tails; merging those costs almost nothing in error and saves
codebook, table and index bits.

:func:`merge_cheapest` performs ``n`` successive cheapest merges (a heap over
neighbour pairs, O(n log m)). Successive cheapest merges trace one fixed path, so
the paper mode bisects along it for the most merges that keep the model's quality
within the tolerance: each evaluation is one trial, so the budget bounds the
evaluations, not the merges.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from .binning import Binning, representatives


@dataclass(frozen=True)
class Groups:
    """Contiguous groups of the original used bins, in value order."""

    counts: np.ndarray   # int64 per group
    sums: np.ndarray     # float64 per group
    lows: np.ndarray     # interval bounds per group
    highs: np.ndarray
    group_of_bin: np.ndarray  # original used bin -> group

    @classmethod
    def from_binning(cls, binning: Binning) -> Groups:
        m = binning.bins_used
        return cls(binning.counts.copy(), binning.sums.copy(), binning.lows.copy(), binning.highs.copy(), np.arange(m, dtype=np.int64))

    @property
    def size(self) -> int:
        return int(self.counts.size)

    def codebook(self, representative: str) -> np.ndarray:
        return representatives(self.sums, self.counts, self.lows, self.highs, representative)


def _cost(n_a: int, s_a: float, n_b: int, s_b: float) -> float:
    d = s_a / n_a - s_b / n_b
    return n_a * n_b / (n_a + n_b) * d * d


def merge_cheapest(groups: Groups, n: int) -> Groups:
    """``groups`` after ``n`` successive least-cost neighbour merges (ties: leftmost pair)."""
    m = groups.size
    n = max(0, min(n, m - 1))
    if n == 0:
        return groups
    counts = groups.counts.astype(np.int64).tolist()
    sums = groups.sums.astype(np.float64).tolist()
    highs = groups.highs.astype(np.float64).tolist()
    nxt = list(range(1, m + 1))
    prv = list(range(-1, m - 1))
    alive = [True] * m
    version = [0] * m
    heap = [(_cost(counts[i], sums[i], counts[i + 1], sums[i + 1]), i, 0, 0) for i in range(m - 1)]
    heapq.heapify(heap)
    done = 0
    while done < n and heap:
        cost, left, v_left, v_right = heapq.heappop(heap)
        right = nxt[left] if alive[left] else m
        if not alive[left] or right >= m or version[left] != v_left or version[right] != v_right:
            continue
        counts[left] += counts[right]
        sums[left] += sums[right]
        highs[left] = highs[right]
        alive[right] = False
        nxt[left] = nxt[right]
        if nxt[left] < m:
            prv[nxt[left]] = left
        version[left] += 1
        done += 1
        p = prv[left]
        if p >= 0:
            heapq.heappush(heap, (_cost(counts[p], sums[p], counts[left], sums[left]), p, version[p], version[left]))
        q = nxt[left]
        if q < m:
            heapq.heappush(heap, (_cost(counts[left], sums[left], counts[q], sums[q]), left, version[left], version[q]))
    keep = np.flatnonzero(np.array(alive))
    is_start = np.zeros(m, dtype=np.int64)
    is_start[keep] = 1
    step_map = np.cumsum(is_start) - 1  # old group -> new group (groups are contiguous)
    return Groups(
        np.asarray(counts, dtype=np.int64)[keep],
        np.asarray(sums, dtype=np.float64)[keep],
        groups.lows[keep],
        np.asarray(highs, dtype=np.float64)[keep],
        step_map[groups.group_of_bin],
    )
