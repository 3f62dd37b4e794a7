"""Canonical, length-limited Huffman coding of codebook indices, on bitarray.

A table is stored as one code length per symbol (0 = symbol unused), as in
DEFLATE. Codes are assigned canonically: by length, then by symbol value, so
the lengths alone define the code and the encoder and decoder always agree.

bitarray's ``canonical_decode`` accepts over-subscribed tables silently and
reports holes in incomplete ones as "reached end of bitarray", so every table
is checked here to have a Kraft sum of exactly 1 (or to be the one-symbol
table, whose single code is ``0``) before a bit is decoded.

Since format 1.2 a table may also be stored *packed*: the same bytes as one raw
DEFLATE stream (:func:`pack_lengths`), inflated by :func:`unpack_lengths` with a
hard output limit. Long tables of grid codebooks (smooth lengths, runs of unused
tail levels) shrink 2 to 7 times.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from bitarray import bitarray
from bitarray.util import canonical_decode

from . import constants as C
from .constants import MAX_CODE_LENGTH, WRITER_CODE_LENGTH
from .errors import HuffmanError


def _unlimited_lengths(frequencies: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Plain Huffman code lengths of the ``used`` symbols (in that order).

    Two queues instead of a heap (van Leeuwen): the leaves sorted by (frequency, symbol),
    and the merged nodes, which come out in order of frequency as they are made. Taking
    the leaf on equal frequencies and the older merged node among merged ones pops
    exactly what a heap of (frequency, id) would, with leaves numbered by symbol and
    merged nodes numbered after every symbol: the same tree, so the same lengths as a
    heap gives. Why two queues: the converter sizes every candidate's packs with these
    lengths, thousands of tables per search, and a heap with a dictionary per node makes
    that a large share of a whole conversion.
    """
    freq = frequencies[used]
    order = np.lexsort((used, freq))
    leaf = freq[order].tolist()
    n = len(leaf)
    merged = [0] * (n - 1)  # merged node k's frequency; made in order of frequency
    left = [0] * (n - 1)    # its children, numbered: leaves 0..n-1 (in ``order``), merged n..2n-2
    right = [0] * (n - 1)
    i = j = 0
    for k in range(n - 1):  # before step k, merged nodes j..k-1 wait in the second queue
        if j >= k or (i < n and leaf[i] <= merged[j]):
            fa, a, i = leaf[i], i, i + 1
        else:
            fa, a, j = merged[j], n + j, j + 1
        if j >= k or (i < n and leaf[i] <= merged[j]):
            fb, b, i = leaf[i], i, i + 1
        else:
            fb, b, j = merged[j], n + j, j + 1
        merged[k], left[k], right[k] = fa + fb, a, b
    depth = [0] * (2 * n - 1)
    for k in range(n - 2, -1, -1):  # the root (made last) first: a node's parent is made after it
        depth[left[k]] = depth[right[k]] = depth[n + k] + 1
    lengths = np.empty(n, dtype=np.int64)
    lengths[order] = depth[:n]
    return lengths


def _limit_lengths(lengths: np.ndarray, frequencies: np.ndarray, max_length: int) -> np.ndarray:
    """Clamp lengths to ``max_length`` and repair the Kraft sum to exactly 1.

    The heuristic (as in JPEG/zlib encoders): lengthen the rarest short codes
    until the clamped code fits, then shorten the most frequent codes while
    room remains. Every Kraft term is a multiple of 2^-max_length, so the
    final fill with the longest codes always lands on exactly 1.
    """
    used = np.flatnonzero(lengths)
    by_rarity = used[np.lexsort((-used, frequencies[used]))].tolist()  # rarest first; ties: higher symbol first
    length = dict(zip(by_rarity, np.minimum(lengths[by_rarity], max_length).tolist()))  # plain ints: a fast loop
    unit = 1 << max_length
    kraft = sum(1 << (max_length - n) for n in length.values())
    while kraft > unit:
        for s in by_rarity:
            if length[s] < max_length:
                kraft -= 1 << (max_length - length[s] - 1)
                length[s] += 1
                if kraft <= unit:
                    break
    for s in reversed(by_rarity):  # most frequent first
        while length[s] > 1 and kraft + (1 << (max_length - length[s])) <= unit:
            kraft += 1 << (max_length - length[s])
            length[s] -= 1
    lengths = lengths.copy()
    lengths[by_rarity] = list(length.values())
    assert kraft == unit, "length limiting failed to produce a complete code"
    return lengths


def code_lengths(frequencies: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Length-limited Huffman code lengths, one uint8 per symbol (0 for unused).

    One used symbol gets length 1. ``max_length`` must allow the alphabet:
    2**max_length >= number of used symbols.
    """
    frequencies = np.asarray(frequencies, dtype=np.int64)
    used = np.flatnonzero(frequencies > 0)
    lengths = np.zeros(frequencies.size, dtype=np.uint8)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    if used.size > (1 << max_length):
        raise ValueError(f"{used.size} symbols cannot be coded with codes of at most {max_length} bits")
    raw = np.zeros(frequencies.size, dtype=np.int64)
    raw[used] = _unlimited_lengths(frequencies, used)
    if raw.max() > max_length:
        raw = _limit_lengths(raw, frequencies, max_length)
    return raw.astype(np.uint8)


def writer_max_length(used_symbols: int) -> int:
    """The code-length limit writers use: WRITER_CODE_LENGTH (15) bits, or more when
    the alphabet needs it (at least 1 + log2 of the used symbols), never above
    MAX_CODE_LENGTH. Limiting 20-bit codes to 15 costs about 0.003 bits/weight on
    real models and keeps the decoder's table small and its windows 3 codes long."""
    return min(MAX_CODE_LENGTH, max(WRITER_CODE_LENGTH, (max(used_symbols, 1) - 1).bit_length() + 1))


def encoded_bits(frequencies: np.ndarray, lengths: np.ndarray) -> int:
    """Exact payload bits of coding symbols with these frequencies and lengths."""
    return int(np.dot(np.asarray(frequencies, dtype=np.int64), np.asarray(lengths, dtype=np.int64)))


LENGTHS_BINCOUNT_MAX = 1 << 16  # tables up to this many lengths are counted in one bincount


def validate_lengths(lengths: np.ndarray, max_length: int = MAX_CODE_LENGTH, subject: str = "huffman table") -> None:
    """Raise HuffmanError unless ``lengths`` is a complete prefix code.

    Complete means Kraft sum exactly 1, or the one-symbol table with length 1.
    Done with Python ints, so no sum can wrap.
    """
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        raise HuffmanError(f"{subject}: code-length table is empty")
    longest = int(lengths.max())
    if longest > max_length:
        raise HuffmanError(f"{subject}: code length {longest} exceeds the limit {max_length}")
    if lengths.size <= LENGTHS_BINCOUNT_MAX:
        histogram = np.bincount(lengths.astype(np.int64), minlength=max_length + 1).tolist()
    else:  # length by length: bincount would first widen every length to 8 bytes (128 MiB for 2^24)
        histogram = [int(np.count_nonzero(lengths == length)) for length in range(max_length + 1)]
    used = int(lengths.size - histogram[0])
    if used == 0:
        raise HuffmanError(f"{subject}: no symbol has a code")
    if used == 1:
        if longest != 1:
            raise HuffmanError(f"{subject}: a one-symbol table must use length 1, not {longest}")
        return
    kraft = sum(int(histogram[length]) << (max_length - length) for length in range(1, max_length + 1))
    if kraft != 1 << max_length:
        state = "over-subscribed" if kraft > (1 << max_length) else "incomplete"
        raise HuffmanError(
            f"{subject}: code lengths are {state} (Kraft sum {kraft}/{1 << max_length}, must be exactly 1)"
        )


MIN_DEFLATE_BYTES = 3  # the shortest raw DEFLATE stream of a non-empty input: 3 header bits, a literal, end of block


def pack_lengths(lengths: np.ndarray) -> bytes:
    """The packed form of a code-length table (format 1.2): one raw DEFLATE stream of its
    bytes at fixed settings (level 9, default strategy), so the same table gives the same bytes."""
    compressor = zlib.compressobj(C.TABLE_DEFLATE_LEVEL, zlib.DEFLATED, C.TABLE_DEFLATE_WBITS, C.TABLE_DEFLATE_MEMLEVEL)
    return compressor.compress(np.ascontiguousarray(lengths, dtype=np.uint8).tobytes()) + compressor.flush()


def packed_table(lengths: np.ndarray) -> bytes | None:
    """What a writer stores for a table when it may pack: the packed stream if it saves index
    bytes (``len(packed) + PACKED_TABLE_OVERHEAD < entries``; the count field costs 4), else
    None (the plain ``code_lengths``). Small tables stay plain."""
    if np.asarray(lengths).size <= MIN_DEFLATE_BYTES + C.PACKED_TABLE_OVERHEAD:
        return None  # cannot pay: skip the compressor (the converter asks for thousands of small tables)
    packed = pack_lengths(lengths)
    return packed if len(packed) + C.PACKED_TABLE_OVERHEAD < np.asarray(lengths).size else None


def unpack_lengths(data: bytes | memoryview | np.ndarray, count: int, subject: str = "huffman table") -> np.ndarray:
    """Inflate a packed table to exactly ``count`` code lengths (uint8), or raise HuffmanError.

    The output is capped at ``count + 1`` bytes whatever the stream says (no bomb); the
    stream must be valid DEFLATE, end exactly at the end of ``data`` and yield exactly
    ``count`` bytes. The lengths themselves are checked by :func:`validate_lengths`."""
    inflater = zlib.decompressobj(C.TABLE_DEFLATE_WBITS)
    try:
        out = inflater.decompress(bytes(data), count + 1)
    except zlib.error as exc:
        raise HuffmanError(f"{subject}: packed_lengths is not a valid DEFLATE stream ({exc})") from None
    if len(out) > count:
        raise HuffmanError(f"{subject}: packed_lengths inflates past its count of {count} code lengths")
    if not inflater.eof:
        raise HuffmanError(f"{subject}: packed_lengths is truncated: its DEFLATE stream does not end ({len(out)} of {count} bytes)")
    if inflater.unused_data:
        raise HuffmanError(f"{subject}: {len(inflater.unused_data)} bytes after the end of the packed_lengths DEFLATE stream")
    if len(out) < count:
        raise HuffmanError(f"{subject}: packed_lengths inflates to {len(out)} bytes, count is {count}")
    return np.frombuffer(out, dtype=np.uint8).copy()


def canonical_tables(lengths: np.ndarray) -> tuple[list[int], list[int]]:
    """(count, symbol) lists as DEFLATE and bitarray's canonical_decode use them."""
    count, symbols = canonical_order(lengths)
    return count, symbols.tolist()


def canonical_order(lengths: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Codes per length (index 0 unused) and the used symbols in canonical (length, symbol)
    order, as an int64 array. ``lengths`` is a validated table."""
    lengths = np.asarray(lengths)
    used = np.flatnonzero(lengths)
    used_lengths = lengths[used].astype(np.uint8)  # validated: 1..MAX_CODE_LENGTH
    count = np.bincount(used_lengths, minlength=int(used_lengths.max()) + 1).tolist()
    count[0] = 0
    # Only the used symbols are sorted, stably by length (a radix sort on uint8): grid tables
    # run to hundreds of thousands of mostly unused entries, and sorting all of them costs
    # milliseconds per table.
    return count, used[np.argsort(used_lengths, kind="stable")]


def canonical_codes(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-symbol canonical code values (uint64) and their lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    count, symbols = canonical_tables(lengths)
    codes = np.zeros(lengths.size, dtype=np.uint64)
    code = 0
    position = 0
    for length in range(1, len(count)):
        code <<= 1
        for symbol in symbols[position : position + count[length]]:
            codes[symbol] = code
            code += 1
        position += count[length]
    return codes, lengths


def encode_reference(indices: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """bitarray's encoder: the reference the NumPy encoder is tested against."""
    codes, code_len = canonical_codes(lengths)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        return b"", 0
    used = np.unique(indices)
    if (code_len[used] == 0).any():
        raise ValueError("an index has no code in this table")
    codedict = {int(s): bitarray(format(int(codes[s]), f"0{int(code_len[s])}b"), endian="big") for s in used}
    bits = bitarray(endian="big")
    bits.encode(codedict, indices.tolist())
    return bits.tobytes(), len(bits)


ENCODE_SLICE_ELEMENTS = 1 << 20  # elements coded per vectorised pass (bounds the encoder's memory)


def _encode_slice(indices: np.ndarray, codes: np.ndarray, code_len: np.ndarray, chunk_elements: int) -> tuple[bytes, list[int]]:
    """Code whole chunks of ``indices`` (the last may be short): bytes and exact bits per chunk."""
    n = indices.size
    lengths = code_len[indices]
    if not lengths.all():
        raise ValueError("an index has no code in this table")
    values = codes[indices]
    chunk_starts = np.arange(0, n, chunk_elements, dtype=np.int64)
    chunk_bits = np.add.reduceat(lengths, chunk_starts)
    chunk_bytes = (chunk_bits + 7) >> 3
    chunk_base = np.zeros(chunk_starts.size, dtype=np.int64)
    np.cumsum(chunk_bytes[:-1] * 8, out=chunk_base[1:])
    total_bytes = int(chunk_bytes.sum())
    # Absolute bit position of every code: chunk base + exclusive running sum inside the chunk.
    ends = np.cumsum(lengths)
    position = ends - lengths
    position -= np.repeat(position[chunk_starts] - chunk_base, np.diff(np.append(chunk_starts, n)))
    del ends
    word = position >> 6
    end = (position & 63) + lengths          # where the code ends inside its 64-bit word, 1..83
    del position
    shift = 64 - end                         # > 0: room after the code; < 0: bits that spill over
    high = np.where(shift >= 0, values << np.maximum(shift, 0).astype(np.uint64), values >> np.maximum(-shift, 0).astype(np.uint64))
    words = np.zeros(total_bytes // 8 + 2, dtype=np.uint64)
    new_word = np.empty(n, dtype=bool)
    new_word[0] = True
    np.not_equal(word[1:], word[:-1], out=new_word[1:])
    group_starts = np.flatnonzero(new_word)
    words[word[group_starts]] = np.bitwise_or.reduceat(high, group_starts)
    spill = np.flatnonzero(end > 64)        # at most one code crosses each word boundary
    if spill.size:
        words[word[spill] + 1] |= values[spill] << (128 - end[spill]).astype(np.uint64)
    data = words.astype(">u8").tobytes()[:total_bytes]
    return data, chunk_bits.tolist()


def encode_chunks(indices: np.ndarray, lengths: np.ndarray, chunk_elements: int) -> tuple[bytes, list[int]]:
    """Huffman-code ``indices`` in chunks of ``chunk_elements``, each starting on a byte.

    Returns the concatenated chunk bytes (zero padding bits) and each chunk's
    exact bit length. Vectorised NumPy; bit-identical to :func:`encode_reference`
    applied chunk by chunk.
    """
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements {chunk_elements} must be at least 1")
    indices = np.asarray(indices).reshape(-1)
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= len(lengths)):
        raise ValueError("an index lies outside the code-length table")
    codes, code_len = canonical_codes(lengths)
    step = max(1, ENCODE_SLICE_ELEMENTS // chunk_elements) * chunk_elements
    parts: list[bytes] = []
    bits: list[int] = []
    for start in range(0, indices.size, step):
        piece = indices[start : start + step].astype(np.intp, copy=False)  # per slice: no index-sized copy
        data, chunk_bits = _encode_slice(piece, codes, code_len, chunk_elements)
        parts.append(data)
        bits.extend(chunk_bits)
    return b"".join(parts), bits


def encode(indices: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """Huffman-code ``indices`` as one stream; return (bytes padded with zero bits, exact bit length)."""
    indices = np.asarray(indices).reshape(-1)
    if indices.size == 0:
        return b"", 0
    data, bits = encode_chunks(indices, lengths, indices.size)
    return data, bits[0]


class CanonicalDecoder:
    """Decodes chunks coded with one validated table; prepares the canonical lists once."""

    def __init__(self, lengths: np.ndarray) -> None:
        self.count, self.symbols = canonical_tables(lengths)

    def decode(self, data: bytes | memoryview, n_bits: int, n_elements: int, subject: str = "stream") -> np.ndarray:
        """Decode exactly ``n_elements`` symbols from the first ``n_bits`` of ``data``.

        Raises HuffmanError if the stream ends early, ends mid-code, or has
        bits left over; padding bits after ``n_bits`` must be zero.
        """
        if len(data) != (n_bits + 7) // 8:
            raise HuffmanError(f"{subject}: {n_bits} bits do not fill {len(data)} stored bytes exactly")
        bits = bitarray(endian="big")
        bits.frombytes(bytes(data))
        if n_bits % 8 and bits[n_bits:].any():
            raise HuffmanError(f"{subject}: padding bits after bit {n_bits} are not zero")
        del bits[n_bits:]
        if n_elements == 0:
            if n_bits:
                raise HuffmanError(f"{subject}: {n_bits} bits for zero elements")
            return np.zeros(0, dtype=np.uint32)
        if len(self.symbols) == 1:
            if n_bits != n_elements or bits.any():
                raise HuffmanError(f"{subject}: one-symbol stream must be {n_elements} zero bits, got {n_bits} bits")
            return np.full(n_elements, self.symbols[0], dtype=np.uint32)
        iterator = canonical_decode(bits, self.count, self.symbols)
        try:
            out = np.fromiter(iterator, dtype=np.uint32, count=n_elements)
        except ValueError as exc:  # fewer symbols than declared, or a code cut in half
            raise HuffmanError(f"{subject}: stream ends before {n_elements} elements ({exc})") from None
        try:
            next(iterator)
        except StopIteration:
            return out
        except ValueError:
            pass
        raise HuffmanError(f"{subject}: stream holds more than {n_elements} elements")


def decode(data: bytes, n_bits: int, lengths: np.ndarray, n_elements: int, subject: str = "stream") -> np.ndarray:
    """One-shot :meth:`CanonicalDecoder.decode` (the table must be validated)."""
    return CanonicalDecoder(lengths).decode(data, n_bits, n_elements, subject)


def lengths_sequence(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Normalise a code-length table to a uint8 array."""
    return np.asarray(lengths, dtype=np.uint8)
