"""Table-driven Huffman decoding of many chunks at once ("lanes"), in NumPy.

Every chunk of an index stream decodes on its own (FORMAT.md §4.2), so a batch
of chunks is decoded in lock step: lane *i* is chunk *i*, and each NumPy call
advances all lanes by one symbol. The per-call overhead of NumPy is paid once
per step instead of once per symbol, which is what makes a pure-NumPy decoder
fast (tens of millions of symbols per second on one core).

One step, for all lanes at once:

* ``w``: the 64 stream bits starting at the lane's 16-bit word (a gather from
  ``W``, a lane-interleaved copy of the stream: row r holds word r of every
  lane, so the lanes touch neighbouring memory at every step);
* ``v = (w << off) >> (64 - L)``: the next ``L`` bits, L = the table's longest
  code; one 64-bit window serves ``k = 49 // L`` symbols before the next gather;
* ``len_table[v]`` and ``value_table[v]``: a lookup table of ``2**L`` entries
  built from the canonical code; the value is written, the length is added to
  the lane's bit offset.

Exactness: a table with a Kraft sum of exactly 1 has no invalid ``L``-bit
pattern and every code is at least one bit, so after exactly ``count`` steps a
lane has consumed exactly the bits of ``count`` codes. The caller compares that
with the declared ``chunk_bits``: equal means the chunk holds exactly ``count``
symbols and nothing else (a code that straddles the end, or one more symbol,
makes them differ). Lanes keep stepping after their own count (the last chunk
of a tensor is short); their extra output lands in the unused tail of their
row, and their bit position was recorded at their own count. Gathers clip
their indices, so a corrupt lane that runs past its data reads garbage that
the final comparison rejects, never memory outside the arrays. Every loop is
bounded by the declared element counts.
"""

from __future__ import annotations

import numpy as np

from .huffman import canonical_tables

WORD_BITS = 16            # the window array has one 64-bit window per 16-bit word
WORD_SHIFT = 4
WINDOW_SLACK = 8          # zero bytes a caller appends after the last lane's data
BLOCK_STEPS = 128         # steps decoded into a small buffer before one transposing copy
LANES_PER_BUILD = 256     # lanes of the window array built per block
MAX_SYMBOLS_PER_WINDOW = 6


class LookupTable:
    """The ``2**L``-entry decode table of one validated canonical code.

    ``entries[v]`` packs, for the L-bit pattern ``v``, the length of the code
    that is a prefix of ``v`` (low 32 bits) and its symbol (high 32 bits).
    Only for tables with at least two used symbols and a Kraft sum of exactly
    1 (checked by the caller; asserted here by the tiling).
    """

    def __init__(self, code_lengths: np.ndarray) -> None:
        code_lengths = np.asarray(code_lengths, dtype=np.int64)
        count, symbols = canonical_tables(code_lengths)
        self.max_length = len(count) - 1
        self.alphabet = code_lengths.size
        sorted_symbols = np.asarray(symbols, dtype=np.int64)
        sorted_lengths = code_lengths[sorted_symbols]
        spans = np.left_shift(1, self.max_length - sorted_lengths)
        if int(spans.sum()) != 1 << self.max_length:
            raise ValueError("lookup tables need a complete code (Kraft sum exactly 1)")
        # Canonical codes in (length, symbol) order are consecutive prefixes:
        # their L-bit ranges tile [0, 2**L) in that order.
        self.lengths = np.repeat(sorted_lengths.astype(np.uint64), spans)
        self.symbols = np.repeat(sorted_symbols.astype(np.uint64), spans)
        self.symbols_per_window = max(1, min(MAX_SYMBOLS_PER_WINDOW, (64 - (WORD_BITS - 1)) // self.max_length))

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
            return (bits[self.symbols.astype(np.intp)] << np.uint64(32)) | self.lengths, None
        return (self.symbols << np.uint64(32)) | self.lengths, by_symbol


def _windows(data: np.ndarray, word_base: np.ndarray, rows: int) -> np.ndarray:
    """W[r, lane] = the 64 bits (big-endian) starting at 16-bit word ``word_base[lane] + r``, flat.

    ``data`` must end with at least WINDOW_SLACK bytes the lanes do not own,
    so that every window a valid lane needs lies inside it; windows past the
    end of ``data`` read as zero. Built LANES_PER_BUILD lanes at a time: the
    native windows of their byte range, each lane's rows gathered from a
    sliding-window view (one contiguous copy per lane, in C), then one
    transposing copy into W. Besides W (4 bytes per stream byte), memory holds
    about 3 x one block's stream.
    """
    n_lanes = word_base.size
    n_words = (data.size - 8) // 2 + 1
    W = np.empty((rows, n_lanes), dtype=np.uint64)
    for a in range(0, n_lanes, LANES_PER_BUILD):
        b = min(n_lanes, a + LANES_PER_BUILD)
        bases = word_base[a:b]
        first = int(bases.min())
        last = min(n_words, int(bases.max()) + rows)
        words = np.zeros(last - first + rows, dtype=np.uint64)
        words[: last - first] = np.ndarray((last - first,), dtype=">u8", buffer=data, offset=2 * first, strides=(2,))
        windows = np.lib.stride_tricks.sliding_window_view(words, rows)
        W[:, a:b] = windows[bases - first].T
    return W.reshape(-1)


def decode_lanes(
    data: np.ndarray,
    starts: np.ndarray,
    bits: np.ndarray,
    counts: np.ndarray,
    table: LookupTable,
    by_symbol: np.ndarray,
    out: np.ndarray,
    entries: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> np.ndarray:
    """Decode ``len(starts)`` chunks in lock step; return the bits each consumed.

    ``data``: uint8 stream bytes with WINDOW_SLACK bytes after the last lane's
    data. Lane i starts at byte ``starts[i]``, declares ``bits[i]`` bits and
    ``counts[i]`` symbols (1 <= counts[i] <= out.shape[1]). ``out`` is a
    C-contiguous (lanes, steps) array of ``by_symbol``'s dtype; row i receives
    ``by_symbol[symbol]`` for lane i's symbols in its first ``counts[i]``
    entries (the rest is scratch). The result holds, per lane, the bits its
    ``counts[i]`` codes took; the caller compares it with ``bits``.
    ``entries``: ``table.entries(by_symbol)``, when the caller caches it.
    """
    n_lanes, steps = out.shape
    starts = np.asarray(starts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    bits = np.asarray(bits, dtype=np.int64)
    consumed = np.zeros(n_lanes, dtype=np.int64)
    if n_lanes == 0 or steps == 0:
        return consumed
    packed, wide = entries if entries is not None else table.entries(by_symbol)
    take_entry = packed.take
    word_base = starts >> 1
    first_bit = (starts & 1) * 8
    rows = int(((first_bit + bits + WORD_BITS - 1) >> WORD_SHIFT).max()) + 1
    W = _windows(data, word_base, rows)
    take_window = W.take

    # A lane's bit position is 16 * (flat // n_lanes) + offset, flat = row * n_lanes + lane.
    flat = np.arange(n_lanes, dtype=np.int64)
    flat_bits = flat.view(np.uint64)             # the same (non-negative) values, for same-type adds
    offset = first_bit.astype(np.uint64)
    window = np.empty(n_lanes, dtype=np.uint64)
    pattern = np.empty(n_lanes, dtype=np.uint64)
    pattern_index = pattern.view(np.int64)       # < 2**L: the same bits as an index
    advance = np.empty(n_lanes, dtype=np.uint64)
    stride = np.uint64(n_lanes)
    drop = np.uint64(64 - table.max_length)
    k = table.symbols_per_window
    block_steps = min(BLOCK_STEPS, steps)
    block = np.empty((block_steps, n_lanes), dtype=np.uint64)
    halves = block.view(np.uint32)               # (steps, 2 * lanes): [length, value] pairs
    itemsize = out.dtype.itemsize
    if wide is None:
        values = block.view(out.dtype)[:, 8 // itemsize // 2 :: 8 // itemsize]  # the high half's low bytes
    else:
        values = halves[:, 1::2]                 # symbols, mapped through ``wide`` at each flush

    # Lanes whose count ends before the last step: record their position there.
    finish: dict[int, np.ndarray] = {}
    short = np.flatnonzero(counts < steps)
    for c in np.unique(counts[short]).tolist():
        finish[int(c)] = short[counts[short] == c]

    rows_of_block = [block[i] for i in range(block_steps)]
    lengths_of_block = [halves[i, 0::2] for i in range(block_steps)]
    step = 0
    while step < steps:
        block_start = step
        block_end = min(steps, step + block_steps)
        while step < block_end:
            take_window(flat, None, window, "clip")
            for _ in range(min(k, block_end - step)):
                np.left_shift(window, offset, out=pattern)
                np.right_shift(pattern, drop, out=pattern)
                take_entry(pattern_index, None, rows_of_block[step - block_start], "clip")
                np.add(offset, lengths_of_block[step - block_start], out=offset)
                step += 1
                done = finish.get(step)
                if done is not None:
                    consumed[done] = ((flat[done] - done) // n_lanes) * WORD_BITS + offset[done].astype(np.int64) - first_bit[done]
            np.right_shift(offset, WORD_SHIFT, out=advance)
            np.bitwise_and(offset, WORD_BITS - 1, out=offset)
            np.multiply(advance, stride, out=advance)
            np.add(flat_bits, advance, out=flat_bits)
        filled = block_end - block_start
        if wide is None:
            out[:, block_start:block_end] = values[:filled].T
        else:
            out[:, block_start:block_end] = wide.take(values[:filled].T)
    full = counts >= steps
    consumed[full] = ((flat[full] - np.flatnonzero(full)) // n_lanes) * WORD_BITS + offset[full].astype(np.int64) - first_bit[full]
    return consumed
