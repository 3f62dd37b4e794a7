"""Property-based tests (hypothesis) of the canonical Huffman codec and the chunking."""

from __future__ import annotations

import heapq
from fractions import Fraction

import numpy as np
import pytest
from bitarray import bitarray
from bitarray.util import canonical_decode
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moub_format import HuffmanError, MoubFile, huffman
from moub_format import constants as C
from moub_format.lanes import WINDOW_SLACK, LookupTable, MixedTables, decode_lanes
from moub_format.writer import HuffmanTensor, build, own_table

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def kraft(lengths) -> Fraction:
    return sum((Fraction(1, 2 ** int(n)) for n in lengths if n), Fraction(0))


frequencies = st.lists(st.integers(0, 10**9), min_size=1, max_size=300).map(lambda f: np.array(f, dtype=np.int64))


@FAST
@given(frequencies, st.integers(1, 20))
def test_code_lengths_are_complete_and_length_limited(freq, limit):
    used = int(np.count_nonzero(freq))
    assume(used <= 1 << limit)
    lengths = huffman.code_lengths(freq, limit)
    assert lengths.dtype == np.uint8 and lengths.size == freq.size
    assert ((lengths > 0) == (freq > 0)).all()
    if used == 0:
        return
    if used == 1:
        assert int(lengths.max()) == 1
        return
    assert int(lengths.max()) <= limit
    assert kraft(lengths) == 1
    huffman.validate_lengths(lengths)


@FAST
@given(frequencies)
def test_length_limiting_costs_little_over_plain_huffman(freq):
    used = int(np.count_nonzero(freq))
    assume(used >= 2)
    plain = huffman.encoded_bits(freq, huffman.code_lengths(freq, 60))
    limited = huffman.encoded_bits(freq, huffman.code_lengths(freq, huffman.writer_max_length(used)))
    total = int(freq.sum())
    entropy = -sum(f / total * np.log2(f / total) for f in freq if f) * total
    assert entropy - 1e-6 * total <= plain <= limited
    assert limited <= plain + 0.02 * total + 64  # the 15-bit limit is nearly free


def heap_huffman_lengths(freq: np.ndarray) -> np.ndarray:
    """Plain Huffman lengths from a heap of (frequency, id), leaves numbered by symbol and
    merged nodes after every symbol: the form ``code_lengths`` had before its two queues,
    whose ties decide which of several optimal codes the writer stores."""
    heap = [(int(freq[s]), int(s)) for s in np.flatnonzero(freq)]
    heapq.heapify(heap)
    parent: dict[int, int] = {}
    next_id = freq.size
    while len(heap) > 1:
        (f1, a), (f2, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = next_id
        heapq.heappush(heap, (f1 + f2, next_id))
        next_id += 1
    lengths = np.zeros(freq.size, np.int64)
    for s in np.flatnonzero(freq):
        node = int(s)
        while node in parent:
            node = parent[node]
            lengths[s] += 1
    return lengths


tied_frequencies = st.lists(st.integers(0, 6), min_size=2, max_size=300).map(lambda f: np.array(f, dtype=np.int64))


@FAST
@given(st.one_of(frequencies, tied_frequencies))
def test_code_lengths_are_the_heap_huffman_ones_ties_included(freq):
    assume(np.count_nonzero(freq) >= 2)
    assert np.array_equal(huffman.code_lengths(freq, 60), heap_huffman_lengths(freq))


lengths_tables = st.lists(st.integers(0, 22), min_size=1, max_size=40)


@FAST
@given(lengths_tables)
def test_tables_are_accepted_iff_kraft_is_one_or_the_one_symbol_case(raw):
    lengths = np.array(raw, dtype=np.uint8)
    used = int(np.count_nonzero(lengths))
    expected = (
        int(lengths.max()) <= C.MAX_CODE_LENGTH
        and used >= 1
        and (kraft(lengths) == 1 if used > 1 else int(lengths.max()) == 1)
    )
    try:
        huffman.validate_lengths(lengths)
        accepted = True
    except HuffmanError:
        accepted = False
    assert accepted == expected


def complete_tables(max_symbols: int = 64):
    """Random complete tables: code lengths of random frequencies under a random limit."""
    return st.builds(
        lambda f, limit: huffman.code_lengths(np.array(f, np.int64), max(limit, int(np.ceil(np.log2(max(2, len(f))))))),
        st.lists(st.integers(1, 10**6), min_size=2, max_size=max_symbols),
        st.integers(1, 20),
    )


@FAST
@given(complete_tables(), st.data())
def test_numpy_encoder_matches_bitarray_and_round_trips(lengths, data):
    k = lengths.size
    n = data.draw(st.integers(0, 3000))
    chunk = data.draw(st.integers(1, 700))
    indices = np.array(data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)), dtype=np.int64)
    stream, bits = huffman.encode_chunks(indices, lengths, chunk)
    assert len(bits) == -(-n // chunk)
    reference = [huffman.encode_reference(indices[s : s + chunk], lengths) for s in range(0, n, chunk)]
    assert stream == b"".join(r[0] for r in reference) and bits == [r[1] for r in reference]
    code_len = lengths.astype(np.int64)
    assert bits == [int(code_len[indices[s : s + chunk]].sum()) for s in range(0, n, chunk)]
    if n == 0:
        return
    # decode all chunks at once in lanes, and compare with the indices
    lookup = LookupTable(lengths)
    byte_len = [(b + 7) // 8 for b in bits]
    starts = np.concatenate([[0], np.cumsum(byte_len)[:-1]]).astype(np.int64)
    counts = np.array([min(chunk, n - s) for s in range(0, n, chunk)], dtype=np.int64)
    buffer = np.frombuffer(stream + bytes(WINDOW_SLACK), dtype=np.uint8)
    out = np.empty((len(bits), int(counts.max())), dtype=np.uint32)
    consumed = decode_lanes(buffer, starts, np.array(bits), counts, lookup, np.arange(k, dtype=np.uint32), out)
    assert consumed.tolist() == bits
    decoded = np.concatenate([out[i, : counts[i]] for i in range(len(bits))])
    assert np.array_equal(decoded, indices)


@FAST
@given(st.lists(complete_tables(), min_size=2, max_size=5), st.integers(1, 300), st.data())
def test_lanes_of_several_tables_decode_like_each_alone(tables, chunk, data):
    """Lanes of different tables in one lock step (MixedTables) give each lane the symbols
    and bit counts its own table gives it alone; values come from each table's own entries."""
    streams, lanes = [], []
    for t, lengths in enumerate(tables):
        n = data.draw(st.integers(1, 900))
        indices = np.array(data.draw(st.lists(st.integers(0, lengths.size - 1), min_size=n, max_size=n)), dtype=np.int64)
        stream, bits = huffman.encode_chunks(indices, lengths, chunk)
        streams.append(stream)
        lanes += [(t, b, min(chunk, n - s), indices[s : s + chunk]) for s, b in zip(range(0, n, chunk), bits)]
    order = data.draw(st.permutations(range(len(lanes))))  # lanes of the tables interleaved
    offsets = np.cumsum([0] + [len(s) for s in streams])
    byte_starts, position = [], 0
    for t, stream in enumerate(streams):
        for lane in (lane for lane in lanes if lane[0] == t):
            byte_starts.append(offsets[t] * 8 + position)  # bit position within the stream
            position += (lane[1] + 7) // 8 * 8
        position = 0
    starts = np.array([bs // 8 for bs in byte_starts], dtype=np.int64)[list(order)]
    picked = [lanes[i] for i in order]
    lookups = [LookupTable(lengths) for lengths in tables]
    values = [np.arange(lengths.size, dtype=np.uint32) * 7 + t for t, lengths in enumerate(tables)]
    mixed = MixedTables(lookups, [lk.entries(v)[0] for lk, v in zip(lookups, values)])
    table_of = np.array([lane[0] for lane in picked], dtype=np.int64)
    counts = np.array([lane[2] for lane in picked], dtype=np.int64)
    declared = np.array([lane[1] for lane in picked], dtype=np.int64)
    buffer = np.frombuffer(b"".join(streams) + bytes(WINDOW_SLACK), dtype=np.uint8)
    out = np.empty((len(picked), int(counts.max())), dtype=np.uint32)
    consumed = decode_lanes(buffer, starts, declared, counts, mixed, values[0], out, (mixed.entries, None),
                            lane_tables=mixed.lane_arrays(table_of))
    assert consumed.tolist() == declared.tolist()
    for i, (t, _, count, indices) in enumerate(picked):
        assert np.array_equal(out[i, :count], values[t][indices])


@FAST
@given(complete_tables(16), st.binary(min_size=1, max_size=40), st.sampled_from([-1, 0, 1, None]), st.data())
def test_lane_decoder_never_returns_a_wrong_count_silently(lengths, stream, count_offset, data):
    """Random bytes, declared bits and count (often the count bitarray finds, or one off):
    the lane decoder accepts exactly when bitarray decodes exactly ``count`` symbols from
    exactly those bits, and then agrees with it symbol for symbol."""
    n_bits = data.draw(st.integers(max(1, 8 * len(stream) - 7), 8 * len(stream)))
    bits = bitarray(endian="big")
    bits.frombytes(stream)
    del bits[n_bits:]
    count_table, symbols = huffman.canonical_tables(lengths)
    reference: list[int] = []
    try:
        for symbol in canonical_decode(bits, count_table, symbols):
            reference.append(symbol)
        ends_cleanly = True
    except ValueError:  # ends in the middle of a code
        ends_cleanly = False
    count = data.draw(st.integers(1, 400)) if count_offset is None else max(1, len(reference) + count_offset)
    lookup = LookupTable(lengths)
    buffer = np.frombuffer(stream + bytes(WINDOW_SLACK), dtype=np.uint8)
    out = np.empty((1, count), dtype=np.uint32)
    consumed = decode_lanes(buffer, np.array([0]), np.array([n_bits]), np.array([count]), lookup,
                            np.arange(lengths.size, dtype=np.uint32), out)
    exact = ends_cleanly and len(reference) == count
    assert (int(consumed[0]) == n_bits) == exact
    if exact:
        assert out[0].tolist() == reference


@FAST
@given(complete_tables(), st.integers(1, 2000), st.integers(1, 600), st.sampled_from([1, 10, 11, 16]), st.integers(0, 2**32 - 1))
def test_files_round_trip_for_random_chunk_sizes_and_dtypes(tmp_path_factory, lengths, n, chunk, dtype, seed):
    from moub_format import reader

    rng = np.random.default_rng(seed)
    reader_min_lanes = reader.MIN_LANES
    reader.MIN_LANES = int(rng.choice([0, 1 << 30]))  # lock-step lanes, or bitarray chunk by chunk
    k = lengths.size
    used = np.flatnonzero(lengths)
    indices = rng.choice(used, n)
    codebook = np.sort(rng.standard_normal(k)).astype(np.float32)
    tensors = [HuffmanTensor("init:a", "a", dtype, (n,), indices, 0), HuffmanTensor("init:b", "b", 1, (1, n), indices[::-1].copy(), 0)]
    data = build(b"", [codebook], tensors, tables=[lengths], chunk_elements=chunk)
    path = tmp_path_factory.mktemp("prop") / "p.moub"
    path.write_bytes(data)
    from moub_format import dtypes

    try:
        with MoubFile(path, batch_elements=int(rng.integers(1, 5000))) as moub:
            decoded = dict((t.path, a) for t, a in moub.iter_tensors())
            assert np.array_equal(moub.decode_indices(moub.index.tensors[0]), indices)
    finally:
        reader.MIN_LANES = reader_min_lanes
    assert decoded["init:a"].tobytes() == dtypes.cast_from_float32(codebook[indices], dtype).tobytes()
    assert np.array_equal(decoded["init:b"].ravel(), codebook[indices[::-1]])


@pytest.mark.parametrize("used, expected", [(1, 15), (2, 15), (16384, 15), (16385, 16), (65536, 17), (1 << 19, 20), (1 << 20, 20)])
def test_writer_code_length_limit(used, expected):
    assert huffman.writer_max_length(used) == expected


@FAST
@given(
    st.lists(st.tuples(st.integers(0, 400), st.sampled_from([1, 10, 11, 16]), st.floats(-1e3, 1e3, allow_nan=False, width=32)),
             min_size=1, max_size=8),
    st.integers(1, 300),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_packs_round_trip_for_random_members_chunks_and_dtypes(tmp_path_factory, members, chunk, grid, seed):
    """A pack's chunks ignore member boundaries: whatever the member sizes (empty ones too),
    chunk size, decoder (lanes or bitarray), window size, member dtypes and (over a grid)
    member offsets anywhere in the exact range, every member decodes to
    cast(float32(codebook[idx] + offset) * float32(scale)) computed here in NumPy (the sum
    in int64)."""
    from moub_format import dtypes, reader
    from moub_format.writer import OWN, GridCodebook, PackSpec

    rng = np.random.default_rng(seed)
    counts = [m[0] for m in members]
    assume(sum(counts) > 0)
    offsets = [0] * len(members)
    if grid:
        codebook = GridCodebook(int(rng.integers(-1000, 1000)), int(rng.integers(1, 300)))
        values = codebook.values()
        low = -(C.GRID_LIMIT - 1) - codebook.first                       # the lowest offset allowed
        high = C.GRID_LIMIT - 1 - (codebook.first + codebook.count - 1)   # the highest
        offsets = [int(rng.choice([0, low, high, rng.integers(low, high + 1), rng.integers(-50, 50)])) for _ in members]
    else:
        values = np.sort(rng.standard_normal(int(rng.integers(1, 300)))).astype(np.float32)
        codebook = values
    indices = rng.integers(0, values.size, sum(counts))
    sites = np.sort(rng.choice(1000, len(members), replace=False)).tolist()
    pack = PackSpec(tuple(sites), tuple(counts), [m[2] for m in members], indices, 0, OWN, offsets)
    data = build(b"", [codebook], [], packs=[pack], chunk_elements=chunk)
    path = tmp_path_factory.mktemp("packprop") / "p.moub"
    path.write_bytes(data)
    dtype_of = dict(zip(sites, (m[1] for m in members)))
    saved = reader.MIN_LANES
    reader.MIN_LANES = int(rng.choice([0, 1 << 30]))
    try:
        with MoubFile(path, batch_elements=int(rng.integers(1, 3000))) as moub:
            (info,) = moub.index.packs
            assert info.sites == tuple(sites) and info.counts == tuple(counts) and len(info.chunk_bits) == -(-sum(counts) // chunk)
            assert info.member_offsets == tuple(offsets) and info.offsets == (tuple(offsets) if any(offsets) else ())
            assert np.array_equal(moub.decode_indices(info), indices)
            got = [(m.site, a) for m, a in moub.iter_pack_members(dtype_of)]
    finally:
        reader.MIN_LANES = saved
    assert [s for s, _ in got] == sites
    start = 0
    for (site, array), (count, dtype, scale), offset in zip(got, members, offsets):
        if grid:
            levels = codebook.first + indices[start : start + count].astype(np.int64) + offset
            assert np.abs(levels).max(initial=0) < C.GRID_LIMIT
            product = levels.astype(np.float32) * np.float32(scale)
        else:
            product = values[indices[start : start + count]] * np.float32(scale)
        assert product.dtype == np.float32
        assert array.dtype == dtypes.STORAGE_DTYPES[dtype] and (array.size == 0 or array.ctypes.data % 64 == 0)
        assert array.tobytes() == dtypes.cast_from_float32(product, dtype).tobytes()
        start += count


# ---------------------------------------------------------------- packed code-length tables (format 1.2)


def grid_tables(max_levels: int = 3000):
    """Tables like a per-tensor uniform quantizer's: a grid of levels, a bell of frequencies
    (short codes in the middle, up to 15 bits in the tails) and unused levels in the tails."""
    def table(levels: int, spread: float, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        samples = np.clip(np.rint(rng.standard_t(4, 20000) * spread), -(levels // 2), levels - levels // 2 - 1).astype(np.int64)
        return own_table(np.bincount(samples + levels // 2, minlength=levels))

    return st.builds(table, st.integers(2, max_levels), st.floats(0.5, 400.0), st.integers(0, 2**32 - 1))


@FAST
@given(st.one_of(complete_tables(300), grid_tables()))
def test_packed_lengths_round_trip_through_the_codec_and_a_file(tmp_path_factory, lengths):
    """Any valid table packs to one canonical stream that inflates back to exactly it; the
    writer stores it packed iff that saves index bytes, and a reader gets the same lengths."""
    from moub_format.writer import GridCodebook, PackSpec

    packed = huffman.pack_lengths(lengths)
    assert packed == huffman.pack_lengths(lengths.copy())
    assert np.array_equal(huffman.unpack_lengths(packed, lengths.size), lengths)
    choice = huffman.packed_table(lengths)
    assert choice == (packed if len(packed) + C.PACKED_TABLE_OVERHEAD < lengths.size else None)
    used = np.flatnonzero(lengths)
    indices = np.repeat(used, 2)
    pack = PackSpec((0,), (indices.size,), (1.0,), indices, 0, 0)
    path = tmp_path_factory.mktemp("packedtables") / "t.moub"
    path.write_bytes(build(b"", [GridCodebook(0, lengths.size)], [], packs=[pack], tables=[lengths]))
    with MoubFile(path) as moub:
        assert np.array_equal(moub.index.tables[0], lengths)
        assert moub.index.table_bytes == ((len(packed),) if choice is not None else (lengths.size,))
        assert moub.index.table_is_packed(0) == (choice is not None)
        assert bool(moub.index.required_features & C.FEATURE_PACKED_TABLES) == (choice is not None)
        assert np.array_equal(moub.decode_indices(moub.index.packs[0]), indices)


@FAST
@given(st.one_of(st.binary(max_size=64), complete_tables(64).map(huffman.pack_lengths)), st.integers(0, 100), st.data())
def test_unpack_lengths_is_exact_or_a_huffman_error(stream, count, data):
    """Whatever the bytes (random, or a real stream cut, extended or flipped), the inflater
    returns exactly ``count`` lengths or raises HuffmanError: never more, never another error."""
    stream = bytearray(stream)
    edit = data.draw(st.sampled_from(["none", "cut", "extend", "flip"]))
    if edit == "cut" and stream:
        del stream[data.draw(st.integers(0, len(stream) - 1)):]
    elif edit == "extend":
        stream += data.draw(st.binary(min_size=1, max_size=8))
    elif edit == "flip" and stream:
        stream[data.draw(st.integers(0, len(stream) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    try:
        lengths = huffman.unpack_lengths(bytes(stream), count)
    except HuffmanError:
        return
    assert lengths.dtype == np.uint8 and lengths.size == count
