"""Group quantized tensors into format-1.2 packs and count the bits they will take.

A pack is one Huffman-coded stream over a grid codebook (the integers
``first .. first + count - 1``), shared by its members, each with its own scale.
One table for everything wastes bits where tensors' level histograms differ (a
coarse tensor is mostly zeros, a fine one spreads over hundreds of levels); one
table per tensor wastes the index and table bytes of small tensors (rapidocr's
cls model has 258 float tensors under 1024 elements). So tensors start in one
shared pack and a tensor leaves it for a pack of its own when that is smaller,
counting its own table and index entries against the bits its own code saves
and the shared table entries only it needed. The size is exact for the payload
(the writer's length-limited canonical code lengths over the same counts) and a
close estimate for the index (measured constants below); the converter states
the real file size anyway.

A pack of one tensor whose levels are few and far apart lists them as an explicit
codebook instead of a grid (the same float32 levels, so the same decoded bits): a grid
needs a code length for every integer between its first and last level (PP-OCRv4 det
has a 16-element tensor whose 16 levels span 726,035 grid values: as a grid, hundreds of
index bytes and a table the reader inflates, checks and sorts on every load, for 8 bytes
of payload).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from moub_format import constants as C
from moub_format import huffman, writer

PACK_INDEX_BITS = 8 * 152     # a Pack's own index bytes: table, vtable, Blob with SHA-256, average padding
MEMBER_INDEX_BITS = 8 * 12    # per member: site ordinal (4), count (4, format 1.3), scale (4)
OFFSET_INDEX_BITS = 8 * 4     # per member of a pack that stores offsets (32-bit since 1.3)
CODEBOOK_INDEX_BITS = 8 * 28  # a grid codebook entry in the index
TABLE_ENTRY_BITS = 8          # one code length per grid level (plain tables; long ones are DEFLATE-packed)
CHUNK_BITS = 32 + 4           # a chunk's chunk_bits32 entry (1.3) and its average padding
VALUE_BITS = 32               # one float32 of an explicit codebook's values
MAX_ROUNDS = 8


@dataclass(frozen=True)
class PackPlan:
    """One pack: its members (pool site numbers, ascending), their level offsets (member
    level = grid value + offset), the grid's first value, its number of symbols and the code
    lengths of the symbols used (``used``: ascending symbol numbers; every other symbol has
    length 0). Only the used symbols are held: at fine steps a grid spans millions of values
    that no weight takes."""

    members: tuple[int, ...]
    offsets: tuple[int, ...]
    first: int
    count: int
    used: np.ndarray          # int64 symbol numbers (0 .. count - 1), ascending
    used_lengths: np.ndarray  # uint8 code length of each used symbol
    payload_bits: int
    levels: tuple[int, ...] | None = None  # an explicit codebook of these levels (ascending), not a grid

    @property
    def lengths(self) -> np.ndarray:
        """The code length of every symbol (uint8, ``count`` of them), as the writer stores the table."""
        lengths = np.zeros(self.count, np.uint8)
        lengths[self.used] = self.used_lengths
        return lengths

    def symbols(self, levels: np.ndarray, offset: int = 0) -> np.ndarray:
        """Codebook indices of a member's integer ``levels`` (member level = symbol's value + offset)."""
        if self.levels is None:
            return levels - offset - self.first
        return np.searchsorted(np.asarray(self.levels, dtype=np.int64), levels)

    def as_grid(self) -> PackPlan:
        """The same code over a grid from the first to the last listed level (an explicit plan's
        levels spread back over the integers between them)."""
        if self.levels is None:
            return self
        first = self.levels[0]
        return replace(self, first=first, count=self.levels[-1] - first + 1,
                       used=np.asarray(self.levels, np.int64) - first, levels=None)


@dataclass(frozen=True)
class _Hist:
    """The levels a tensor takes (ascending) and how often, over the grid ``first .. last``."""

    first: int
    last: int
    values: np.ndarray  # int64 levels with a count, ascending
    counts: np.ndarray  # int64, each at least 1

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def shifted(self, offset: int) -> _Hist:
        return _Hist(self.first - offset, self.last - offset, self.values - offset, self.counts)


DENSE_SPAN = 4  # a histogram counts by bincount when its span is at most this many times its values


def _hist(q: np.ndarray, offset: int = 0) -> _Hist:
    if q.size == 0:
        return _Hist(0, 0, np.zeros(0, np.int64), np.zeros(0, np.int64))
    first, last = int(q.min()) - offset, int(q.max()) - offset
    if last - first + 1 <= DENSE_SPAN * q.size + 1024:
        dense = np.bincount(q - offset - first)
        used = np.flatnonzero(dense)
        return _Hist(first, last, used + first, dense[used].astype(np.int64))
    values, counts = np.unique(np.asarray(q, np.int64) - offset, return_counts=True)
    return _Hist(first, last, values, counts.astype(np.int64))


def centre(h: _Hist) -> int:
    """The offset that centres a tensor's levels in a shared grid (its median level,
    rounded half to even, as ``np.round(np.median(levels))``): BatchNorm gains and
    variances sit far from zero, everything else around it. From the histogram, which
    the planner has anyway, rather than a partition of every level."""
    total = int(h.counts.sum())
    if total == 0:
        return 0
    cumulative = np.cumsum(h.counts)
    low, high = h.values[np.searchsorted(cumulative, [(total - 1) // 2, total // 2], side="right")]
    return int(np.round((int(low) + int(high)) / 2))


def _lengths(counts: np.ndarray) -> np.ndarray:
    """Code lengths of the used symbols (``counts`` of used symbols only, in symbol order): the
    same lengths as over the whole grid, since the code orders symbols only among themselves."""
    return huffman.code_lengths(counts, huffman.writer_max_length(int(np.count_nonzero(counts))))


def _merged(hists: list[_Hist]) -> _Hist:
    first = min(h.first for h in hists)
    last = max(h.last for h in hists)
    values, inverse = np.unique(np.concatenate([h.values for h in hists]), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate([h.counts for h in hists]), minlength=values.size)
    return _Hist(first, last, values, counts.astype(np.int64))  # exact: counts are far below 2^53


def _fixed_bits(count: int, members: int, offsets: bool = False) -> int:
    """Index bits of a pack that do not depend on its payload (its table counted plain)."""
    per_member = MEMBER_INDEX_BITS + (OFFSET_INDEX_BITS if offsets else 0)
    return PACK_INDEX_BITS + CODEBOOK_INDEX_BITS + TABLE_ENTRY_BITS * count + per_member * members


def table_bits(lengths: np.ndarray) -> int:
    """Bits the writer spends on a code-length table: packed (DEFLATE) when that is smaller."""
    packed = huffman.packed_table(lengths)
    return TABLE_ENTRY_BITS * (lengths.size if packed is None else len(packed) + C.PACKED_TABLE_OVERHEAD)


def _dense(size: int, used: np.ndarray, used_lengths: np.ndarray) -> np.ndarray:
    lengths = np.zeros(size, np.uint8)
    lengths[used] = used_lengths
    return lengths


def codebook_bits(lengths: np.ndarray, explicit: bool) -> int:
    """Bits of a pack's code-length table plus what its codebook's values add to the index: a
    grid's run of values costs nothing beyond its entry, an explicit codebook one float32 per
    used level (its table then covers only those)."""
    if not explicit:
        return table_bits(lengths)
    return table_bits(lengths[lengths > 0]) + VALUE_BITS * int(np.count_nonzero(lengths))


def _own(h: _Hist) -> tuple[int, np.ndarray]:
    """Bits of a pack of this histogram alone (grid or explicit codebook, whichever is
    smaller), and its code lengths (kept: a tensor that leaves the shared pack uses them)."""
    lengths = _lengths(h.counts)
    table = table_bits(_dense(h.size, h.values - h.first, lengths))
    if VALUE_BITS * int(np.count_nonzero(lengths)) < table:  # else an explicit codebook cannot be smaller
        table = min(table, codebook_bits(lengths, True))
    return huffman.encoded_bits(h.counts, lengths) + _fixed_bits(0, 1) + table, lengths


def _sparse(plan: PackPlan) -> PackPlan:
    """``plan`` over an explicit codebook of its used levels when that takes fewer bits (only
    without offsets, which need a grid). The code lengths of the used symbols, and so the
    payload, are the same: canonical codes order symbols by value either way."""
    if any(plan.offsets) or codebook_bits(plan.used_lengths, True) >= codebook_bits(plan.lengths, False):
        return plan
    used = plan.used[plan.used_lengths > 0]
    return replace(plan, count=int(used.size), used=np.arange(used.size, dtype=np.int64),
                   used_lengths=plan.used_lengths[plan.used_lengths > 0],
                   levels=tuple(int(plan.first + u) for u in used))


def _plan_of(members: tuple[int, ...], offsets: tuple[int, ...], h: _Hist, lengths: np.ndarray) -> PackPlan:
    return PackPlan(members, offsets, h.first, h.size, h.values - h.first, lengths,
                    huffman.encoded_bits(h.counts, lengths))


def _plan(members: list[int], hists: list[_Hist], offsets: list[int]) -> PackPlan:
    members = sorted(members)
    merged = _merged([hists[i] for i in members])
    return _plan_of(tuple(members), tuple(offsets[i] for i in members), merged, _lengths(merged.counts))


def _others_extreme(values: np.ndarray, smallest: bool) -> np.ndarray:
    """For each position, the min (or max) of all the other values: the extreme, or at the
    extreme's own position the runner-up (what ``np.delete`` per position gave, in one pass)."""
    keyed = values if smallest else -values
    order = np.argsort(keyed, kind="stable")
    best, second = keyed[order[0]], keyed[order[1]]
    out = np.full(values.size, best)
    out[order[0]] = second
    return out if smallest else -out


def plan_packs(levels: list[np.ndarray], offsets: list[int] | None = None, groups: list | None = None) -> list[PackPlan]:
    """Packs for the pooled sites' integer levels (see the module docstring). ``offsets``: each
    site's offset in the shared pack (default: its histogram's centre); ``--ram int8`` gives the
    middle of each site's window of levels, so that the shared grid stays as narrow as a window.
    ``groups``: a key per site; only sites of one key share a pack (one shared pack per key;
    ``--ram int4`` keys by window, so a 4-bit weight's shared grid stays 16 values wide)."""
    own_hists = [_hist(q) for q in levels]
    own_bits, own_lengths = zip(*(_own(h) for h in own_hists)) if levels else ((), ())
    offsets = [centre(h) for h in own_hists] if offsets is None else list(offsets)
    hists = [h.shifted(o) if o else h for o, h in zip(offsets, own_hists)]  # centred, as members of the shared pack
    keys = [0] * len(levels) if groups is None else list(groups)
    plans: list[PackPlan] = []
    for key in sorted(set(keys)):
        members = [i for i in range(len(levels)) if keys[i] == key]
        shared, alone = _shared_and_alone(members, hists, own_bits)
        plans.extend(_plan_of((i,), (0,), own_hists[i], own_lengths[i]) for i in alone)
        if shared:
            plans.append(_plan(shared, hists, offsets))
    return sorted((_sparse(p) for p in plans), key=lambda p: p.members[0])


def _shared_and_alone(members: list[int], hists: list[_Hist], own_bits) -> tuple[list[int], list[int]]:
    """Which of ``members`` stay in their shared pack and which are cheaper in a pack of their own."""
    shared = list(members)
    alone: list[int] = []
    for _ in range(MAX_ROUNDS):
        if len(shared) < 2:
            break
        merged = _merged([hists[i] for i in shared])
        lengths = _lengths(merged.counts)
        others_first = _others_extreme(np.array([hists[i].first for i in shared]), smallest=True)
        others_last = _others_extreme(np.array([hists[i].last for i in shared]), smallest=False)
        leaving = []
        for j, i in enumerate(shared):
            h = hists[i]
            in_shared = huffman.encoded_bits(h.counts, lengths[np.searchsorted(merged.values, h.values)])
            table_saved = TABLE_ENTRY_BITS * (merged.size - (int(others_last[j]) - int(others_first[j]) + 1))
            if own_bits[i] < in_shared + table_saved + MEMBER_INDEX_BITS + OFFSET_INDEX_BITS:
                leaving.append(i)
        if not leaving:
            break
        alone.extend(leaving)
        gone = set(leaving)
        shared = [i for i in shared if i not in gone]
    return shared, alone


def total_bits(plans: list[PackPlan], sizes: np.ndarray, chunk_elements: int | None = None) -> int:
    """Bits the packs take in the file: payload, chunk entries, tables, codebooks, index entries."""
    chunk = chunk_elements or writer.default_chunk_elements(int(sizes.sum()))
    bits = 0
    for plan in plans:
        elements = int(sum(int(sizes[i]) for i in plan.members))
        bits += plan.payload_bits + CHUNK_BITS * math.ceil(elements / chunk)
        bits += _fixed_bits(0, len(plan.members), any(plan.offsets))
        bits += table_bits(plan.lengths) + (0 if plan.levels is None else VALUE_BITS * plan.count)
    return bits
