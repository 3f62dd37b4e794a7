"""Equal-width binning of the pooled weights into one codebook: O(N) with numpy.

``k`` intervals of equal width over the pool's [min, max]; each weight goes to
its interval; empty intervals are dropped; each used interval's shared value
is the mean of its members (``"mean"``) or the interval's midpoint, the
cluster centre of the paper (``"centre"``). The mean is the default: it is the
least-squares value for its members, so it keeps the same accuracy with fewer bins
(docs/decisions/0001).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REPRESENTATIVES = ("mean", "centre")


@dataclass(frozen=True)
class Binning:
    """Used bins of an equal-width binning, in ascending value order.

    ``indices`` maps every pooled weight to its bin (into ``codebook``);
    ``counts``, ``sums``, ``lows`` and ``highs`` describe each used bin: its
    member count, member sum (float64) and interval bounds.
    """

    k: int
    codebook: np.ndarray
    indices: np.ndarray
    counts: np.ndarray
    sums: np.ndarray
    lows: np.ndarray
    highs: np.ndarray

    @property
    def bins_used(self) -> int:
        return int(self.codebook.size)


def index_dtype(k: int) -> np.dtype:
    return np.dtype(np.uint16) if k <= 1 << 16 else np.dtype(np.int32)


SLICE_ELEMENTS = 1 << 22  # weights binned per pass: float64 temporaries of one slice, not of the pool


def assign(values: np.ndarray, lo: float, hi: float, k: int) -> np.ndarray:
    """Interval number (0..k-1) of every value for k equal-width intervals over [lo, hi], in
    the smallest index dtype for k (uint16 up to 65536), a slice at a time: float64
    temporaries of one slice, not of the whole pool."""
    if k < 1:
        raise ValueError(f"bin count must be at least 1, not {k}")
    if not hi > lo:
        return np.zeros(values.shape, dtype=index_dtype(k))
    out = np.empty(values.shape, dtype=index_dtype(k))
    flat_values, flat_out = values.reshape(-1), out.reshape(-1)
    for start in range(0, flat_values.size, SLICE_ELEMENTS):
        part = flat_values[start : start + SLICE_ELEMENTS]
        bins = np.floor((part.astype(np.float64) - float(lo)) / (float(hi) - float(lo)) * k)
        np.clip(bins, 0, k - 1, out=bins)
        flat_out[start : start + part.size] = bins
    return out


def bin_sums(bins: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(members, float64 sum of members) of each of k bins, a slice at a time. The sums
    are added in element order, as one ``np.bincount`` pass adds them (the first slice
    is that pass; later ones continue it with ``np.add.at``), so they are the same bits."""
    counts = np.bincount(bins[:SLICE_ELEMENTS], minlength=k).astype(np.int64)
    sums = np.bincount(bins[:SLICE_ELEMENTS], weights=values[:SLICE_ELEMENTS], minlength=k)
    for start in range(SLICE_ELEMENTS, bins.size, SLICE_ELEMENTS):
        part = bins[start : start + SLICE_ELEMENTS]
        counts += np.bincount(part, minlength=k)
        np.add.at(sums, part, values[start : start + SLICE_ELEMENTS].astype(np.float64))
    return counts, sums


def representatives(sums: np.ndarray, counts: np.ndarray, lows: np.ndarray, highs: np.ndarray, how: str) -> np.ndarray:
    """Shared value of each bin: member mean or interval midpoint, as float32."""
    if how == "mean":
        return (sums / counts).astype(np.float32)
    if how == "centre":
        return ((lows + highs) / 2).astype(np.float32)
    raise ValueError(f"representative must be one of {REPRESENTATIVES}, not {how!r}")


def uniform_binning(values: np.ndarray, k: int, representative: str = "mean") -> Binning:
    """Bin ``values`` (float32, the pool) into ``k`` equal-width intervals; drop empty ones."""
    values = np.asarray(values, dtype=np.float32)
    if values.size == 0:
        raise ValueError("nothing to bin: the pool is empty")
    values = values.reshape(-1)
    lo, hi = float(values.min()), float(values.max())
    bins = assign(values, lo, hi, k)
    counts_all, sums_all = bin_sums(bins, values, k)
    used = np.flatnonzero(counts_all)
    remap = np.zeros(k, dtype=index_dtype(used.size))
    remap[used] = np.arange(used.size)
    indices = remap[bins]
    del bins
    sums = sums_all[used]
    counts = counts_all[used]
    width = (hi - lo) / k if hi > lo else 0.0
    lows = lo + used * width
    highs = lo + (used + 1) * width
    codebook = representatives(sums, counts, lows, highs, representative)
    return Binning(int(k), codebook, indices, counts, sums, lows, highs)
