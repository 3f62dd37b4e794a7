"""Format 1.2 through the writer, the converter's encoder and the runtime: packs, grid
codebooks, LZMA, small alignments, on a model with weights everywhere."""

from __future__ import annotations

import json
import lzma
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import modelzoo
import moub_runtime
import packing
from moub_converters.encode import PackAssignment, TensorAssignment, dequantize_scaled, encode_model
from moub_format import CodebookError, MoubFile, build, dtypes, scale_member
from moub_format import constants as C
from moub_format import huffman, writer
from moub_format.writer import OWN, SMALLEST, GridCodebook, HuffmanTensor, PackSpec
from moub_runtime.payload import clear_payload
from moub_runtime.sites import iter_tensor_sites, tensor_sites

# Members everywhere: main-graph initializers of every float dtype, a Constant node, an If
# and a Loop subgraph, a model function; the second group is listed out of site order.
GROUPS = [
    ["init:W_shared", "init:W_half", "node:0/value", "func:0/node:0/value"],
    ["node:13/body/init:W_loop", "init:W_bf16", "init:W_double", "init:small_bias", "node:12/then_branch/init:W_then"],
]


def _encode(model, codebooks, packs, **options) -> bytes:
    options = {"graph_codec": C.CODEC_LZMA, "raw_codec": SMALLEST, **options}
    return encode_model(model, codebooks, {}, {"source": "packs"}, packs=packs, **options)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    model = modelzoo.everything_model()
    codebooks, packs = packing.uniform_packs(model, GROUPS, divisor=16.0, table=OWN)
    path = tmp_path_factory.mktemp("packs") / "everything.moub"
    path.write_bytes(_encode(model, codebooks, packs))
    return model, codebooks, packs, path


def test_members_decode_bit_exact_in_every_dtype_and_place(packed):
    model, codebooks, packs, path = packed
    loaded = tensor_sites(moub_runtime.load(path))
    expected = packing.expected_members(model, codebooks, packs)
    assert len(expected) == 9
    dtypes_seen = set()
    for site_path, data in expected.items():
        tensor = loaded[site_path].tensor
        assert tensor.raw_data == data, site_path
        assert tensor.data_type == tensor_sites(model)[site_path].tensor.data_type
        dtypes_seen.add(tensor.data_type)
    assert dtypes_seen == {1, 10, 11, 16}


def test_converter_helper_gives_the_runtime_bits(packed):
    model, codebooks, packs, path = packed
    decoded = dict(moub_runtime.decode_tensors(path))
    sites = tensor_sites(model)
    for pack in packs:
        start = 0
        for site_path, scale in zip(pack.paths, pack.scales):
            tensor = sites[site_path].tensor
            n = int(np.prod(tensor.dims))
            mine = dequantize_scaled(codebooks[pack.codebook], pack.indices[start : start + n], scale, tensor.data_type)
            assert mine.tobytes() == decoded[site_path].tobytes()
            assert decoded[site_path].shape == tuple(tensor.dims)
            start += n


def test_everything_else_is_byte_identical(packed):
    model, _, packs, path = packed
    members = {p for pack in packs for p in pack.paths}
    a, b = onnx.ModelProto(), onnx.ModelProto()
    a.CopyFrom(model)
    b.CopyFrom(moub_runtime.load(path))
    for m in (a, b):
        for site in iter_tensor_sites(m):
            if site.path in members:
                clear_payload(site.tensor)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_onnxruntime_runs_it_and_the_session_agrees(packed):
    model, _, _, path = packed
    feeds = modelzoo.sample_feeds()
    decoded = ort.InferenceSession(moub_runtime.load(path).SerializeToString(), providers=["CPUExecutionProvider"])
    direct = moub_runtime.InferenceSession(path)
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, via_session, ref in zip(decoded.run(None, feeds), direct.run(None, feeds), original.run(None, feeds)):
        np.testing.assert_array_equal(got, via_session)
        assert got.shape == ref.shape
    y_ref, y = original.run(None, feeds)[0], decoded.run(None, feeds)[0]
    assert float((y_ref * y).sum() / np.linalg.norm(y_ref) / np.linalg.norm(y)) > 0.99


def test_streaming_yields_every_stored_site_once(packed):
    model, _, packs, path = packed
    seen = [p for p, _ in moub_runtime.decode_tensors(path)]
    assert len(seen) == len(set(seen))
    assert set(seen) >= {p for pack in packs for p in pack.paths} | {"init:table"}


def test_the_file_uses_packs_grids_and_lzma(packed):
    _, _, _, path = packed
    with MoubFile(path) as moub:
        index = moub.index
        assert (index.format_major, index.format_minor) == (1, 4)
        assert index.required_features == (C.FEATURE_PACKS | C.FEATURE_LZMA | C.FEATURE_PACKED_TABLES
                                           | C.FEATURE_COMPACT_PACKS)
        assert all(p.compact for p in index.packs)
        assert [p.sites for p in index.packs] == [(0, 1, 7, 10), (2, 3, 4, 8, 9)]
        assert all(index.grids) and len(index.tables) == 2
        assert index.graph.codec == C.CODEC_LZMA


def test_same_input_same_bytes_whatever_the_member_order():
    model = shifted_model()
    codebooks, packs = packing.uniform_packs(model, GROUPS, table=OWN, centre=True)
    assert any(pack.offsets for pack in packs)
    first = _encode(model, codebooks, packs)
    shuffled = []
    for pack in reversed(packs):
        order = list(reversed(range(len(pack.paths))))
        sizes = [int(np.prod(tensor_sites(model)[p].tensor.dims)) for p in pack.paths]
        starts = np.cumsum([0] + sizes)
        indices = np.concatenate([pack.indices[starts[i] : starts[i + 1]] for i in order])
        offsets = packing.offsets_of(pack)
        shuffled.append(PackAssignment(tuple(pack.paths[i] for i in order), tuple(pack.scales[i] for i in order),
                                       indices, pack.codebook, pack.table, tuple(offsets[i] for i in order)))
    assert _encode(shifted_model(), codebooks, shuffled) == first


@pytest.mark.parametrize("alignment", [1, 8, 64, 4096])
def test_small_and_large_alignments_are_canonical_and_decode_the_same(packed, tmp_path, alignment):
    model, codebooks, packs, path = packed
    data = _encode(model, codebooks, packs, alignment=alignment)
    assert _encode(model, codebooks, packs, alignment=alignment) == data
    other = tmp_path / f"a{alignment}.moub"
    other.write_bytes(data)
    with MoubFile(other) as moub:
        assert moub.index.alignment == alignment and moub.index.payload_offset % alignment == 0
        assert all(blob.offset % alignment == 0 for _, blob in moub.index.blobs())
    assert moub_runtime.load(other).SerializeToString() == moub_runtime.load(path).SerializeToString()
    if alignment == 8:
        assert len(data) < path.stat().st_size


def test_1_1_style_files_still_need_no_feature(tmp_path):
    model = modelzoo.everything_model()
    codebook, assignments = modelzoo.equal_width_assignments(model, k=16)
    path = tmp_path / "plain.moub"
    path.write_bytes(encode_model(model, [codebook], assignments))
    with MoubFile(path) as moub:
        assert moub.index.required_features == 0 and not moub.index.packs and moub.index.format_minor == C.FORMAT_MINOR


def test_tensors_and_packs_in_one_file_with_a_shared_table(tmp_path):
    model = modelzoo.everything_model()
    grid = GridCodebook(-40, 81)
    sites = tensor_sites(model)
    step = np.float32(0.01)

    def ints(path):
        return np.clip(np.rint(packing.tensor_as_float32(sites[path].tensor).ravel() / step), -40, 40).astype(np.int64) + 40

    pack = PackAssignment(("init:W_half", "init:W_bf16"), (float(step), float(step)),
                          np.concatenate([ints("init:W_half"), ints("init:W_bf16")]), 0)  # table None: shared
    explicit = grid.values() * step
    assignments = {"init:W_shared": TensorAssignment(1, ints("init:W_shared"))}
    data = encode_model(model, [grid, explicit], assignments, packs=[pack])
    path = tmp_path / "mixed.moub"
    path.write_bytes(data)
    with MoubFile(path) as moub:
        (tensor,) = [t for t in moub.index.tensors if t.path == "init:W_shared"]
        assert len(moub.index.tables) == 2 and moub.index.packs[0].table != tensor.table
    loaded = tensor_sites(moub_runtime.load(path))
    assert loaded["init:W_shared"].tensor.raw_data == explicit[ints("init:W_shared")].tobytes()


# ---------------------------------------------------------------- member offsets

SHIFTS = {"init:small_bias": 40.0, "init:W_bf16": -3.0, "node:0/value": 1.0}  # BatchNorm-like: far from zero


def shifted_model() -> onnx.ModelProto:
    """The everything model with a few members moved away from zero (a BatchNorm variance near
    40, a gain near 1...), in their own dtypes."""
    model = modelzoo.everything_model()
    sites = tensor_sites(model)
    for path, shift in SHIFTS.items():
        tensor = sites[path].tensor
        array = numpy_helper.to_array(tensor)
        if tensor.data_type == onnx.TensorProto.BFLOAT16:
            shifted = packing.tensor_as_float32(tensor) + np.float32(shift)
            tensor.raw_data = dtypes.cast_from_float32(shifted.ravel(), tensor.data_type).tobytes()
        else:
            tensor.CopyFrom(numpy_helper.from_array((array + shift).astype(array.dtype), tensor.name))
    return model


@pytest.fixture(scope="module")
def centred(tmp_path_factory):
    model = shifted_model()
    codebooks, packs = packing.uniform_packs(model, GROUPS, divisor=16.0, table=OWN, centre=True)
    plain_codebooks, plain_packs = packing.uniform_packs(model, GROUPS, divisor=16.0, table=OWN)
    folder = tmp_path_factory.mktemp("offsets")
    path, plain = folder / "centred.moub", folder / "plain.moub"
    path.write_bytes(_encode(model, codebooks, packs))
    plain.write_bytes(_encode(model, plain_codebooks, plain_packs))
    return model, codebooks, packs, path, plain


def test_offsets_decode_bit_exact_and_like_the_uncentred_levels(centred):
    model, codebooks, packs, path, plain = centred
    offsets = {p: o for pack in packs for p, o in zip(pack.paths, packing.offsets_of(pack))}
    assert offsets["init:small_bias"] > 100 and offsets["init:W_bf16"] < -10 and offsets["node:0/value"] > 50
    loaded = tensor_sites(moub_runtime.load(path))
    for site_path, data in packing.expected_members(model, codebooks, packs).items():
        assert loaded[site_path].tensor.raw_data == data, site_path
    # The same levels, stored as level - offset on a shorter grid: the same bits, a smaller file.
    assert moub_runtime.load(path).SerializeToString() == moub_runtime.load(plain).SerializeToString()
    with MoubFile(path) as moub, MoubFile(plain) as other:
        assert sum(moub.index.grids[p.codebook][1] for p in moub.index.packs) < \
            sum(other.index.grids[p.codebook][1] for p in other.index.packs) / 4
        assert [p.offsets != () for p in moub.index.packs] == [True, True]
        assert all(p.offsets == () for p in other.index.packs)
    assert path.stat().st_size < plain.stat().st_size


def test_converter_helper_gives_the_runtime_bits_with_offsets(centred):
    model, codebooks, packs, path, _ = centred
    decoded = dict(moub_runtime.decode_tensors(path))
    sites = tensor_sites(model)
    for pack in packs:
        start = 0
        for site_path, scale, offset in zip(pack.paths, pack.scales, packing.offsets_of(pack)):
            tensor = sites[site_path].tensor
            n = int(np.prod(tensor.dims))
            mine = dequantize_scaled(codebooks[pack.codebook], pack.indices[start : start + n], scale, tensor.data_type, offset)
            assert mine.tobytes() == decoded[site_path].tobytes()
            # levels straight into scale_member (what converters/uniform.py does) give the same bits
            levels = (writer.codebook_values(codebooks[pack.codebook])[pack.indices[start : start + n]].astype(np.int64) + offset)
            assert scale_member(levels.astype(np.float32), scale, tensor.data_type).tobytes() == mine.tobytes()
            start += n


def test_one_member_packs_fold_their_offset(tmp_path):
    model = shifted_model()
    groups = [["init:small_bias"], ["node:0/value"], ["init:W_half", "init:W_bf16"]]
    codebooks, packs = packing.uniform_packs(model, groups, table=OWN, centre=True)
    path = tmp_path / "one.moub"
    path.write_bytes(_encode(model, codebooks, packs))
    loaded = tensor_sites(moub_runtime.load(path))
    for site_path, data in packing.expected_members(model, codebooks, packs).items():
        assert loaded[site_path].tensor.raw_data == data, site_path


@pytest.mark.parametrize("members", [1, 2])
@pytest.mark.parametrize("dtype", [1, 10, 11, 16])
def test_offsets_beyond_2_24_decode_exactly(tmp_path, members, dtype):
    # The grid near -2^24, the levels near +2^24: |offset| > 2^24 is not exact in float32 (the reader adds in float64).
    grid = GridCodebook(-(1 << 24) + 10, 6)
    offset = (1 << 25) - 21                        # odd, above 2^24: float32(offset) would round
    levels = np.arange(grid.first, grid.first + 6, dtype=np.int64) + offset
    assert levels.max() < 1 << 24 and levels.min() > (1 << 24) - 20
    counts = (6,) * members
    pack = PackSpec(tuple(range(members)), counts, (0.5,) * members, np.tile(np.arange(6), members), 0, OWN,
                    (offset,) * members)
    path = tmp_path / "far.moub"
    path.write_bytes(build(b"", [grid], [], packs=[pack]))
    with MoubFile(path) as moub:
        got = [a for _, a in moub.iter_pack_members({i: dtype for i in range(members)})]
    expected = dtypes.cast_from_float32(levels.astype(np.float32) * np.float32(0.5), dtype)
    assert np.array_equal(levels.astype(np.float32).astype(np.int64), levels)
    assert all(a.tobytes() == expected.tobytes() for a in got) and len(got) == members


def test_all_zero_offsets_are_not_stored():
    explicit = build(b"", [GridCodebook(-2, 5)], [], packs=[_grid_pack(offsets=(0, 0))])
    assert explicit == build(b"", [GridCodebook(-2, 5)], [], packs=[_grid_pack()])
    assert explicit == build(b"", [GridCodebook(-2, 5)], [], packs=[_grid_pack(offsets=np.zeros(2, np.int64))])
    assert explicit != build(b"", [GridCodebook(-2, 5)], [], packs=[_grid_pack(offsets=(0, 1))])
    # all-zero offsets with an explicit codebook are fine too: nothing is stored
    build(b"", [np.arange(5, dtype=np.float32)], [], packs=[_grid_pack(offsets=[0, 0])])


def test_encode_model_passes_chunk_elements_to_packs_and_tensors(tmp_path):
    model = modelzoo.everything_model()
    codebooks, packs = packing.uniform_packs(model, GROUPS[1:], table=OWN)
    grid = GridCodebook(-8, 17)
    tensor = {"init:W_shared": TensorAssignment(len(codebooks), np.zeros(1024, dtype=np.int64))}
    for chunk, expected in ((None, 512), (4096, 4096), (100, 100)):
        options = {} if chunk is None else {"chunk_elements": chunk}
        path = tmp_path / f"chunks{chunk}.moub"
        path.write_bytes(encode_model(model, [*codebooks, grid], tensor, packs=packs, **options))
        with MoubFile(path) as moub:
            streams = list(moub.index.packs) + [t for t in moub.index.tensors if t.encoding == C.ENCODING_HUFFMAN]
            assert len(streams) == 2 and {s.chunk_elements for s in streams} == {expected}
            assert [len(p.chunk_bits) for p in moub.index.packs] == [-(-p.n_elements // expected) for p in moub.index.packs]
        assert set(dict(moub_runtime.decode_tensors(path))) >= {p for pack in packs for p in pack.paths}


def test_the_golden_uses_offsets():
    from pathlib import Path

    with MoubFile(Path(__file__).parent / "golden" / f"everything_v{C.FORMAT_MAJOR}_{C.FORMAT_MINOR}.moub") as moub:
        assert any(any(p.offsets) for p in moub.index.packs)


# ---------------------------------------------------------------- writer arguments


def _grid_pack(**changes) -> PackSpec:
    fields = {"sites": (0, 3), "counts": (4, 4), "scales": (0.5, 0.25), "indices": np.arange(8) % 5, "codebook": 0}
    fields.update(changes)
    return PackSpec(**fields)


def test_writer_builds_a_pack_without_a_graph_check():
    with pytest.raises(ValueError, match="a site is a member of more than one pack"):
        build(b"", [GridCodebook(-2, 5)], [], packs=[_grid_pack(), _grid_pack(sites=(3, 9))])
    assert build(b"", [GridCodebook(-2, 5)], [], packs=[_grid_pack()]) == build(b"", [GridCodebook(-2, 5)], [], packs=[_grid_pack()])


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"sites": (3, 0)}, "strictly increasing"),
        ({"sites": (3, 3)}, "strictly increasing"),
        ({"sites": (0, 1 << 32)}, "strictly increasing"),
        ({"counts": (4, 3)}, "8 indices for 7 elements"),
        ({"counts": (4,)}, "one site, count and scale per member"),
        ({"scales": (0.5, float("nan"))}, "finite"),
        ({"scales": (0.5, 1e39)}, "finite"),
        ({"scales": (0.5, 2e38)}, "overflows float32"),
        ({"indices": np.arange(8)}, "index outside codebook 0"),
        ({"codebook": 3}, "codebook 3 does not exist"),
        ({"table": "mine"}, "is not an index, None or 'own'"),
        ({"table": 5}, "table 5 does not exist"),
        ({"offsets": (0,)}, "1 offsets for 2 members"),
        ({"offsets": (0, 1, 2)}, "3 offsets for 2 members"),
        ({"offsets": (0, 0.5)}, "offsets must be integers"),
        ({"offsets": (0, (1 << 24) - 2)}, "member 1 offset 16777214 puts grid codebook 0's values at levels 16777212..16777216"),
        ({"offsets": (-(1 << 24) + 2, 0)}, "member 0 offset -16777214"),
        ({"offsets": (0, 1 << 70)}, "outside (-2^24, 2^24)"),
        ({"offsets": (0, 3), "codebook": 2}, "offsets need a grid codebook; codebook 2 holds explicit values"),
        ({"offsets": (0, 1 << 23), "scales": (0.5, 1e32)}, "overflows float32"),
    ],
)
def test_writer_rejects_bad_packs(changes, words):
    codebooks = [GridCodebook(-2, 5), GridCodebook(0, 1 << 20), np.arange(5, dtype=np.float32)]
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("^", r"\^")):
        build(b"", codebooks, [], packs=[_grid_pack(**changes)])


@pytest.mark.parametrize("grid", [GridCodebook(-(1 << 24), 3), GridCodebook((1 << 24) - 1, 2), GridCodebook(0, 0)])
def test_writer_rejects_grids_out_of_bounds(grid):
    with pytest.raises(ValueError, match="grid codebook 0"):
        build(b"", [grid], [], packs=[_grid_pack()])


def test_writer_drops_what_no_stream_uses():
    data = build(b"", [np.zeros(3, np.float32), GridCodebook(-2, 5), GridCodebook(0, 1 << 20)], [], packs=[_grid_pack(codebook=1)])
    path_free = build(b"", [GridCodebook(-2, 5)], [], packs=[_grid_pack()])
    assert data == path_free


def test_own_tables_for_tensors_and_packs(tmp_path):
    tensors = [HuffmanTensor("init:a", "a", 1, (6,), np.array([0, 0, 0, 0, 1, 2]), 0, OWN)]
    data = build(b"", [GridCodebook(-2, 5)], tensors, packs=[_grid_pack()])
    path = tmp_path / "own.moub"
    path.write_bytes(data)
    with MoubFile(path) as moub:
        assert len(moub.index.tables) == 2
        assert {moub.index.tensors[0].table, moub.index.packs[0].table} == {0, 1}
        assert moub.index.tables[moub.index.tensors[0].table].tolist() == [1, 2, 2, 0, 0]


def test_encoder_rejects_bad_pack_assignments():
    model = modelzoo.everything_model()
    codebooks, (pack,) = packing.uniform_packs(model, [["init:W_shared"]])
    with pytest.raises(ValueError, match="both a tensor assignment and a pack member"):
        encode_model(model, codebooks, {"init:W_shared": TensorAssignment(0, pack.indices)}, packs=[pack])
    with pytest.raises(ValueError, match="not a tensor site"):
        encode_model(model, codebooks, {}, packs=[PackAssignment(("init:nope",), (1.0,), pack.indices, 0)])
    with pytest.raises(ValueError, match="not a float type"):
        encode_model(model, codebooks, {}, packs=[PackAssignment(("init:table",), (1.0,), np.zeros(4096, int), 0)])
    with pytest.raises(ValueError, match="1024 indices for 2048 elements"):
        encode_model(model, codebooks, {}, packs=[PackAssignment(("init:W_shared", "init:W_half"), (1.0, 1.0), pack.indices, 0)])
    with pytest.raises(ValueError, match="pack of 1 sites has 2 offsets"):
        encode_model(model, codebooks, {}, packs=[PackAssignment(("init:W_shared",), (1.0,), pack.indices, 0, None, (1, 2))])


# ---------------------------------------------------------------- packed code-length tables in the writer


def _table_forms(data: bytes, tmp_path) -> list[tuple[int, int]]:
    """(entries, stored bytes) of each table of a file."""
    path = tmp_path / "tables.moub"
    path.write_bytes(data)
    with MoubFile(path) as moub:
        return [(t.size, stored) for t, stored in zip(moub.index.tables, moub.index.table_bytes)]


def test_writer_packs_long_tables_and_keeps_short_ones_plain(tmp_path):
    long = PackSpec((0,), (4000,), (0.5,), np.clip(np.rint(np.random.default_rng(1).normal(0, 60, 4000)), -300, 300).astype(int) + 300, 0, OWN)
    short = PackSpec((1,), (6,), (0.5,), np.array([0, 0, 0, 0, 1, 2]), 1, OWN)
    data = build(b"", [GridCodebook(-300, 601), GridCodebook(-2, 5)], [], packs=[long, short])
    (entries_long, stored_long), (entries_short, stored_short) = _table_forms(data, tmp_path)
    assert entries_long == 601 and stored_long + C.PACKED_TABLE_OVERHEAD < 601
    lengths = writer.own_table(np.bincount(long.indices, minlength=601))
    assert stored_long == len(huffman.pack_lengths(lengths)) and huffman.packed_table(lengths) is not None
    assert (entries_short, stored_short) == (5, 5)
    path = tmp_path / "tables.moub"
    with MoubFile(path) as moub:
        assert moub.index.required_features == C.FEATURE_PACKS | C.FEATURE_PACKED_TABLES | C.FEATURE_COMPACT_PACKS
        assert moub.index.tables[0].tolist() == lengths.tolist()
        assert moub.index.table_is_packed(0) and not moub.index.table_is_packed(1)
    assert build(b"", [GridCodebook(-300, 601), GridCodebook(-2, 5)], [], packs=[short, long]) == data


def test_writer_keeps_tables_plain_in_1_1_style_files(tmp_path):
    # A long table over an explicit codebook, no packs, no LZMA: packing it would make the file
    # need feature bit 2, so a 1.1 reader could no longer read it. The writer keeps it plain.
    indices = np.clip(np.rint(np.random.default_rng(2).normal(0, 40, 4000)), -200, 200).astype(int) + 200
    tensors = [HuffmanTensor("init:a", "a", 1, (4000,), indices, 0)]
    codebook = np.arange(-200, 201, dtype=np.float32)
    data = build(b"", [codebook], tensors)
    assert _table_forms(data, tmp_path) == [(401, 401)]
    with MoubFile(tmp_path / "tables.moub") as moub:
        assert moub.index.required_features == 0
    lzma_data = build(b"", [codebook], tensors, graph_codec=C.CODEC_LZMA)  # needs 1.2 anyway: packed
    (entries, stored), = _table_forms(lzma_data, tmp_path)
    assert stored < entries == 401
    with MoubFile(tmp_path / "tables.moub") as moub:
        assert moub.index.required_features == C.FEATURE_LZMA | C.FEATURE_PACKED_TABLES


# ---------------------------------------------------------------- LZMA in the writer


@pytest.mark.parametrize("size, expected", [(0, 4096), (100, 4096), (4097, 8192), (1 << 20, 1 << 20), ((1 << 20) + 1, 1 << 21), (1 << 30, 1 << 23)])
def test_lzma_dictionary_is_no_larger_than_needed(size, expected):
    assert writer.lzma_dict_size(size) == expected


def test_lzma_blob_is_one_xz_stream_without_check():
    data = bytes(range(256)) * 40
    packed = writer.xz_compress(data)
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=1 << 20)  # a 16 KiB dictionary fits
    assert decoder.decompress(packed) == data and decoder.eof and not decoder.unused_data
    assert decoder.check == lzma.CHECK_NONE
    assert writer.xz_compress(data) == packed


def test_lzma_falls_back_to_zlib_beyond_the_readers_expansion_cap():
    stored = writer._pack(bytes(1 << 23), C.CODEC_LZMA)
    assert stored.codec == C.CODEC_ZLIB and stored.decoded_length == 1 << 23


def test_smallest_codec_picks_the_smallest():
    noise = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert writer._pack(noise, SMALLEST).codec == C.CODEC_NONE
    text = b"moub " * 3000
    best = writer._pack(text, SMALLEST)
    assert len(best.payload) == min(len(writer._pack(text, c).payload) for c in (0, 1, 2))


# ---------------------------------------------------------------- inspect and verify


def test_cli_inspect_shows_packs_and_verify_passes(packed, tmp_path):
    _, _, packs, path = packed
    moub = [sys.executable, "-m", "moub_runtime.cli"]
    result = subprocess.run(moub + ["inspect", str(path), "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [len(p["members"]) for p in summary["packs"]] == [4, 5]
    assert {m["path"] for p in summary["packs"] for m in p["members"]} == {p for pack in packs for p in pack.paths}
    assert all(m["offset"] == 0 for p in summary["packs"] for m in p["members"])
    assert all(p["bits_per_weight_with_index"] > p["bits_per_weight"] > 0 for p in summary["packs"])
    assert summary["index_bytes"] + summary["graph_bytes"] + summary["tensor_bytes"] + summary["pack_bytes"] + \
        summary["padding_bytes"] == summary["file_bytes"]
    with MoubFile(path) as index_of:
        stored = index_of.index.table_bytes
        entries = sum(t.size for t in index_of.index.tables)
    assert summary["tables"] == 2 and summary["packed_tables"] == 2 and summary["table_bytes"] == sum(stored) < entries
    assert summary["table_entries"] == entries
    text = subprocess.run(moub + ["inspect", str(path)], capture_output=True, text=True)
    assert "pack 1: 5 members" in text.stdout and "node:13/body/init:W_loop" in text.stdout
    assert f"code-length tables: 2 (2 packed), {sum(stored)} index bytes for {entries} code lengths" in text.stdout
    verify = subprocess.run(moub + ["verify", str(path)], capture_output=True, text=True)
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stderr


def test_cli_inspect_shows_offsets(centred):
    _, _, packs, path, _ = centred
    moub = [sys.executable, "-m", "moub_runtime.cli"]
    summary = json.loads(subprocess.run(moub + ["inspect", str(path), "--json"], capture_output=True, text=True).stdout)
    offsets = {m["path"]: m["offset"] for p in summary["packs"] for m in p["members"]}
    assert offsets == {p: o for pack in packs for p, o in zip(pack.paths, packing.offsets_of(pack))}
    text = subprocess.run(moub + ["inspect", str(path)], capture_output=True, text=True).stdout
    assert f"offset +{offsets['init:small_bias']}" in text and f"offset {offsets['init:W_bf16']}" in text
    verify = subprocess.run(moub + ["verify", str(path)], capture_output=True, text=True)
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stderr


def test_verify_and_load_refuse_members_that_decode_to_inf(tmp_path):
    # float32 products are finite (the reader checks), but 60000 x 2 overflows a float16 member.
    model = modelzoo.everything_model()
    codebooks = [GridCodebook(1, 2)]
    pack = PackAssignment(("init:W_half",), (60000.0,), np.ones(1024, dtype=np.int64), 0)
    path = tmp_path / "inf.moub"
    path.write_bytes(encode_model(model, codebooks, {}, packs=[pack]))
    from moub_runtime.inspect import verify_file

    for check in (verify_file, moub_runtime.load):  # verify and load refuse it alike, before decoding
        with pytest.raises(CodebookError, match=r"pack 0 member 0 \(site 1\): values up to 120000 \(scale 60000\) overflow "
                                                r"the site's element type float16"):
            check(path)


def test_session_frees_pack_members_like_tensors(packed):
    from moub_runtime.loader import ort_copies_external_initializers

    _, _, _, path = packed
    feeds = modelzoo.sample_feeds()
    own = moub_runtime.InferenceSession(path)
    given = moub_runtime.InferenceSession(path, sess_options=ort.SessionOptions())
    np.testing.assert_array_equal(own.run(None, feeds)[0], given.run(None, feeds)[0])
    assert len(given._moub_arrays) >= 4  # main-graph members went to onnxruntime as OrtValues
    assert all(a.ctypes.data % 64 == 0 for a in given._moub_arrays)
    if ort_copies_external_initializers():
        assert own._moub_arrays == [] and own._moub_weights == []


def test_many_packs_with_own_tables_decode_in_one_lock_step_bit_exact(tmp_path, monkeypatch):
    """A default-mode file has a code table per pack. With enough chunks for the lane
    decoder, the reader decodes the lanes of all those tables together (MixedTables);
    every member must still come out bit-exact, and the session must agree."""
    import moub_format.reader as reader_module

    model = modelzoo.everything_model()
    groups = [[p] for group in GROUPS for p in group]  # one-member packs, each its own table
    codebooks, packs = packing.uniform_packs(model, groups, divisor=24.0, table=OWN)
    path = tmp_path / "many_tables.moub"
    path.write_bytes(_encode(model, codebooks, packs, chunk_elements=16))
    built = []
    real = reader_module.MixedTables
    monkeypatch.setattr(reader_module, "MixedTables", lambda *a: built.append(real(*a)) or built[-1])
    with MoubFile(path) as moub:
        assert len({p.table for p in moub.index.packs}) >= 5
        assert sum(len(p.chunk_bits) for p in moub.index.packs) >= reader_module.MIN_LANES
    loaded = tensor_sites(moub_runtime.load(path))
    assert built and len(built[0].drops) >= 3  # several tables really shared one decode
    for site_path, data in packing.expected_members(model, codebooks, packs).items():
        assert loaded[site_path].tensor.raw_data == data, site_path


def test_cli_inspect_into_a_closed_pipe_is_quiet(packed):
    """``moub inspect f.moub | head -1``: the reader leaves early; no traceback and no
    "internal error" line (it said "internal error: BrokenPipeError" before)."""
    _, _, _, path = packed
    command = f"{sys.executable} -m moub_runtime.cli inspect {path} | head -c 1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True)
    assert len(result.stdout) == 1
    assert result.stderr == ""


def test_cli_output_into_a_pipe_closed_before_it_starts_exits_2_quietly(packed):
    """A closed pipe is the caller's doing, not an internal failure: exit 2, nothing on stderr."""
    import os

    _, _, _, path = packed
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "moub_runtime.cli", "inspect", str(path)], stdout=write_end,
                                stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (2, "")


# ---------------------------------------------------------------- compact pack vectors (1.3)


def test_compact_vectors_fit_below_two_to_the_32():
    assert writer.compact_pack_fits([(1 << 32) - 1, 5], [(1 << 32) - 1])
    assert not writer.compact_pack_fits([1 << 32], [5])
    assert not writer.compact_pack_fits([5], [1 << 32])


def test_writer_falls_back_to_the_wide_vectors_when_a_count_does_not_fit(tmp_path, monkeypatch):
    """A pack whose counts or chunk bit lengths reach 2^32 keeps the 64-bit vectors (no feature
    bit); both forms decode to the same tensors, and the compact one saves 8 bytes per member
    (count and offset) and 4 per chunk."""
    model = shifted_model()
    codebooks, packs = packing.uniform_packs(model, GROUPS, divisor=16.0, table=OWN, centre=True)
    compact_path, wide_path = tmp_path / "compact.moub", tmp_path / "wide.moub"
    compact_path.write_bytes(_encode(model, codebooks, packs, alignment=1))
    monkeypatch.setattr(writer, "compact_pack_fits", lambda counts, bits: False)
    wide_path.write_bytes(_encode(model, codebooks, packs, alignment=1))
    with MoubFile(compact_path) as compact, MoubFile(wide_path) as wide:
        assert all(p.compact for p in compact.index.packs) and not any(p.compact for p in wide.index.packs)
        assert compact.index.required_features & C.FEATURE_COMPACT_PACKS
        assert not wide.index.required_features & C.FEATURE_COMPACT_PACKS
        members = sum(len(p.sites) for p in compact.index.packs)
        chunks = sum(len(p.chunk_bits) for p in compact.index.packs)
        assert all(any(p.offsets) for p in compact.index.packs)
        saved = wide.index.payload_offset - compact.index.payload_offset
    # FlatBuffers aligns each vector to its element size: padding moves by up to 4 bytes per vector.
    assert abs(saved - (8 * members + 4 * chunks)) <= 4 * 3 * len(packs)
    assert dict(moub_runtime.decode_tensors(compact_path)).keys() == dict(moub_runtime.decode_tensors(wide_path)).keys()
    for (name, a), (_, b) in zip(moub_runtime.decode_tensors(compact_path), moub_runtime.decode_tensors(wide_path)):
        assert a.tobytes() == b.tobytes(), name
