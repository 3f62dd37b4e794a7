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
MAX_SYMBOLS_PER_WINDOW = 6
W_ROWS_PER_BUILD = 64     # rows of W built per fancy-index call (bounds the index matrix)


class LookupTable:
    """The ``2**L``-entry decode table of one validated canonical code.

    ``lengths[v]`` is the length of the code that is a prefix of the L-bit
    pattern ``v``, ``symbols[v]`` its symbol. Only for tables with at least two
    used symbols and a Kraft sum of exactly 1 (checked by the caller; asserted
    here by the tiling).
    """

    def __init__(self, code_lengths: np.ndarray) -> None:
        code_lengths = np.asarray(code_lengths, dtype=np.int64)
        count, symbols = canonical_tables(code_lengths)
        self.max_length = len(count) - 1
        sorted_symbols = np.asarray(symbols, dtype=np.int64)
        sorted_lengths = code_lengths[sorted_symbols]
        spans = np.left_shift(1, self.max_length - sorted_lengths)
        if int(spans.sum()) != 1 << self.max_length:
            raise ValueError("lookup tables need a complete code (Kraft sum exactly 1)")
        # Canonical codes in (length, symbol) order are consecutive prefixes:
        # their L-bit ranges tile [0, 2**L) in that order.
        self.lengths = np.repeat(sorted_lengths.astype(np.uint8), spans)
        self.symbols = np.repeat(sorted_symbols.astype(np.uint32), spans)
        self.symbols_per_window = max(1, min(MAX_SYMBOLS_PER_WINDOW, (64 - (WORD_BITS - 1)) // self.max_length))

    def values(self, by_symbol: np.ndarray) -> np.ndarray:
        """The value table: ``by_symbol[symbols[v]]`` for every pattern v."""
        return np.ascontiguousarray(by_symbol)[self.symbols]


def _windows(data: np.ndarray, word_base: np.ndarray, rows: int) -> np.ndarray:
    """W[r, lane] = the 64 bits (big-endian) starting at 16-bit word ``word_base[lane] + r``.

    ``data`` must end with at least WINDOW_SLACK bytes the lanes do not own
    (zeros), so that every window a valid lane needs lies inside it.
    """
    n_lanes = word_base.size
    n_words = (data.size - 8) // 2 + 1
    # Little-endian u64 view at every 16-bit boundary (no copy), byte-swapped after the gather.
    words = np.ndarray((n_words,), dtype="<u8", buffer=data, offset=0, strides=(2,))
    out = np.empty((rows, n_lanes), dtype=np.uint64)
    last = np.int64(n_words - 1)
    for r0 in range(0, rows, W_ROWS_PER_BUILD):
        r1 = min(rows, r0 + W_ROWS_PER_BUILD)
        index = word_base[None, :] + np.arange(r0, r1, dtype=np.int64)[:, None]
        np.minimum(index, last, out=index)
        out[r0:r1] = words[index]
    out.byteswap(inplace=True)
    return out.reshape(-1)


def decode_lanes(
    data: np.ndarray,
    starts: np.ndarray,
    bits: np.ndarray,
    counts: np.ndarray,
    table: LookupTable,
    value_table: np.ndarray,
    out: np.ndarray,
) -> np.ndarray:
    """Decode ``len(starts)`` chunks in lock step; return the bits each consumed.

    ``data``: uint8 stream bytes, with WINDOW_SLACK zero bytes after the last
    lane's data. Lane i starts at byte ``starts[i]``, declares ``bits[i]`` bits
    and ``counts[i]`` symbols (1 <= counts[i] <= out.shape[1]). ``out`` is a
    C-contiguous (lanes, steps) array of value_table's dtype; row i receives
    lane i's values in its first ``counts[i]`` entries (the rest is scratch).
    The result holds, per lane, the number of bits its ``counts[i]`` codes
    took; the caller must compare it with ``bits``.
    """
    n_lanes, steps = out.shape
    starts = np.asarray(starts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    bits = np.asarray(bits, dtype=np.int64)
    consumed = np.zeros(n_lanes, dtype=np.int64)
    if n_lanes == 0 or steps == 0:
        return consumed
    L = table.max_length
    word_base = starts >> 1
    first_bit = (starts & 1) * 8
    # Rows a valid lane can need: its own words plus the 64-bit window at its last code.
    rows = int(((first_bit + bits + WORD_BITS - 1) >> WORD_SHIFT).max()) + 1
    W = _windows(data, word_base, rows)
    take_window, take_value, take_length = W.take, value_table.take, table.lengths.take

    # Bit positions are kept as (row, offset-in-window); p = row * 16 + offset.
    position = first_bit.copy()
    row = np.empty(n_lanes, dtype=np.int64)
    flat = np.empty(n_lanes, dtype=np.int64)
    window = np.empty(n_lanes, dtype=np.uint64)
    pattern = np.empty(n_lanes, dtype=np.uint64)
    pattern_index = pattern.view(np.int64)       # < 2**L: the same bits as an index
    offset = np.empty(n_lanes, dtype=np.uint64)
    length = np.empty(n_lanes, dtype=np.uint8)
    lane_ids = np.arange(n_lanes, dtype=np.int64)
    stride = np.int64(n_lanes)
    drop = np.uint64(64 - L)
    k = table.symbols_per_window
    block = np.empty((min(BLOCK_STEPS, steps), n_lanes), dtype=out.dtype)

    # Lanes whose count ends before the last step: record their position there.
    finish: dict[int, np.ndarray] = {}
    short = np.flatnonzero(counts < steps)
    for c in np.unique(counts[short]).tolist():
        finish[int(c)] = short[counts[short] == c]

    step = 0
    while step < steps:
        block_start = step
        block_end = min(steps, step + BLOCK_STEPS)
        while step < block_end:
            np.right_shift(position, WORD_SHIFT, out=row)
            np.multiply(row, stride, out=flat)
            np.add(flat, lane_ids, out=flat)
            take_window(flat, None, window, "clip")
            np.bitwise_and(position, WORD_BITS - 1, out=offset, casting="unsafe")
            for _ in range(min(k, block_end - step)):
                np.left_shift(window, offset, out=pattern)
                np.right_shift(pattern, drop, out=pattern)
                take_value(pattern_index, None, block[step - block_start], "clip")
                take_length(pattern_index, None, length, "clip")
                np.add(offset, length, out=offset, casting="unsafe")
                step += 1
                done = finish.get(step)
                if done is not None:
                    consumed[done] = (row[done] << WORD_SHIFT) + offset[done].astype(np.int64) - first_bit[done]
            np.left_shift(row, WORD_SHIFT, out=position)
            np.add(position, offset, out=position, casting="unsafe")
        out[:, block_start:block_end] = block[: block_end - block_start].T
    full = counts >= steps
    consumed[full] = position[full] - first_bit[full]
    return consumed
