"""Hostile files for what format 1.2 added: packs, grid codebooks, LZMA blobs, feature bits.

Like ``test_hostile``: each file is the valid tiny 1.2 file of ``test_hostile_kit``
(both initializers as one pack over a grid codebook; for packed code-length tables,
with its table packed) with exactly one thing broken, and each test asserts the exact ``MoubFormatError`` subclass and words
of the message.
"""

from __future__ import annotations

import lzma
import tracemalloc
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import moub_runtime
import test_hostile_kit as K
from moub_format import (
    ChecksumError,
    CodebookError,
    EnumError,
    GraphError,
    HuffmanError,
    LayoutError,
    LimitError,
    MoubFile,
    ReaderLimits,
    StructureError,
    VersionError,
)
from moub_format import constants as C
from moub_format import huffman
from moub_runtime import inspect as moub_inspect
from test_hostile import decoder, expect, full_read, write  # noqa: F401  (decoder is a fixture)


def valid() -> K.Spec:
    return K.valid_pack_spec()


def pack(spec: K.Spec, i: int = 0) -> K.Pack:
    return spec.packs[i]


# ---------------------------------------------------------------- the valid files


def test_the_valid_pack_file_decodes_bit_exact(tmp_path, decoder):
    path = write(tmp_path, valid())
    model = full_read(path)
    weight, bias = (numpy_helper.to_array(t) for t in model.graph.initializer)
    expected = K.expected_pack_values()
    assert weight.tobytes() == expected[0].tobytes() and bias.tobytes() == expected[1].tobytes()
    original = numpy_helper.to_array(K.tiny_model().graph.initializer[0])
    assert np.array_equal(weight, original)  # W is exactly representable: 0.25 x {-2..2}
    assert moub_inspect.verify_file(path) == []
    with MoubFile(path) as moub:
        assert moub.decode_indices(moub.index.packs[0]).max() < moub.index.grids[0][1]


def test_a_pack_and_tensors_mix(tmp_path):
    spec = valid()
    ints = K.pack_ints()
    bias = numpy_helper.to_array(K.tiny_model().graph.initializer[1])
    spec.tensors = [K.raw_tensor(bias, "init:B", "B")]
    first = spec.codebooks[0].first
    spec.packs = [K.pack_of(ints[: K.N_IN * K.N_OUT], first, spec.tables[0], sites=[0], scales=[0.25])]
    model = full_read(write(tmp_path, spec))
    assert numpy_helper.to_array(model.graph.initializer[1]).tobytes() == bias.tobytes()


# ---------------------------------------------------------------- versioning: feature bits


def test_a_1_1_reader_refuses_a_file_with_packs(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "KNOWN_REQUIRED_FEATURES", 0)  # what a 1.1 reader implements
    spec = valid()
    spec.format_minor = 2
    expect(tmp_path, spec, VersionError, "format 1.2 requires features 0x1 this reader does not implement")


def test_an_unknown_required_bit_is_refused(tmp_path):
    spec = valid()
    spec.required_features = C.FEATURE_PACKS | 1 << 6
    expect(tmp_path, spec, VersionError, "requires features 0x40")


# ---------------------------------------------------------------- compact (32-bit) pack vectors, 1.3


def compact_spec(offsets: bool = False) -> K.Spec:
    spec = K.valid_offset_pack_spec() if offsets else valid()
    spec.packs = [K.compact(p) for p in spec.packs]
    spec.required_features |= C.FEATURE_COMPACT_PACKS
    return spec


@pytest.mark.parametrize("offsets", [False, True])
def test_a_compact_pack_decodes_like_the_wide_one(tmp_path, decoder, offsets):
    wide = K.valid_offset_pack_spec() if offsets else valid()
    compact_file = write(tmp_path, compact_spec(offsets), "compact.moub")
    wide_file = write(tmp_path, wide, "wide.moub")
    assert compact_file.stat().st_size < wide_file.stat().st_size
    weight, bias = (numpy_helper.to_array(t) for t in full_read(compact_file).graph.initializer)
    expected = K.expected_pack_values()
    assert weight.tobytes() == expected[0].tobytes() and bias.tobytes() == expected[1].tobytes()
    assert moub_inspect.verify_file(compact_file) == []
    with MoubFile(compact_file) as moub, MoubFile(wide_file) as reference:
        (info,), (ref,) = moub.index.packs, reference.index.packs
        assert info.compact and not ref.compact
        assert (info.counts, info.chunk_bits.tolist(), info.offsets) == (ref.counts, ref.chunk_bits.tolist(), ref.offsets)


def test_a_1_2_reader_refuses_compact_packs(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "KNOWN_REQUIRED_FEATURES", C.FEATURE_PACKS | C.FEATURE_LZMA | C.FEATURE_PACKED_TABLES)
    expect(tmp_path, compact_spec(), VersionError, "requires features 0x8 this reader does not implement")


def test_compact_packs_without_their_feature_bit(tmp_path):
    spec = compact_spec()
    spec.required_features = C.FEATURE_PACKS
    expect(tmp_path, spec, StructureError, "uses compact (32-bit) pack vectors", "lacks 0x8")


@pytest.mark.parametrize("wide_field, compact_field", [("counts", "chunk_bits32"), ("chunk_bits", "counts32"),
                                                        ("offsets", "counts32")])
def test_a_pack_mixing_wide_and_compact_vectors(tmp_path, wide_field, compact_field):
    spec = compact_spec(offsets=True)
    p = K.valid_offset_pack_spec().packs[0]
    setattr(pack(spec), wide_field, getattr(p, wide_field))
    for name in ("counts", "chunk_bits", "offsets"):
        if name != wide_field and f"{name}32" != compact_field:
            setattr(pack(spec), f"{name}32", None)
    expect(tmp_path, spec, StructureError, "pack 0: mixes 64-bit vectors", wide_field, compact_field)


def test_compact_counts_of_another_length(tmp_path):
    spec = compact_spec()
    pack(spec).counts32 = pack(spec).counts32[:1]
    expect(tmp_path, spec, StructureError, "pack 0", "sites, counts32 and scales must have one entry per member", "2, 1 and 2")


def test_compact_pack_without_counts(tmp_path):
    spec = compact_spec()
    pack(spec).counts32 = None
    expect(tmp_path, spec, StructureError, "pack 0", "sites, counts32 and scales must have one entry per member", "2, 0 and 2")


def test_compact_offsets_of_another_length(tmp_path):
    spec = compact_spec(offsets=True)
    pack(spec).offsets32 = [0]
    expect(tmp_path, spec, StructureError, "pack 0", "offsets32 must have one entry per member (2)", "got 1")


@pytest.mark.parametrize("offset", [1 << 24, -(1 << 31), (1 << 31) - 1])
def test_compact_offset_outside_the_exact_range(tmp_path, offset):
    spec = compact_spec(offsets=True)
    pack(spec).offsets32 = [0, offset]
    expect(tmp_path, spec, CodebookError, "pack 0", f"member 1 offset {offset}", "strictly between -2^24 and 2^24")


def test_compact_chunk_bits_that_do_not_match_the_bytes(tmp_path):
    spec = compact_spec()
    pack(spec).chunk_bits32[0] += 8
    expect(tmp_path, spec, StructureError, "pack 0", "chunk_bits need")


def test_compact_member_counts_above_the_caps(tmp_path):
    expect(tmp_path, compact_spec(), LimitError, "pack 0: member 0 count 64 exceeds the limit 63",
           limits=ReaderLimits(max_tensor_elements=63))
    spec = compact_spec()
    pack(spec).counts32 = [(1 << 32) - 1, 32]
    expect(tmp_path, spec, LimitError, "pack 0: 17179869308 decoded bytes exceed 4096 x the")


def test_packs_without_their_feature_bit(tmp_path):
    spec = valid()
    spec.required_features = 0
    expect(tmp_path, spec, StructureError, "uses packs and grid codebooks", "lacks 0x1")


def test_a_grid_codebook_without_the_feature_bit(tmp_path):
    spec = K.valid_spec()
    spec.codebooks = [K.Grid(-2, 5)]  # W's codebook {-0.5..0.5} as a grid {-2..2}: valid but for the bit
    expect(tmp_path, spec, StructureError, "lacks 0x1")


def test_lzma_without_its_feature_bit(tmp_path):
    spec = K.valid_spec()
    spec.graph = lzma_graph()
    expect(tmp_path, spec, StructureError, "uses LZMA blobs", "lacks 0x2")


# ---------------------------------------------------------------- pack members


def test_site_ordinal_out_of_range(tmp_path):
    spec = valid()
    pack(spec).sites = [0, 5]
    expect(tmp_path, spec, GraphError, "pack 0 member 1 (site 5)", "site ordinal 5 does not exist", "2 tensor sites")


@pytest.mark.parametrize("sites", [[1, 1], [1, 0]])
def test_site_ordinals_not_strictly_increasing(tmp_path, sites):
    spec = valid()
    pack(spec).sites = sites
    expect(tmp_path, spec, StructureError, "pack 0", "strictly increasing", f"member 1: {sites[1]} after {sites[0]}")


def test_site_in_two_packs(tmp_path):
    spec = valid()
    ints, first, lengths = K.pack_ints(), spec.codebooks[0].first, spec.tables[0]
    spec.packs.append(K.pack_of(ints[K.N_IN * K.N_OUT :], first, lengths, sites=[1], scales=[0.125]))
    expect(tmp_path, spec, StructureError, "site 1 is a member of packs [0, 1]")


def test_packs_not_sorted_by_first_site(tmp_path):
    spec = valid()
    ints, first, lengths = K.pack_ints(), spec.codebooks[0].first, spec.tables[0]
    n = K.N_IN * K.N_OUT
    spec.packs = [K.pack_of(ints[n:], first, lengths, sites=[1], scales=[0.125]),
                  K.pack_of(ints[:n], first, lengths, sites=[0], scales=[0.25])]
    expect(tmp_path, spec, StructureError, "packs are not sorted by first site")


def test_pack_member_overlapping_a_tensor(tmp_path):
    spec = valid()
    bias = numpy_helper.to_array(K.tiny_model().graph.initializer[1])
    spec.tensors = [K.raw_tensor(bias, "init:B", "B")]
    expect(tmp_path, spec, GraphError, "pack 0 member 1 (site 1)", "'init:B' is provided twice")


def test_member_count_differs_from_the_graph(tmp_path):
    spec = valid()
    ints, first, lengths = K.pack_ints(), spec.codebooks[0].first, spec.tables[0]
    spec.packs = [K.pack_of(ints[:-1], first, lengths, counts=[64, 63])]
    expect(tmp_path, spec, GraphError, "pack 0 member 1", "count 63 differs from the 64 elements of site 'init:B'")


@pytest.mark.parametrize("field, value", [("sites", [0]), ("counts", [64, 64, 1]), ("scales", [0.25]), ("scales", None)])
def test_member_vectors_of_different_lengths(tmp_path, field, value):
    spec = valid()
    setattr(pack(spec), field, value)
    expect(tmp_path, spec, StructureError, "pack 0", "one entry per member")


def test_a_pack_without_members(tmp_path):
    spec = valid()
    p = pack(spec)
    p.sites, p.counts, p.scales, p.chunk_bits, p.data = [], [], [], [], K.Blob(b"")
    expect(tmp_path, spec, StructureError, "pack 0", "at least one member")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scale(tmp_path, bad):
    spec = valid()
    pack(spec).scales = [0.25, bad]
    expect(tmp_path, spec, CodebookError, "pack 0", "member 1 scale", "not finite")


def test_scale_that_overflows_float32_with_the_codebook(tmp_path):
    spec = valid()
    pack(spec).scales = [0.25, 3e38]  # x 16 overflows
    expect(tmp_path, spec, CodebookError, "pack 0", "member 1 scale", "overflows float32")


def test_member_site_that_is_not_float(tmp_path):
    model = K.tiny_model()
    model.graph.initializer.append(numpy_helper.from_array(np.arange(64, dtype=np.int64).reshape(8, 8), "shape"))
    spec = valid()
    spec.graph = K.stripped_graph(model)  # strips every payload, the int64 one too
    ints, first, lengths = K.pack_ints(), spec.codebooks[0].first, spec.tables[0]
    spec.packs = [K.pack_of(np.concatenate([ints, ints[:64]]), first, lengths, sites=[0, 1, 2], scales=[0.25, 0.125, 1.0])]
    expect(tmp_path, spec, GraphError, "pack 0 member 2 (site 2)", "'init:shape' has element type 7", "must be float")


def test_member_site_keeps_its_data_in_the_graph(tmp_path):
    model = K.tiny_model()
    model.graph.initializer[0].ClearField("raw_data")
    model.graph.initializer[0].ClearField("float_data")
    spec = valid()
    spec.graph = K.Blob(model.SerializeToString())  # B keeps its payload
    expect(tmp_path, spec, GraphError, "pack 0 member 1", "'init:B' is stored twice")


def test_member_site_with_negative_dims_in_the_graph(tmp_path):
    model = K.tiny_model()
    model.graph.initializer[1].dims[:] = [-8, -8]  # product 64, like the count
    spec = valid()
    spec.graph = K.stripped_graph(model)
    expect(tmp_path, spec, GraphError, "graph tensor 'init:B' has negative dims [-8, -8]")


def test_graph_site_no_tensor_or_member_provides(tmp_path):
    spec = valid()
    ints, first, lengths = K.pack_ints(), spec.codebooks[0].first, spec.tables[0]
    spec.packs = [K.pack_of(ints[:64], first, lengths, sites=[0], scales=[0.25])]
    expect(tmp_path, spec, GraphError, "'init:B' has no data")


def test_member_sites_inside_subgraphs_and_functions_round_trip(tmp_path):
    # Ordinals count initializers, then nodes (Constant values, subgraphs recursively), then functions.
    then = helper.make_graph([helper.make_node("Add", ["x", "Wt"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [8, 8])],
                             [numpy_helper.from_array(np.zeros((8, 8), np.float32), "Wt")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [8, 8])])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.zeros((8, 8), np.float32), "k")),
         helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 8]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8]), helper.make_tensor_value_info("k", TensorProto.FLOAT, [8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for site in moub_runtime.iter_tensor_sites(model):
        site.tensor.ClearField("raw_data")
    assert [s.path for s in moub_runtime.iter_tensor_sites(model)] == ["node:0/value", "node:1/then_branch/init:Wt"]
    spec = valid()
    spec.graph = K.Blob(model.SerializeToString())
    decoded = full_read(write(tmp_path, spec))
    sites = moub_runtime.tensor_sites(decoded)
    expected = K.expected_pack_values()
    assert numpy_helper.to_array(sites["node:0/value"].tensor).tobytes() == expected[0].tobytes()
    assert numpy_helper.to_array(sites["node:1/then_branch/init:Wt"].tensor).tobytes() == expected[1].tobytes()


# ---------------------------------------------------------------- member offsets


def test_a_pack_with_offsets_decodes_bit_exact(tmp_path, decoder):
    spec = K.valid_offset_pack_spec()
    path = write(tmp_path, spec)
    model = full_read(path)
    weight, bias = (numpy_helper.to_array(t) for t in model.graph.initializer)
    expected = K.expected_pack_values()
    assert weight.tobytes() == expected[0].tobytes() and bias.tobytes() == expected[1].tobytes()
    assert moub_inspect.verify_file(path) == []
    with MoubFile(path) as moub:
        (info,) = moub.index.packs
        assert info.offsets == (0, K.B_OFFSET) and [m.offset for m in info.members] == [0, K.B_OFFSET]


def test_a_one_member_pack_folds_its_offset(tmp_path):
    spec = K.valid_offset_pack_spec()
    ints, (grid,), (lengths,) = K.pack_ints(), spec.codebooks, spec.tables
    n = K.N_IN * K.N_OUT
    bias = numpy_helper.to_array(K.tiny_model().graph.initializer[1])
    spec.tensors = [K.raw_tensor(bias, "init:B", "B")]
    spec.packs = [K.pack_of(ints[n:] - K.B_OFFSET, grid.first, lengths, sites=[0], scales=[0.125], offsets=[K.B_OFFSET])]
    model = full_read(write(tmp_path, spec))
    assert numpy_helper.to_array(model.graph.initializer[0]).tobytes() == K.expected_pack_values()[1].tobytes()


@pytest.mark.parametrize("offsets", [[0], [0, 7, 0], []])
def test_offsets_of_another_length_than_the_members(tmp_path, offsets):
    spec = K.valid_offset_pack_spec()
    pack(spec).offsets = offsets
    expect(tmp_path, spec, StructureError, "pack 0", "offsets must have one entry per member (2) or be absent", f"got {len(offsets)}")


@pytest.mark.parametrize("offset", [1 << 24, -(1 << 24), (1 << 24) - 5, (1 << 25) + 3, (1 << 63) - 1, -(1 << 63)])
def test_offset_that_puts_levels_outside_the_exact_range(tmp_path, offset):
    # Grid values -16..16 here: levels must stay within (-2^24, 2^24); huge offsets must not wrap around in int64.
    spec = K.valid_offset_pack_spec()
    pack(spec).offsets = [0, offset]
    expect(tmp_path, spec, CodebookError, "pack 0", f"member 1 offset {offset}", "strictly between -2^24 and 2^24")


def test_offsets_at_the_edge_of_the_range_decode_exactly(tmp_path):
    # The grid's lowest value at level -(2^24 - 1) for W, its highest at 2^24 - 1 for B, unit scales:
    # every level is an integer exact in float32.
    spec = K.valid_offset_pack_spec()
    grid = spec.codebooks[0]
    edge = (1 << 24) - 1
    low, high = -edge - grid.first, edge - (grid.first + grid.count - 1)
    pack(spec).offsets = [low, high]
    pack(spec).scales = [1.0, 1.0]
    model = full_read(write(tmp_path, spec))
    weight, bias = (numpy_helper.to_array(t).ravel() for t in model.graph.initializer)
    ints = K.pack_ints()
    n = K.N_IN * K.N_OUT
    assert np.array_equal(weight.astype(np.int64), ints[:n] + low)
    assert np.array_equal(bias.astype(np.int64), ints[n:] - K.B_OFFSET + high)
    pack(spec).offsets = [low - 1, high]
    expect(tmp_path, spec, CodebookError, f"member 0 offset {low - 1}", f"levels {-edge - 1}..")
    pack(spec).offsets = [low, high + 1]
    expect(tmp_path, spec, CodebookError, f"member 1 offset {high + 1}", f"..{edge + 1};")


def test_offsets_with_an_explicit_codebook(tmp_path):
    spec = K.valid_offset_pack_spec()
    grid = spec.codebooks[0]
    spec.codebooks = [np.arange(grid.first, grid.first + grid.count, dtype=np.float32)]  # the same values, explicit
    spec.required_features = C.FEATURE_PACKS
    expect(tmp_path, spec, CodebookError, "pack 0", "has offsets, but codebook 0 holds explicit values")
    pack(spec).offsets = [0, 0]  # all zero is refused too: a pack over explicit values has no offsets vector
    expect(tmp_path, spec, CodebookError, "pack 0", "only allowed with a grid codebook")
    pack(spec).offsets = None
    full_read(write(tmp_path, spec, "explicit.moub"))  # without offsets: valid (B then decodes 7 levels lower)


def test_offset_that_makes_a_scale_overflow(tmp_path):
    # 16 x 1e32 is finite; (16 + 2^23) x 1e32 is not: the member's magnitude includes its offset.
    spec = K.valid_offset_pack_spec()
    pack(spec).offsets = [0, 1 << 23]
    pack(spec).scales = [0.25, 1e32]
    expect(tmp_path, spec, CodebookError, "pack 0", "member 1 scale", "overflows float32")
    pack(spec).offsets = [0, 0]
    full_read(write(tmp_path, spec, "finite.moub"))


def test_offsets_vector_longer_than_the_buffer(tmp_path):
    data = K.build(K.valid_offset_pack_spec())
    packs = K.follow(data, K.model_field(data, "packs"))
    table = K.follow(data, packs + 4)
    vector = K.follow(data, K.field_pos(data, table, K.PACK_SLOTS["offsets"]))
    count = (1 << 32) // 8 + 1
    expect(tmp_path, K.patch(data, vector, count.to_bytes(4, "little")), StructureError, "Model.packs[0].offsets", "exceeds")


def test_random_bit_flips_in_a_pack_file_with_offsets_never_decode_silently(tmp_path):
    from moub_format import MoubFormatError

    data = K.build(K.valid_offset_pack_spec())
    rng = np.random.default_rng(13)
    path = tmp_path / "flipped.moub"
    offsets_at = K.follow(data, K.field_pos(data, K.follow(data, K.follow(data, K.model_field(data, "packs")) + 4),
                                            K.PACK_SLOTS["offsets"]))
    positions = np.concatenate([rng.integers(0, len(data), 100), np.arange(offsets_at, offsets_at + 20)])
    for position in positions.tolist():
        corrupted = bytearray(data)
        corrupted[position] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(corrupted))
        with pytest.raises(MoubFormatError):
            moub_runtime.load(path)


# ---------------------------------------------------------------- sizes and caps


def test_member_count_above_the_element_cap(tmp_path):
    expect(tmp_path, valid(), LimitError, "pack 0: member 0 count 64 exceeds the limit 63",
           limits=ReaderLimits(max_tensor_elements=63))


def test_pack_elements_above_the_element_cap(tmp_path):
    expect(tmp_path, valid(), LimitError, "pack 0: element count (sum of counts) 128", "limit 100",
           limits=ReaderLimits(max_tensor_elements=100))


def test_counts_whose_sum_overflows_64_bits(tmp_path):
    spec = valid()
    pack(spec).counts = [2**63, 2**63]
    expect(tmp_path, spec, LimitError, "pack 0: member 0 count 9223372036854775808 exceeds")


@pytest.mark.parametrize(
    "limits, words",
    [
        (ReaderLimits(max_packs=0), ("pack count 1", "limit 0")),
        (ReaderLimits(max_pack_members=1), ("pack 0: member count 2", "limit 1")),
        (ReaderLimits(max_tensors=1), ("stored tensor count (tensors and pack members) 2", "limit 1")),
        (ReaderLimits(max_chunks_per_tensor=4), ("pack 0: chunk count 8", "limit 4")),
        (ReaderLimits(max_expansion_ratio=2), ("pack 0: 512 decoded bytes exceed 2 x",)),
    ],
)
def test_pack_counts_above_caps(tmp_path, limits, words):
    expect(tmp_path, valid(), LimitError, *words, limits=limits)


def test_decoded_budget_counts_packs_before_any_allocation(tmp_path):
    path = write(tmp_path, valid())
    tracemalloc.start()
    try:
        with pytest.raises(LimitError, match="decoded model size in bytes 512 exceeds the limit 500"):
            moub_runtime.load(path, ReaderLimits(max_decoded_bytes=500))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_exact_decoded_budget_uses_the_graph_dtypes(tmp_path):
    # From the index a pack costs 4 bytes per element (512 here); the graph says B is a double:
    # 64 x 4 + 64 x 8 = 768 bytes, over a 600-byte budget, refused before decoding.
    model = K.tiny_model()
    bias = model.graph.initializer[1]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias).astype(np.float64), "B"))
    spec = valid()
    spec.graph = K.stripped_graph(model)
    expect(tmp_path, spec, LimitError, "decoded model size in bytes 768 exceeds the limit 600",
           limits=ReaderLimits(max_decoded_bytes=600))


def test_pack_member_of_another_dtype_decodes_through_its_cast(tmp_path):
    model = K.tiny_model()
    bias = model.graph.initializer[1]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias).astype(np.float16), "B"))
    spec = valid()
    spec.graph = K.stripped_graph(model)
    decoded = full_read(write(tmp_path, spec))
    assert numpy_helper.to_array(decoded.graph.initializer[1]).tobytes() == K.expected_pack_values()[1].astype(np.float16).tobytes()


# ---------------------------------------------------------------- grid codebooks


@pytest.mark.parametrize(
    "grid, words",
    [
        (K.Grid(-(1 << 24), 5), ("grid codebook 0", "-16777216..-16777212")),
        (K.Grid((1 << 24) - 4, 5), ("grid codebook 0", "16777212..16777216")),
        (K.Grid(-(1 << 60), 33), ("grid codebook 0",)),
        (K.Grid(0, 0), ("codebook 0 is empty",)),
        (K.Grid(5, 0), ("codebook 0 is empty",)),
        (K.Grid(-16, 33, np.zeros(33, np.float32)), ("codebook 0 sets both values and a grid (first -16, count 33)",)),
        (K.Grid(0, 33, np.zeros(33, np.float32)), ("codebook 0 sets both values and a grid (first 0, count 33)",)),
    ],
)
def test_grid_codebook_bounds(tmp_path, grid, words):
    spec = valid()
    spec.codebooks = [grid]
    expect(tmp_path, spec, CodebookError, *words)


def test_grid_codebook_above_the_entry_cap(tmp_path):
    expect(tmp_path, valid(), LimitError, "codebook 0 length 33", "limit 32", limits=ReaderLimits(max_codebook_entries=32))


def test_unused_grid_codebook(tmp_path):
    # 12 index bytes must not stand for 2^24 values nothing decodes: an unused grid is invalid.
    spec = valid()
    spec.codebooks.append(K.Grid(0, (1 << 24) - 1))
    expect(tmp_path, spec, CodebookError, "grid codebook 1 is used by no tensor or pack")


def test_table_that_does_not_fit_the_grid(tmp_path):
    spec = valid()
    spec.codebooks = [K.Grid(spec.codebooks[0].first, 34)]
    expect(tmp_path, spec, HuffmanError, "pack 0: Huffman table 0 has 33 lengths for codebook 0 of 34 entries")


@pytest.mark.parametrize("field, value, error, words", [
    ("codebook", 1, CodebookError, ("pack 0: codebook 1 does not exist",)),
    ("table", 2, HuffmanError, ("pack 0: Huffman table 2 does not exist",)),
])
def test_pack_references_that_do_not_exist(tmp_path, field, value, error, words):
    spec = valid()
    setattr(pack(spec), field, value)
    expect(tmp_path, spec, error, *words)


# ---------------------------------------------------------------- the pack's stream


def test_pack_chunk_count_does_not_match(tmp_path):
    spec = valid()
    pack(spec).chunk_elements = 32
    expect(tmp_path, spec, StructureError, "pack 0", "8 chunks", "need 4")


@pytest.mark.parametrize("compact", [False, True])
def test_pack_chunk_bits_impossible(tmp_path, compact):
    spec = compact_spec() if compact else valid()
    getattr(pack(spec), "chunk_bits32" if compact else "chunk_bits")[0] = 3
    expect(tmp_path, spec, HuffmanError, "pack 0: chunk_bits[0] = 3 is impossible for 16 codes")


def test_pack_bytes_do_not_match_chunk_bits(tmp_path):
    spec = valid()
    pack(spec).data.payload += b"\0"
    expect(tmp_path, spec, StructureError, "pack 0", "chunk_bits need")


@pytest.mark.parametrize("codec", [C.CODEC_ZLIB, C.CODEC_LZMA])
def test_pack_stream_with_a_codec(tmp_path, codec):
    spec = valid()
    spec.required_features |= C.FEATURE_LZMA
    pack(spec).data.codec = codec
    pack(spec).data.decoded_length = len(pack(spec).data.payload)
    expect(tmp_path, spec, StructureError, "pack 0", "stored without a codec")


def test_pack_chunk_with_a_code_too_many(tmp_path, decoder):
    spec = valid()
    p = pack(spec)
    ints, first, lengths = K.pack_ints(), spec.codebooks[0].first, spec.tables[0]
    head, bits0 = huffman.encode(np.append(ints[: K.CHUNK], ints[0]) - first, lengths)
    rest, bits = huffman.encode_chunks(ints[K.CHUNK :] - first, lengths, K.CHUNK)
    p.data, p.chunk_bits = K.Blob(head + rest), [bits0] + bits
    expect(tmp_path, spec, HuffmanError, "pack 0: chunk 0: 16 codes do not take exactly chunk_bits")


def test_pack_checksum_mismatch(tmp_path):
    spec = valid()
    pack(spec).data.checksum = K.Checksum(digest=bytes(32))
    expect(tmp_path, spec, ChecksumError, "pack 0", "checksum mismatch")


def test_pack_blob_overlapping_the_graph(tmp_path):
    spec = valid()
    pack(spec).data.offset = 0
    expect(tmp_path, spec, LayoutError, "overlaps")


# ---------------------------------------------------------------- packed code-length tables


def packed_spec() -> K.Spec:
    """The valid pack file with its 33-entry table packed (27 bytes of raw DEFLATE)."""
    spec = valid()
    spec.tables = [K.packed_table(spec.tables[0])]
    spec.required_features |= C.FEATURE_PACKED_TABLES
    return spec


def lengths_of(spec: K.Spec) -> np.ndarray:
    return huffman.unpack_lengths(spec.tables[0].packed_lengths, spec.tables[0].count)


def deflate(data: bytes, level: int = 9) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def test_a_packed_table_decodes_bit_exact(tmp_path, decoder):
    spec = packed_spec()
    assert len(spec.tables[0].packed_lengths) < spec.tables[0].count == 33
    path = write(tmp_path, spec)
    weight, bias = (numpy_helper.to_array(t) for t in full_read(path).graph.initializer)
    expected = K.expected_pack_values()
    assert weight.tobytes() == expected[0].tobytes() and bias.tobytes() == expected[1].tobytes()
    assert moub_inspect.verify_file(path) == []
    with MoubFile(path) as moub:
        assert moub.index.tables[0].tolist() == valid().tables[0].tolist()
        assert moub.index.table_bytes == (len(spec.tables[0].packed_lengths),) and moub.index.table_is_packed(0)


def test_a_packed_table_without_its_feature_bit(tmp_path):
    spec = packed_spec()
    spec.required_features = C.FEATURE_PACKS
    expect(tmp_path, spec, StructureError, "uses packed code-length tables", "lacks 0x4")


def test_a_reader_without_packed_tables_refuses_them(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "KNOWN_REQUIRED_FEATURES", C.FEATURE_PACKS | C.FEATURE_LZMA)
    expect(tmp_path, packed_spec(), VersionError, "requires features 0x4 this reader does not implement")


def test_packed_table_bomb_stops_at_count_plus_one(tmp_path):
    # 32 bytes of DEFLATE that inflate to the 33 lengths and 500 zeros more: the output stops
    # at 34 bytes (the test below shows the bound on a big bomb).
    spec = packed_spec()
    bomb = deflate(lengths_of(spec).tobytes() + bytes(500))
    assert len(bomb) < 33
    spec.tables[0].packed_lengths = bomb
    expect(tmp_path, spec, HuffmanError, "Huffman table 0: packed_lengths inflates past its count of 33 code lengths")


def test_a_big_packed_table_bomb_stays_bounded_in_memory(tmp_path):
    # 256 MiB of zeros in a 255 KiB stream, declared as 2^20 lengths: inflation stops at
    # 2^20 + 1 bytes, before any codebook is looked at.
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = b"".join(compressor.compress(bytes(1 << 24)) for _ in range(16)) + compressor.flush()
    spec = packed_spec()
    spec.tables[0] = K.Table(None, bomb, 1 << 20)
    path = write(tmp_path, spec)
    tracemalloc.start()
    try:
        with pytest.raises(HuffmanError, match="inflates past its count of 1048576"):
            full_read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


@pytest.mark.parametrize("cut", [1, 3, 10])
def test_packed_table_truncated(tmp_path, cut):
    spec = packed_spec()
    spec.tables[0].packed_lengths = spec.tables[0].packed_lengths[:-cut]
    expect(tmp_path, spec, HuffmanError, "Huffman table 0: packed_lengths is truncated", "of 33 bytes")


def test_packed_table_empty_stream(tmp_path):
    spec = packed_spec()
    spec.tables[0].packed_lengths = b""
    expect(tmp_path, spec, HuffmanError, "Huffman table 0: packed_lengths is truncated", "0 of 33 bytes")


@pytest.mark.parametrize("extra", [b"\0", b"\0\0\0", deflate(b"\1")])
def test_packed_table_trailing_data(tmp_path, extra):
    spec = packed_spec()
    spec.tables[0].packed_lengths += extra
    expect(tmp_path, spec, HuffmanError, "Huffman table 0", f"{len(extra)} bytes after the end of the packed_lengths")


@pytest.mark.parametrize("stream", [b"\xff" * 8, b"\x07" + bytes(8), b"\x01\x05\x00\x00\x00"])
def test_packed_table_corrupt_stream(tmp_path, stream):
    # reserved block type 3; a stored block whose length and its complement disagree
    spec = packed_spec()
    spec.tables[0].packed_lengths = stream
    expect(tmp_path, spec, HuffmanError, "Huffman table 0: packed_lengths is not a valid DEFLATE stream")


def test_packed_table_inflates_short(tmp_path):
    spec = packed_spec()
    spec.tables[0].packed_lengths = huffman.pack_lengths(lengths_of(spec)[:-1])
    expect(tmp_path, spec, HuffmanError, "Huffman table 0: packed_lengths inflates to 32 bytes, count is 33")


def test_packed_table_with_both_forms(tmp_path):
    spec = packed_spec()
    spec.tables[0].code_lengths = lengths_of(spec)
    expect(tmp_path, spec, StructureError, "Huffman table 0: has both code_lengths and packed_lengths")


@pytest.mark.parametrize("count", [0, 33])
def test_table_with_neither_form(tmp_path, count):
    spec = packed_spec()
    spec.tables[0] = K.Table(None, None, count)
    expect(tmp_path, spec, StructureError, "Huffman table 0: has neither code_lengths nor packed_lengths")


def test_plain_table_with_a_count(tmp_path):
    spec = valid()
    spec.tables[0] = K.Table(spec.tables[0], None, 33)
    expect(tmp_path, spec, StructureError, "Huffman table 0: count 33 is set", "packed_lengths only")


def test_packed_table_count_above_the_cap(tmp_path):
    spec = packed_spec()
    spec.tables[0].count = (1 << 24) + 1
    expect(tmp_path, spec, LimitError, "Huffman table 0: count 16777217 exceeds the limit 16777216")


def test_packed_table_count_above_a_lower_cap(tmp_path):
    spec = packed_spec()
    spec.codebooks = [K.Grid(0, 1)]  # within the lower cap, so the table's count is the first thing above it
    expect(tmp_path, spec, LimitError, "Huffman table 0: count 33 exceeds the limit 32", limits=ReaderLimits(max_codebook_entries=32))


def test_packed_table_not_shorter_than_its_count(tmp_path):
    spec = packed_spec()
    stored = deflate(lengths_of(spec).tobytes(), level=0)  # a stored block: 33 bytes + 5
    spec.tables[0].packed_lengths = stored
    expect(tmp_path, spec, LimitError, f"packed_lengths of {len(stored)} bytes must be shorter than the 33 code lengths")


def test_packed_table_that_does_not_fit_the_codebook(tmp_path):
    spec = packed_spec()
    spec.tables[0] = K.packed_table(np.append(lengths_of(spec), 0))  # a complete code over 34 entries
    expect(tmp_path, spec, HuffmanError, "pack 0: Huffman table 0 has 34 lengths for codebook 0 of 33 entries")


@pytest.mark.parametrize("lengths, word", [
    ([1, 1, 1] + [0] * 30, "over-subscribed"),
    ([1, 2] + [0] * 31, "incomplete"),
    ([3] + [0] * 32, "one-symbol table must use length 1"),
    ([0] * 33, "no symbol has a code"),
    ([21, 1] + [0] * 31, "code length 21 exceeds the limit 20"),
])
def test_packed_lengths_are_validated_like_plain_ones(tmp_path, lengths, word):
    spec = packed_spec()
    spec.tables[0] = K.packed_table(np.array(lengths, np.uint8))
    expect(tmp_path, spec, HuffmanError, "Huffman table 0", word)


@pytest.mark.parametrize("packed", [False, True])
def test_table_entries_of_all_tables_are_capped(tmp_path, packed):
    spec = packed_spec() if packed else valid()
    expect(tmp_path, spec, LimitError, "code lengths of all Huffman tables together 33", "limit 32",
           limits=ReaderLimits(max_table_entries=32))


def test_resealed_flips_in_a_packed_table_are_errors_or_valid_tables(tmp_path):
    # With the index digest recomputed (an attacker, not corruption), any change to the
    # DEFLATE bytes must end in a MoubFormatError or a file that loads: never a crash.
    from moub_format import MoubFormatError

    spec = packed_spec()
    data = K.build(spec)
    stream = spec.tables[0].packed_lengths
    start = data.index(stream)
    rng = np.random.default_rng(3)
    path = tmp_path / "flipped.moub"
    outcomes = {"error": 0, "loads": 0}
    for position in range(start, start + len(stream)):
        for bit in rng.choice(8, 3, replace=False):
            corrupted = bytearray(data)
            corrupted[position] ^= 1 << int(bit)
            path.write_bytes(K.reseal(corrupted))
            try:
                moub_runtime.load(path)
                outcomes["loads"] += 1
            except MoubFormatError:
                outcomes["error"] += 1
    assert outcomes["error"] > 0


# ---------------------------------------------------------------- LZMA


def lzma_graph(dict_size: int | None = None, extra: bytes = b"", decoded_length: int | None = None) -> K.Blob:
    data = K.stripped_graph(codec=C.CODEC_NONE).payload
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": dict_size or 1 << 12}]
    packed = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, filters=filters) + extra
    return K.Blob(packed, C.CODEC_LZMA, decoded_length=len(data) if decoded_length is None else decoded_length)


def lzma_spec(graph: K.Blob) -> K.Spec:
    spec = K.valid_spec()
    spec.graph = graph
    spec.required_features = C.FEATURE_LZMA
    return spec


def test_lzma_graph_and_raw_tensor_decode(tmp_path):
    spec = lzma_spec(lzma_graph())
    raw = spec.tensors[0]
    data = raw.data.payload
    raw.data = K.Blob(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64), C.CODEC_LZMA, decoded_length=len(data))
    model = full_read(write(tmp_path, spec))
    assert model.graph.initializer[1].raw_data == data


def test_lzma_bomb_above_the_expansion_ratio(tmp_path):
    packed = lzma.compress(bytes(1 << 22), format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE)
    assert (1 << 22) > 64 * len(packed)
    spec = lzma_spec(K.Blob(packed, C.CODEC_LZMA, decoded_length=1 << 22))
    expect(tmp_path, spec, LimitError, "graph: decoded_length 4194304 exceeds 64 x", limits=ReaderLimits(max_expansion_ratio=64))


def test_lzma_stream_longer_than_declared_stops_at_the_limit(tmp_path):
    spec = lzma_spec(lzma_graph(decoded_length=50))
    expect(tmp_path, spec, StructureError, "graph: xz stream does not decode to exactly 50 bytes", "got 51")


def test_lzma_stream_shorter_than_declared(tmp_path):
    graph = lzma_graph()
    graph.decoded_length += 10
    expect(tmp_path, lzma_spec(graph), StructureError, "graph: xz stream does not decode to exactly")


@pytest.mark.parametrize("extra", [b"\0\0\0\0", b"junk", lzma.compress(b"second", format=lzma.FORMAT_XZ)])
def test_lzma_trailing_data(tmp_path, extra):
    expect(tmp_path, lzma_spec(lzma_graph(extra=extra)), StructureError, "graph: xz stream", f"{len(extra)} bytes after its end")


def test_lzma_stream_cut_short(tmp_path):
    graph = lzma_graph()
    graph.payload = graph.payload[:-8]
    expect(tmp_path, lzma_spec(graph), StructureError, "graph: xz stream")


def test_lzma_corrupt_stream(tmp_path):
    graph = lzma_graph()
    graph.payload = graph.payload[:12] + bytes(len(graph.payload) - 12)
    expect(tmp_path, lzma_spec(graph), StructureError, "graph: xz stream is corrupt")


def test_lzma_dictionary_above_the_memory_limit(tmp_path):
    # A 64 MiB dictionary in the header: the decoder refuses before allocating it.
    spec = lzma_spec(lzma_graph(dict_size=1 << 26))
    expect(tmp_path, spec, LimitError, "graph: the xz stream needs more decoder memory than the limit 33554432")
    full_read(write(tmp_path, spec, "roomy.moub"), ReaderLimits(max_lzma_memory=1 << 27))


def test_lzma_raw_tensor_corrupt(tmp_path):
    spec = lzma_spec(lzma_graph())
    raw = spec.tensors[0]
    data = raw.data.payload
    packed = bytearray(lzma.compress(data, format=lzma.FORMAT_XZ))
    packed[len(packed) // 2] ^= 0xFF
    raw.data = K.Blob(bytes(packed), C.CODEC_LZMA, decoded_length=len(data))
    expect(tmp_path, spec, StructureError, "tensor 'init:B'", "xz stream")


def test_huffman_tensor_with_lzma(tmp_path):
    spec = lzma_spec(lzma_graph())
    tensor = spec.tensors[1]
    tensor.data.codec = C.CODEC_LZMA
    expect(tmp_path, spec, StructureError, "tensor 'init:W'", "stored without a codec")


@pytest.mark.parametrize("codec", [3, 255])
def test_unknown_codec(tmp_path, codec):
    spec = lzma_spec(lzma_graph())
    spec.graph.codec = codec
    expect(tmp_path, spec, EnumError, f"graph: unknown codec {codec}")


def test_zlib_is_still_read(tmp_path):
    spec = K.valid_spec()
    assert spec.graph.codec == C.CODEC_ZLIB
    data = spec.tensors[0].data.payload
    spec.tensors[0].data = K.Blob(zlib.compress(data), C.CODEC_ZLIB, decoded_length=len(data))
    full_read(write(tmp_path, spec))


def test_every_pack_file_truncation_is_a_format_error(tmp_path):
    from moub_format import MoubFormatError

    data = K.build(valid())
    path = tmp_path / "cut.moub"
    for length in range(0, len(data), 3):
        path.write_bytes(data[:length])
        with pytest.raises(MoubFormatError):
            moub_runtime.load(path)


def test_random_bit_flips_in_a_pack_file_never_decode_silently(tmp_path):
    from moub_format import MoubFormatError

    data = K.build(valid())
    reference = moub_runtime.load(write(tmp_path, data, "ref.moub")).SerializeToString(deterministic=True)
    rng = np.random.default_rng(12)
    path = tmp_path / "flipped.moub"
    for position, bit in zip(rng.integers(0, len(data), 300), rng.integers(0, 8, 300)):
        corrupted = bytearray(data)
        corrupted[int(position)] ^= 1 << int(bit)
        path.write_bytes(bytes(corrupted))
        try:
            model = moub_runtime.load(path)
        except MoubFormatError:
            continue
        same = model.SerializeToString(deterministic=True) == reference
        raise AssertionError(f"a flip at byte {position} decoded {'to the same' if same else 'to a different'} model")


def test_onnx_model_of_the_pack_file_runs(tmp_path):
    import onnxruntime as ort

    path = write(tmp_path, valid())
    session = moub_runtime.InferenceSession(path)
    x = np.ones((1, K.N_IN), np.float32)
    reference = ort.InferenceSession(moub_runtime.load(path).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], reference.run(None, {"x": x})[0])
    onnx.checker.check_model(moub_runtime.load(path))


@pytest.mark.parametrize("field, size", [("sites", 4), ("counts", 8), ("scales", 4), ("chunk_bits", 8)])
def test_pack_vector_longer_than_the_buffer(tmp_path, field, size):
    # 2^32 / size + 1 elements wrap to a few bytes in 32-bit arithmetic; Python ints do not wrap.
    data = K.build(valid())
    packs = K.follow(data, K.model_field(data, "packs"))
    table = K.follow(data, packs + 4)
    vector = K.follow(data, K.field_pos(data, table, K.PACK_SLOTS[field]))
    count = (1 << 32) // size + 1
    expect(tmp_path, K.patch(data, vector, count.to_bytes(4, "little")), StructureError, f"Model.packs[0].{field}", "exceeds")


def test_pack_count_beyond_the_bytes_left(tmp_path):
    data = K.build(valid())
    vector = K.follow(data, K.model_field(data, "packs"))
    expect(tmp_path, K.patch(data, vector, (1 << 31).to_bytes(4, "little")), StructureError, "Model.packs", "exceeds")
