"""Table-driven Huffman decoding of many chunks at once ("lanes"), in NumPy.

Every chunk of an index stream decodes on its own (FORMAT.md §4.2), so a batch
of chunks is decoded in lock step: lane *i* is chunk *i*, and each NumPy call
advances all lanes by one symbol. The per-call overhead of NumPy is paid once
per step instead of once per symbol, and the more lanes a call carries the
smaller its share: a caller decodes thousands of lanes per call where memory
allows (tens to hundreds of millions of symbols per second on one core).

The stream words, lane-interleaved: ``W[r, lane]`` is the r-th 64-bit word
(big-endian bit order, as a native integer) from the lane's first byte rounded
down to 8, so that at every step the lanes read neighbouring memory (gathers
from the stream itself would touch a page per lane). ``W`` is about as big as
the lanes' stream bytes.

A refill, for all lanes at once: the 64 stream bits at the lane's bit position,
``w = (W[r] << off) | (W[r + 1] >> (64 - off))`` (two gathers); then up to
``k = 64 // L`` symbols (L = the table's longest code), each:

* ``v = w >> (64 - L)``: the next ``L`` bits;
* ``entry = table[v]``: a lookup table of ``2**L`` entries built from the
  canonical code, the symbol's value in the high 32 bits, the length of its
  code in the low bits; the entry is stored in a block of steps, whose value
  halves go to ``out`` in one transposing copy per block;
* ``w <<= length``, ``off += length``.

After the k symbols, ``off``'s whole words move the lane's row forward.

Exactness: a table with a Kraft sum of exactly 1 has no invalid ``L``-bit
pattern and every code is at least one bit, so after exactly ``count`` steps a
lane has consumed exactly the bits of ``count`` codes. The caller compares that
with the declared ``chunk_bits``: equal means the chunk holds exactly ``count``
symbols and nothing else (a code that straddles the end, or one more symbol,
makes them differ). Lanes keep stepping after their own count (the last chunk
of a tensor is short); their extra output lands in the unused tail of their
row, and their bit position was recorded at their own count. ``W`` holds every
word a valid lane reads (and zeros past the end of ``data``); gathers clip
their indices, so a corrupt lane that runs past its words reads garbage that
the final comparison rejects, never memory outside the arrays. Every loop is
bounded by the declared element counts.
"""

from __future__ import annotations

import mmap
from concurrent.futures import Executor, Future

import numpy as np

from .huffman import canonical_order

WINDOW_SLACK = 8          # zero bytes a caller appends after the last lane's data (not needed: kept for callers)
BLOCK_STEPS = 128         # steps decoded into a block before one transposing copy to ``out`` (fewer when lanes are many)
BLOCK_BYTES = 1 << 22     # at most this much block memory
LANES_PER_BUILD = 256     # lanes of the word array built per copy
LENGTH_MASK = np.uint64(0xFF)
PAGE_BACKED_BYTES = 1 << 20   # arrays at least this big are anonymous mappings of their own


def empty_pages(shape: tuple[int, ...] | int, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array; a big one (PAGE_BACKED_BYTES or more) in a
    private anonymous mapping of its own, page-aligned, advised for transparent huge
    pages where the system has them (like NumPy's own big allocations: far fewer page
    faults), whose memory goes back to the system as soon as the array and its views
    are gone, whatever the C allocator would keep."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for dim in shape:
        nbytes *= dim
    if nbytes < PAGE_BACKED_BYTES or not _PRIVATE_MAPPINGS:
        return np.empty(shape, dtype=dtype)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if _HUGE_PAGES:
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return np.frombuffer(mapping, dtype=dtype).reshape(shape)


_PRIVATE_MAPPINGS = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")
_HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE")


def _shifts_saturate() -> bool:
    """Whether this NumPy gives 0 for uint64 shifts by 64 (the refill relies on it for
    lanes at a word boundary, else it takes one more shift), in its vector loops and tails."""
    ones = np.full(67, (1 << 64) - 1, dtype=np.uint64)
    sixty_four = np.full(67, 64, dtype=np.uint64)
    return not np.right_shift(ones, sixty_four).any() and not np.left_shift(ones, sixty_four).any()


SHIFTS_SATURATE = _shifts_saturate()


class LookupTable:
    """The ``2**L``-entry decode table of one validated canonical code.

    ``entries[v]`` packs, for the L-bit pattern ``v``, the length of the code
    that is a prefix of ``v`` (low 32 bits) and its symbol (high 32 bits).
    Only for tables with at least two used symbols and a Kraft sum of exactly
    1 (checked by the caller; asserted here by the tiling).
    """

    def __init__(self, code_lengths: np.ndarray) -> None:
        code_lengths = np.asarray(code_lengths)
        count, sorted_symbols = canonical_order(code_lengths)
        self.max_length = len(count) - 1
        self.alphabet = code_lengths.size
        sorted_lengths = code_lengths[sorted_symbols].astype(np.int64)
        spans = np.left_shift(1, self.max_length - sorted_lengths)
        if int(spans.sum()) != 1 << self.max_length:
            raise ValueError("lookup tables need a complete code (Kraft sum exactly 1)")
        # Canonical codes in (length, symbol) order are consecutive prefixes:
        # their L-bit ranges tile [0, 2**L) in that order. Kept per used symbol; the
        # 2**L entries are spread out once, already packed, by :meth:`entries`.
        self._sorted_symbols = sorted_symbols
        self._sorted_lengths = sorted_lengths.astype(np.uint64)
        self._spans = spans
        self.symbols_per_refill = 64 // self.max_length  # a refill brings 64 bits

    def entries(self, by_symbol: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The packed table for decoding to ``by_symbol[symbol]``.

        Values of at most 4 bytes travel in the table's high half (no second
        lookup); wider ones (float64) come back as symbols plus ``by_symbol``
        for a gather from the small per-symbol array.
        """
        by_symbol = np.ascontiguousarray(by_symbol)
        if by_symbol.size != self.alphabet:
            raise ValueError(f"{by_symbol.size} values for an alphabet of {self.alphabet}")
        if by_symbol.dtype.itemsize <= 4:
            bits = by_symbol.view(f"<u{by_symbol.dtype.itemsize}").astype(np.uint64)
            packed = (bits[self._sorted_symbols] << np.uint64(32)) | self._sorted_lengths
            return np.repeat(packed, self._spans), None
        packed = (self._sorted_symbols.astype(np.uint64) << np.uint64(32)) | self._sorted_lengths
        return np.repeat(packed, self._spans), by_symbol




class MixedTables:
    """Several validated lookup tables decoded in one lock step: lanes of different
    tables advance together, so a file of many small packs (one code table each) pays
    NumPy's per-call overhead once per step instead of once per table and step.

    The tables' packed entries are concatenated; lane *i* looks its pattern up at
    ``base[i] + (window >> drop[i])`` (its own table's ``L`` bits, so a lane never
    reads another table's entries), and a refill brings ``64 // L`` symbols for the
    longest ``L`` of all the tables (every table's codes then fit in 64 bits)."""

    def __init__(self, tables: list[LookupTable], entries: list[np.ndarray]) -> None:
        self.max_length = max(t.max_length for t in tables)
        self.symbols_per_refill = 64 // self.max_length
        sizes = np.array([e.size for e in entries], dtype=np.int64)
        self.bases = (np.cumsum(sizes) - sizes).astype(np.uint64)
        self.drops = np.array([64 - t.max_length for t in tables], dtype=np.uint64)
        self.entries = np.concatenate(entries)

    def lane_arrays(self, lane_tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(drop, base) per lane, for lanes of the tables numbered ``lane_tables``."""
        return self.drops[lane_tables], self.bases[lane_tables]


def _word_rows(data: np.ndarray, starts: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W, first_bit): ``W[r, lane]`` = the 64 bits (big-endian) of ``data`` from byte
    ``8 * (starts[lane] // 8 + r)``, as a native integer (zero past the end of ``data``),
    for every row a lane with ``bits[lane]`` bits from ``starts[lane]`` reads;
    ``first_bit[lane]`` = its first bit within row 0.

    Built LANES_PER_BUILD lanes at a time: each lane's words copied from a sliding-
    window view of the stream (one contiguous copy per lane, in C), then one
    transposing, byte-swapping copy into W. Memory: W (about the lanes' stream bytes)
    plus one block's words.
    """
    n_lanes = starts.size
    base = starts >> 3
    first_bit = (starts & 7) * 8
    # A valid lane's last refill starts before first_bit + bits and reads that word and the next.
    rows = int(((first_bit + bits + 63) >> 6).max()) + 1
    W = empty_pages((rows, n_lanes), np.uint64)
    n_words = data.size // 8
    words = np.ndarray((n_words,), dtype=">u8", buffer=data)
    inside = base + rows <= n_words
    near_end = np.flatnonzero(~inside)
    if near_end.size:  # lanes whose rows run past the data: from a zero-padded copy of its end
        tail_word = int(base[near_end].min())
        tail_bytes = data[8 * tail_word :]
        padded = np.zeros(int(base[near_end].max()) - tail_word + rows, dtype=">u8")
        padded.view(np.uint8)[: tail_bytes.size] = tail_bytes
        tail_windows = np.lib.stride_tricks.sliding_window_view(padded, rows)
        W[:, near_end] = tail_windows[base[near_end] - tail_word].T
    if n_words >= rows:
        windows = np.lib.stride_tricks.sliding_window_view(words, rows)
        lanes = np.flatnonzero(inside)
        for a in range(0, lanes.size, LANES_PER_BUILD):
            block = lanes[a : a + LANES_PER_BUILD]
            if block[-1] - block[0] == block.size - 1:  # consecutive lanes: a plain slice of W
                W[:, block[0] : block[-1] + 1] = windows[base[block]].T
            else:
                W[:, block] = windows[base[block]].T
    return W, first_bit


def decode_lanes(
    data: np.ndarray,
    starts: np.ndarray,
    bits: np.ndarray,
    counts: np.ndarray,
    table: LookupTable,
    by_symbol: np.ndarray,
    out: np.ndarray,
    entries: tuple[np.ndarray, np.ndarray | None] | None = None,
    helper: Executor | None = None,
    lane_tables: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Decode ``len(starts)`` chunks in lock step; return the bits each consumed.

    ``data``: uint8 stream bytes. Lane i starts at byte ``starts[i]``, declares
    ``bits[i]`` bits and ``counts[i]`` symbols (1 <= counts[i] <= out.shape[1]).
    ``out`` is a C-contiguous (lanes, steps) array of ``by_symbol``'s dtype; row i
    receives ``by_symbol[symbol]`` for lane i's symbols in its first ``counts[i]``
    entries (the rest is scratch). The result holds, per lane, the bits its
    ``counts[i]`` codes took; the caller compares it with ``bits``.
    ``entries``: ``table.entries(by_symbol)``, when the caller caches it.
    ``helper``: an executor whose thread copies each finished block of steps into
    ``out`` (the copy releases the GIL) while this thread decodes the next one
    into a second block. Memory besides ``out``: about the lanes' stream bytes,
    plus one or two blocks (at most BLOCK_BYTES each) and a few dozen bytes per lane.
    ``lane_tables``: (drop, base) per lane from :meth:`MixedTables.lane_arrays`, with
    ``table`` the :class:`MixedTables` and ``entries`` its concatenated entries: lanes
    of several tables at once.
    """
    n_lanes, steps = out.shape
    starts = np.asarray(starts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    bits = np.asarray(bits, dtype=np.int64)
    consumed = np.zeros(n_lanes, dtype=np.int64)
    if n_lanes == 0 or steps == 0:
        return consumed
    packed, wide = entries if entries is not None else table.entries(by_symbol)
    W, first_bit = _word_rows(data, starts, bits)
    flat_words = W.reshape(-1)
    take_word = flat_words.take
    take_next_word = flat_words[n_lanes:].take   # the word one row further
    take_entry = packed.take

    # A lane's bit position is 64 * (flat // n_lanes) + off, flat = row * n_lanes + lane.
    lane_ids = np.arange(n_lanes, dtype=np.int64)
    flat = lane_ids.copy()
    flat_bits = flat.view(np.uint64)             # the same (non-negative) values, for same-type adds
    off = first_bit.astype(np.uint64)
    window = np.empty(n_lanes, dtype=np.uint64)
    low = np.empty(n_lanes, dtype=np.uint64)
    shift = np.empty(n_lanes, dtype=np.uint64)
    pattern = np.empty(n_lanes, dtype=np.uint64)
    pattern_index = pattern.view(np.int64)       # < 2**L: the same bits as an index
    length = np.empty(n_lanes, dtype=np.uint64)
    stride = np.uint64(n_lanes)
    drop, base = (np.uint64(64 - table.max_length), None) if lane_tables is None else lane_tables
    word_bits = np.uint64(64)
    word_mask = np.uint64(63)
    one = np.uint64(1)
    k = table.symbols_per_refill
    block_steps = max(1, min(BLOCK_STEPS, steps, BLOCK_BYTES // (8 * n_lanes)))
    blocks = [empty_pages((block_steps, n_lanes), np.uint64) for _ in range(2 if helper is not None else 1)]
    itemsize = out.dtype.itemsize

    def value_view(block: np.ndarray) -> np.ndarray:
        if wide is None:
            return block.view(out.dtype)[:, 8 // itemsize // 2 :: 8 // itemsize]  # the high half's low bytes
        return block.view(np.uint32)[:, 1::2]  # symbols, mapped through ``wide`` at each flush

    def flush(values: np.ndarray, start: int, end: int) -> None:
        if wide is None:
            out[:, start:end] = values.T
        else:
            out[:, start:end] = wide.take(values.T)

    def position(lanes: np.ndarray) -> np.ndarray:
        return ((flat[lanes] - lanes) // n_lanes) * 64 + off[lanes].astype(np.int64) - first_bit[lanes]

    # Lanes whose count ends before the last step: record their position there.
    finish: dict[int, np.ndarray] = {}
    short = np.flatnonzero(counts < steps)
    for c in sorted(set(counts[short].tolist())):  # not np.unique: its first call imports numpy.ma (30 ms)
        finish[int(c)] = short[counts[short] == c]

    rows_of = [[block[i] for i in range(block_steps)] for block in blocks]
    values_of = [value_view(block) for block in blocks]
    pending: list[Future | None] = [None] * len(blocks)
    which = 0
    # The ufuncs as locals, and the loop body unrolled per refill: this loop makes
    # about 7 NumPy calls per symbol, so what Python does around them counts.
    shift_left, shift_right, subtract = np.left_shift, np.right_shift, np.subtract
    bit_and, bit_or, add, multiply = np.bitwise_and, np.bitwise_or, np.add, np.multiply
    saturate = SHIFTS_SATURATE
    six = np.uint64(6)
    step = 0
    try:
        while step < steps:
            block_start = step
            block_end = min(steps, step + block_steps)
            if pending[which] is not None:
                pending[which].result()  # this block's previous contents are in ``out``
            rows_of_block = rows_of[which]
            while step < block_end:
                # refill: the 64 bits at each lane's position
                take_word(flat, None, window, "clip")
                take_next_word(flat, None, low, "clip")
                shift_left(window, off, window)
                if saturate:
                    subtract(word_bits, off, shift)    # 64 at a word boundary: no bits from ``low``
                    shift_right(low, shift, low)
                else:
                    subtract(word_mask, off, shift)
                    shift_right(low, one, low)
                    shift_right(low, shift, low)
                bit_or(window, low, window)
                for row in rows_of_block[step - block_start : min(block_end, step + k) - block_start]:
                    shift_right(window, drop, pattern)
                    if base is not None:
                        add(pattern, base, pattern)
                    take_entry(pattern_index, None, row, "clip")
                    bit_and(row, LENGTH_MASK, length)
                    shift_left(window, length, window)
                    add(off, length, off)
                    step += 1
                    if step in finish:
                        consumed[finish[step]] = position(finish[step])
                # whole words consumed move the lane one row on (at most 64 bits per refill)
                shift_right(off, six, shift)
                bit_and(off, word_mask, off)
                multiply(shift, stride, shift)
                add(flat_bits, shift, flat_bits)
            filled = block_end - block_start
            if helper is None:
                flush(values_of[which][:filled], block_start, block_end)
            else:
                pending[which] = helper.submit(flush, values_of[which][:filled], block_start, block_end)
                which = 1 - which
    finally:
        for done_flush in pending:
            if done_flush is not None:
                done_flush.result()
    full = np.flatnonzero(counts >= steps)
    if full.size:
        consumed[full] = position(full)
    return consumed
