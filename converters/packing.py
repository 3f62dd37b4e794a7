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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moub_format import constants as C
from moub_format import huffman, writer

PACK_INDEX_BITS = 8 * 152     # a Pack's own index bytes: table, vtable, Blob with SHA-256, average padding
MEMBER_INDEX_BITS = 8 * 12    # per member: site ordinal (4), count (4, format 1.3), scale (4)
OFFSET_INDEX_BITS = 8 * 4     # per member of a pack that stores offsets (32-bit since 1.3)
CODEBOOK_INDEX_BITS = 8 * 28  # a grid codebook entry in the index
TABLE_ENTRY_BITS = 8          # one code length per grid level (plain tables; long ones are DEFLATE-packed)
CHUNK_BITS = 32 + 4           # a chunk's chunk_bits32 entry (1.3) and its average padding
MAX_ROUNDS = 8


@dataclass(frozen=True)
class PackPlan:
    """One pack: its members (pool site numbers, ascending), their level offsets (member
    level = grid value + offset), the grid's first value and the code lengths."""

    members: tuple[int, ...]
    offsets: tuple[int, ...]
    first: int
    lengths: np.ndarray
    payload_bits: int

    @property
    def count(self) -> int:
        return int(self.lengths.size)


@dataclass(frozen=True)
class _Hist:
    first: int
    counts: np.ndarray  # int64 over first .. first + size - 1

    @property
    def last(self) -> int:
        return self.first + self.counts.size - 1


def _hist(q: np.ndarray, offset: int = 0) -> _Hist:
    if q.size == 0:
        return _Hist(0, np.zeros(1, np.int64))
    first = int(q.min()) - offset
    return _Hist(first, np.bincount(q - offset - first).astype(np.int64))


def centre(q: np.ndarray) -> int:
    """The offset that centres a tensor's levels in a shared grid (its median level):
    BatchNorm gains and variances sit far from zero, everything else around it."""
    return int(np.round(np.median(q))) if q.size else 0


def _lengths(counts: np.ndarray) -> np.ndarray:
    return huffman.code_lengths(counts, huffman.writer_max_length(int(np.count_nonzero(counts))))


def _merged(hists: list[_Hist]) -> _Hist:
    first = min(h.first for h in hists)
    last = max(h.last for h in hists)
    counts = np.zeros(last - first + 1, np.int64)
    for h in hists:
        counts[h.first - first : h.last - first + 1] += h.counts
    return _Hist(first, counts)


def _fixed_bits(count: int, members: int, offsets: bool = False) -> int:
    """Index bits of a pack that do not depend on its payload (its table counted plain)."""
    per_member = MEMBER_INDEX_BITS + (OFFSET_INDEX_BITS if offsets else 0)
    return PACK_INDEX_BITS + CODEBOOK_INDEX_BITS + TABLE_ENTRY_BITS * count + per_member * members


def table_bits(lengths: np.ndarray) -> int:
    """Bits the writer spends on a code-length table: packed (DEFLATE) when that is smaller."""
    packed = huffman.packed_table(lengths)
    return TABLE_ENTRY_BITS * (lengths.size if packed is None else len(packed) + C.PACKED_TABLE_OVERHEAD)


def _own_bits(h: _Hist) -> int:
    lengths = _lengths(h.counts)
    return huffman.encoded_bits(h.counts, lengths) + _fixed_bits(0, 1) + table_bits(lengths)


def _plan(members: list[int], hists: list[_Hist], offsets: list[int]) -> PackPlan:
    members = sorted(members)
    merged = _merged([hists[i] for i in members])
    lengths = _lengths(merged.counts)
    return PackPlan(tuple(members), tuple(offsets[i] for i in members), merged.first, lengths,
                    huffman.encoded_bits(merged.counts, lengths))


def plan_packs(levels: list[np.ndarray]) -> list[PackPlan]:
    """Packs for the pooled sites' integer levels (see the module docstring)."""
    own_bits = [_own_bits(_hist(q)) for q in levels]
    offsets = [centre(q) for q in levels]
    hists = [_hist(q, o) for q, o in zip(levels, offsets)]  # centred, as members of the shared pack
    shared = list(range(len(levels)))
    alone: list[int] = []
    for _ in range(MAX_ROUNDS):
        if len(shared) < 2:
            break
        merged = _merged([hists[i] for i in shared])
        lengths = _lengths(merged.counts)
        firsts = np.array([hists[i].first for i in shared])
        lasts = np.array([hists[i].last for i in shared])
        leaving = []
        for j, i in enumerate(shared):
            h = hists[i]
            in_shared = huffman.encoded_bits(h.counts, lengths[h.first - merged.first : h.last - merged.first + 1])
            others_first = np.min(np.delete(firsts, j))
            others_last = np.max(np.delete(lasts, j))
            table_saved = TABLE_ENTRY_BITS * (merged.counts.size - (others_last - others_first + 1))
            if own_bits[i] < in_shared + table_saved + MEMBER_INDEX_BITS + OFFSET_INDEX_BITS:
                leaving.append(i)
        if not leaving:
            break
        alone.extend(leaving)
        shared = [i for i in shared if i not in set(leaving)]
    alone_hists = {i: _hist(levels[i]) for i in alone}  # a pack of its own needs no offset
    plans = [PackPlan((i,), (0,), alone_hists[i].first, _lengths(alone_hists[i].counts),
                      huffman.encoded_bits(alone_hists[i].counts, _lengths(alone_hists[i].counts))) for i in alone]
    if shared:
        plans.append(_plan(shared, hists, offsets))
    return sorted(plans, key=lambda p: p.members[0])


def total_bits(plans: list[PackPlan], sizes: np.ndarray, chunk_elements: int | None = None) -> int:
    """Bits the packs take in the file: payload, chunk entries, tables, codebooks, index entries."""
    chunk = chunk_elements or writer.default_chunk_elements(int(sizes.sum()))
    bits = 0
    for plan in plans:
        elements = int(sum(int(sizes[i]) for i in plan.members))
        bits += plan.payload_bits + CHUNK_BITS * math.ceil(elements / chunk)
        bits += _fixed_bits(0, len(plan.members), any(plan.offsets)) + table_bits(plan.lengths)
    return bits
