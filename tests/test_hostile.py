"""One crafted file per case of HOSTILE-INPUTS.md, each asserting the exact error.

Every file starts as the valid tiny file of ``test_hostile_kit`` with exactly
one thing broken (checksums and digests recomputed unless the case is about
them), so it reaches the check it targets. Each test asserts the exact
``MoubFormatError`` subclass and that the message names the file and the field.
Cases that cannot arise in this format say why and test the nearest real thing.
"""

from __future__ import annotations

import copy
import io
import pickle
import tracemalloc
import zlib
from pathlib import Path

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
    MetadataError,
    MoubFile,
    MoubFormatError,
    ReaderLimits,
    StructureError,
    TruncatedFileError,
    VersionError,
)
from moub_format import constants as C
from moub_format import huffman, reader
from moub_runtime import inspect as moub_inspect


def full_read(path: Path, limits: ReaderLimits = C.DEFAULT_LIMITS) -> onnx.ModelProto:
    """Everything a device does with a file: open, graph, cross-check, decode every tensor."""
    return moub_runtime.load(path, limits)


def write(tmp_path: Path, data: bytes | K.Spec, name: str = "hostile.moub") -> Path:
    path = tmp_path / name
    path.write_bytes(K.build(data) if isinstance(data, K.Spec) else data)
    return path


def expect(tmp_path: Path, data: bytes | K.Spec, error: type[MoubFormatError], *words: str,
           limits: ReaderLimits = C.DEFAULT_LIMITS, action=full_read) -> str:
    path = write(tmp_path, data)
    with pytest.raises(MoubFormatError) as caught:
        action(path, limits) if action is full_read else action(path)
    message = str(caught.value)
    assert type(caught.value) is error, f"{type(caught.value).__name__}: {message}"
    assert str(path) in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    if action is full_read:  # from memory, from a file object and as a compact model: the same error
        for source, name, compact in ((path.read_bytes(), "<bytes>", False), (io.BytesIO(path.read_bytes()), "<file object>", False),
                                      (path, str(path), True)):
            with pytest.raises(MoubFormatError) as again:
                moub_runtime.load(source, limits, compact=compact)
            assert type(again.value) is error and str(again.value) == message.replace(str(path), name), str(again.value)
    return message


@pytest.fixture(params=["lanes", "bitarray"])
def decoder(request, monkeypatch):
    """Run a stream case through both decoders: lock-step lanes, and bitarray chunk by
    chunk (which the reader uses when a group has fewer than MIN_LANES chunks)."""
    monkeypatch.setattr(reader, "MIN_LANES", 0 if request.param == "lanes" else 1 << 30)
    return request.param


def valid() -> K.Spec:
    return K.valid_spec()


def huffman_of(spec: K.Spec) -> K.Tensor:
    return next(t for t in spec.tensors if t.encoding == C.ENCODING_HUFFMAN)


def test_the_valid_file_is_valid(tmp_path, decoder):
    path = write(tmp_path, valid())
    model = full_read(path)
    weight = numpy_helper.to_array(model.graph.initializer[0])
    assert np.array_equal(weight, numpy_helper.to_array(K.tiny_model().graph.initializer[0]))
    assert moub_inspect.verify_file(path) == []


# ---------------------------------------------------------------- 1-7 container and FlatBuffer structure


@pytest.mark.parametrize("size", [0, 1, 7])
def test_01_shorter_than_the_preamble(tmp_path, size):
    expect(tmp_path, K.build(valid())[:size], TruncatedFileError, "preamble", f"{size} bytes")


def test_01_preamble_only(tmp_path):
    data = K.build(valid())
    expect(tmp_path, data[:8], StructureError, "root offset", "outside the 8-byte index")


def test_02_wrong_identifier(tmp_path):
    data = K.build(valid())
    expect(tmp_path, data[:4] + b"ONNX" + data[8:], VersionError, "identifier", "ONNX")


def test_02_newer_major(tmp_path):
    spec = valid()
    spec.format_major = 2
    expect(tmp_path, spec, VersionError, "format version 2.", "major")


def test_02_unknown_required_feature(tmp_path):
    spec = valid()
    spec.format_minor = 9
    spec.required_features = 1 << 6
    expect(tmp_path, spec, VersionError, "requires features 0x40")


def test_02_newer_minor_without_required_features_is_read(tmp_path):
    spec = valid()
    spec.format_minor = 9  # minors only add; nothing required: readable
    full_read(write(tmp_path, spec))


def test_03_root_offset_past_the_end(tmp_path):
    data = K.build(valid())
    expect(tmp_path, K.patch(data, 0, (len(data) + 100).to_bytes(4, "little")), StructureError, f"root offset {len(data) + 100}")


@pytest.mark.parametrize("soffset", [0x7FFFFFFF, -0x80000000])
def test_03_table_soffset_points_outside(tmp_path, soffset):
    # vtable = table - soffset: a large positive soffset lands before byte 0 (Python would
    # read that as "from the end"), a negative one past the end.
    data = K.build(valid())
    root = K.root_pos(data)
    expect(tmp_path, K.patch(data, root, soffset.to_bytes(4, "little", signed=True)), StructureError, "Model vtable", "outside")


def test_03_vtable_field_offset_outside_the_table(tmp_path):
    data = K.build(valid())
    vtable = K.vtable_pos(data, K.root_pos(data))
    slot = 4 + 2 * K.MODEL_SLOTS["graph"]
    expect(tmp_path, K.patch(data, vtable + slot, (0xFFF0).to_bytes(2, "little")), StructureError, "Model.graph", "field offset")


@pytest.mark.parametrize("uoffset", [0x7FFFFFF0, 0xFFFFFFFF])
def test_03_uoffset_past_the_end(tmp_path, uoffset):
    data = K.build(valid())
    expect(tmp_path, K.patch(data, K.model_field(data, "tensors"), uoffset.to_bytes(4, "little")), StructureError, "Model.tensors")


def test_03_odd_vtable_length(tmp_path):
    data = K.build(valid())
    vtable = K.vtable_pos(data, K.root_pos(data))
    expect(tmp_path, K.patch(data, vtable, (3).to_bytes(2, "little")), StructureError, "vtable length 3")


def test_04_vector_longer_than_the_buffer(tmp_path):
    data = K.build(valid())
    codebooks = K.follow(data, K.model_field(data, "codebooks"))
    codebook = K.follow(data, codebooks + 4)
    values = K.follow(data, K.field_pos(data, codebook, 0))
    # 0x40000001 x 4 bytes wraps to 4 in 32-bit arithmetic; Python ints do not wrap.
    expect(tmp_path, K.patch(data, values, (0x40000001).to_bytes(4, "little")), StructureError, "codebooks[0].values", "exceeds")


def test_04_string_not_nul_terminated(tmp_path):
    data = K.build(valid())
    producer = K.follow(data, K.model_field(data, "producer"))
    length = int.from_bytes(data[producer : producer + 4], "little")
    expect(tmp_path, K.patch(data, producer + 4 + length, b"x"), StructureError, "Model.producer", "NUL")


def test_04_string_not_utf8(tmp_path):
    spec = valid()
    spec.tensors[1].path = b"init:\xffW"
    expect(tmp_path, spec, StructureError, "path", "UTF-8")


def test_04_string_longer_than_the_limit(tmp_path):
    expect(tmp_path, valid(), StructureError, "Model.producer", "limit 4", limits=ReaderLimits(max_string_bytes=4))


def test_05_shared_sub_table(tmp_path):
    # Both tensors point at one Blob table: the index must be a tree.
    data = K.build(valid())
    fields = [K.field_pos(data, K.tensor_table(data, i), K.TENSOR_SLOTS["data"]) for i in range(2)]
    targets = [K.follow(data, f) for f in fields]
    src, dst = (0, 1) if targets[1] > fields[0] else (1, 0)
    assert targets[dst] > fields[src]
    expect(tmp_path, K.patch(data, fields[src], (targets[dst] - fields[src]).to_bytes(4, "little")), StructureError, "shared or cyclic")


def test_05_self_reference(tmp_path):
    # uoffsets are unsigned and added to their own position, so a cycle cannot be
    # written; the nearest is an offset of 0, which makes a field point at itself.
    data = K.build(valid())
    field = K.field_pos(data, K.tensor_table(data, 0), K.TENSOR_SLOTS["data"])
    expect(tmp_path, K.patch(data, field, bytes(4)), StructureError, "tensors[0].data")


def test_05_nesting_deeper_than_the_limit(tmp_path):
    # The schema nests 4 tables deep (Model > Tensor > Blob > Checksum); a lower cap shows the check.
    expect(tmp_path, valid(), StructureError, "nesting depth", limits=ReaderLimits(max_flatbuffer_depth=3))


def test_05_more_tables_than_the_cap(tmp_path):
    expect(tmp_path, valid(), StructureError, "more than 4 tables", limits=ReaderLimits(max_flatbuffer_tables=4))


def test_06_overlapping_payload_ranges(tmp_path):
    spec = valid()
    spec.tensors[1].data.offset = 0  # on top of the graph blob
    expect(tmp_path, spec, LayoutError, "overlaps")


def test_06_gap_between_payload_ranges(tmp_path):
    spec = valid()
    spec.tensors[1].data.offset = 4096
    expect(tmp_path, spec, LayoutError, "expected", "gap")


def test_06_trailing_bytes(tmp_path):
    spec = valid()
    spec.trailing = bytes(64)
    expect(tmp_path, spec, LayoutError, "64 bytes after the last payload range")


def test_06_nonzero_padding_between_blobs(tmp_path):
    spec = valid()
    spec.padding_byte = 0xAA
    expect(tmp_path, spec, LayoutError, "padding")


def test_06_nonzero_padding_before_the_payload(tmp_path):
    spec = valid()
    spec.index_padding_byte = 1
    expect(tmp_path, spec, LayoutError, "padding between the index")


def test_06_misaligned_blob(tmp_path):
    spec = valid()
    spec.layout_alignment = 16
    expect(tmp_path, spec, LayoutError, "expected")


def test_06_payload_offset_inside_the_index(tmp_path):
    spec = valid()
    spec.payload_offset = 64
    expect(tmp_path, spec, LayoutError, "payload_offset 64")


@pytest.mark.parametrize(
    "where, value, words",
    [
        ("dtype", 99, ("dtype 99",)),
        ("encoding", 0, ("encoding 0",)),
        ("encoding", 9, ("encoding 9",)),
        ("codec", 7, ("unknown codec 7",)),
        ("checksum", 9, ("checksum algorithm 9",)),
        ("checksum", 0, ("checksum algorithm 0",)),
        ("payload_digest", 2, ("payload_digest", "algorithm 2")),
        ("index_digest", 3, ("index_digest", "algorithm 3")),
    ],
)
def test_07_unknown_enum_values(tmp_path, where, value, words):
    spec = valid()
    tensor = spec.tensors[1]
    if where == "dtype":
        tensor.dtype = value
    elif where == "encoding":
        tensor.encoding = value
    elif where == "codec":
        tensor.data.codec = value
    elif where == "checksum":
        tensor.data.checksum = K.Checksum(value)
    elif where == "payload_digest":
        spec.payload_digest = K.Checksum(value)
    else:
        spec.index_digest = K.Checksum(value, bytes(32))
    expect(tmp_path, spec, EnumError, *words)


# ---------------------------------------------------------------- 8-11 shapes and sizes


def test_08_rank_above_the_cap(tmp_path):
    spec = valid()
    spec.tensors[1].dims = [1] * 7 + [8, 8]
    expect(tmp_path, spec, LimitError, "tensor 'init:W': rank 9", "limit 8")


def test_08_negative_dimension(tmp_path):
    spec = valid()
    spec.tensors[1].dims = [-8, -8]
    expect(tmp_path, spec, LimitError, "dims [-8, -8]", "negative")


def test_08_dims_whose_product_overflows_64_bits(tmp_path):
    dims = [4194305, 4194305, 211106198978564]
    assert int(np.prod(np.array(dims, dtype=np.uint64))) == 4  # what numpy would say
    spec = valid()
    spec.tensors[1].dims = dims
    message = expect(tmp_path, spec, LimitError, "element count")
    assert str(4194305 * 4194305 * 211106198978564) in message


def test_09_tensor_above_the_element_budget(tmp_path):
    spec = valid()
    spec.tensors[1].dims = [1 << 20, 1 << 15]
    expect(tmp_path, spec, LimitError, "element count", str(C.DEFAULT_LIMITS.max_tensor_elements))


def test_09_model_above_the_decoded_budget_is_rejected_before_any_allocation(tmp_path):
    path = write(tmp_path, valid())
    tracemalloc.start()
    try:
        with pytest.raises(LimitError, match="decoded model size"):
            moub_runtime.load(path, ReaderLimits(max_decoded_bytes=100))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_09_raw_decompression_bomb(tmp_path):
    spec = valid()
    raw = spec.tensors[0]
    packed = zlib.compress(bytes(1 << 16), 9)
    raw.dims, raw.data = [1 << 14], K.Blob(packed, C.CODEC_ZLIB, decoded_length=1 << 16)
    expect(tmp_path, spec, LimitError, "'init:B'.data: decoded_length 65536 exceeds 16 x", limits=ReaderLimits(max_expansion_ratio=16))


def test_09_huffman_bomb(tmp_path):
    # 2**30 elements in 16 stored bytes: rejected on the declared sizes, never decoded.
    spec = valid()
    tensor = spec.tensors[1]
    tensor.dims, tensor.chunk_elements = [1 << 30], 1 << 24
    tensor.chunk_bits = [128] + [0] * 63
    tensor.data = K.Blob(bytes(16))
    expect(tmp_path, spec, LimitError, "decoded bytes exceed 4096")


@pytest.mark.parametrize(
    "limits, words",
    [
        (ReaderLimits(max_tensors=1), ("tensor count 2", "limit 1")),
        (ReaderLimits(max_codebooks=0), ("codebook count 1",)),
        (ReaderLimits(max_tables=0), ("Huffman table count 1",)),
        (ReaderLimits(max_metadata_entries=0), ("metadata entry count 1",)),
        (ReaderLimits(max_chunks_per_tensor=2), ("chunk count 4", "limit 2")),
        (ReaderLimits(max_codebook_entries=4), ("codebook 0 length 5", "limit 4")),
    ],
)
def test_10_counts_above_caps(tmp_path, limits, words):
    expect(tmp_path, valid(), LimitError, *words, limits=limits)


def test_10_count_times_record_size_beyond_the_bytes_left(tmp_path):
    # 2**31 tensors of 4-byte offsets cannot fit in the file: refused at once, no loop over them.
    data = K.build(valid())
    vector = K.follow(data, K.model_field(data, "tensors"))
    expect(tmp_path, K.patch(data, vector, (1 << 31).to_bytes(4, "little")), StructureError, "Model.tensors", "exceeds")


@pytest.mark.parametrize("alignment", [0, 48, 1 << 17])
def test_11_bad_alignment(tmp_path, alignment):
    spec = valid()
    spec.alignment = alignment
    spec.layout_alignment = 64
    spec.payload_offset = 1024
    expect(tmp_path, spec, LayoutError, f"alignment {alignment}", "power of two")


# ---------------------------------------------------------------- 12-14 codebook and packed indices


def test_12_empty_codebook(tmp_path):
    spec = valid()
    spec.codebooks = [np.zeros(0, np.float32)]
    expect(tmp_path, spec, CodebookError, "codebook 0 is empty")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_12_non_finite_codebook_value(tmp_path, bad):
    spec = valid()
    spec.codebooks[0][2] = bad
    expect(tmp_path, spec, CodebookError, "codebook 0", "non-finite")


def test_12_codebook_that_does_not_exist(tmp_path):
    spec = valid()
    spec.tensors[1].codebook = 3
    expect(tmp_path, spec, CodebookError, "codebook 3 does not exist")


def test_12_codebook_dtype_is_fixed_so_the_tensor_dtype_is_checked(tmp_path):
    # Codebook values are float32 by schema (a typed vector): they cannot be of another
    # type. The nearest real thing: a HUFFMAN tensor declaring a non-float element type.
    spec = valid()
    spec.tensors[1].dtype = TensorProto.INT32
    expect(tmp_path, spec, StructureError, "dtype 6", "float")


def test_12_table_and_codebook_of_different_lengths(tmp_path):
    # The format has no per-channel tables; its nearest is a code-length table whose
    # length differs from the codebook it decodes into.
    spec = valid()
    spec.tables = [np.array([3, 2, 1, 4, 5, 5], np.uint8)]
    expect(tmp_path, spec, HuffmanError, "6 lengths for codebook 0 of 5 entries")


def test_13_code_length_above_the_maximum(tmp_path):
    # No fixed index width exists (indices are Huffman codes); the width's analogue is the
    # code length, capped at 20 bits.
    spec = valid()
    spec.tables = [np.array([1, 2, 3, 21, 21], np.uint8)]
    expect(tmp_path, spec, HuffmanError, "Huffman table 0", "code length 21 exceeds the limit 20")


def test_13_byte_length_not_the_sum_of_chunk_bytes(tmp_path):
    spec = valid()
    tensor = spec.tensors[1]
    tensor.data.payload += b"\0"
    expect(tmp_path, spec, StructureError, "chunk_bits need", "data.length")


def test_13_nonzero_padding_bits(tmp_path, decoder):
    spec = valid()
    tensor = spec.tensors[1]
    payload = bytearray(tensor.data.payload)
    position, chunk = 0, None
    for c, bits in enumerate(tensor.chunk_bits):
        position += (bits + 7) // 8
        if bits % 8:
            chunk = c
            break
    assert chunk is not None
    payload[position - 1] |= 1
    tensor.data.payload = bytes(payload)
    expect(tmp_path, spec, HuffmanError, "tensor 'init:W'", f"chunk {chunk}", "padding bits")


def test_14_indices_cannot_leave_the_codebook(tmp_path, decoder):
    # Every pattern of a complete table decodes to a symbol < len(code_lengths), and the
    # reader requires len(code_lengths) == len(codebook): an index >= K cannot come out,
    # and indices are unsigned (no -1 wrapping to the last entry). Checked on real bytes:
    path = write(tmp_path, valid())
    with MoubFile(path) as moub:
        indices = moub.decode_indices(moub.index.tensors[1])
    assert indices.dtype.kind == "u" and int(indices.max()) < K.CODEBOOK.size
    assert np.array_equal(indices, K.tiny_indices())


# ---------------------------------------------------------------- 15-19 canonical Huffman


def test_15_more_lengths_than_alphabet_entries(tmp_path):
    spec = valid()
    spec.tables = [np.array([3, 2, 1, 4, 4, 0, 0], np.uint8)]
    expect(tmp_path, spec, HuffmanError, "7 lengths for codebook 0 of 5 entries")


def test_15_length_far_above_the_maximum(tmp_path):
    # Lengths are bytes and at most 20, so a count table never has more than 21 classes
    # (never "len(count) > 32"); symbols are positions in the table, so they can be neither
    # outside [0, K) nor duplicated, and sum(count) == number of used symbols by construction.
    spec = valid()
    spec.tables = [np.array([1, 200, 2, 0, 0], np.uint8)]
    expect(tmp_path, spec, HuffmanError, "code length 200")


@pytest.mark.parametrize(
    "lengths, word",
    [
        ([1, 1, 1, 0, 0], "over-subscribed"),
        ([1, 1, 2, 0, 0], "over-subscribed"),  # bitarray's count=[0, 2, 1], which it decodes silently
        ([1, 2, 0, 0, 0], "incomplete"),
        ([2, 2, 2, 0, 0], "incomplete"),
        ([0, 0, 2, 0, 0], "one-symbol table must use length 1"),
        ([0, 0, 0, 0, 0], "no symbol has a code"),
    ],
)
def test_16_tables_whose_kraft_sum_is_not_one(tmp_path, lengths, word):
    spec = valid()
    spec.tables = [np.array(lengths, np.uint8)]
    expect(tmp_path, spec, HuffmanError, "Huffman table 0", word)


def test_16_the_one_symbol_table_decodes(tmp_path, decoder):
    spec = valid()
    spec.tables = [np.array([0, 0, 1, 0, 0], np.uint8)]
    spec.tensors[1] = K.huffman_tensor(np.full(64, 2), spec.tables[0])
    spec.graph = K.stripped_graph()
    model = full_read(write(tmp_path, spec))
    assert np.array_equal(numpy_helper.to_array(model.graph.initializer[0]), np.zeros((8, 8), np.float32))


def _rechunk(spec: K.Spec, chunk0: np.ndarray) -> None:
    """Replace chunk 0's stream of the Huffman tensor by the codes of ``chunk0``."""
    tensor = spec.tensors[1]
    indices = K.tiny_indices()
    first, bits0 = huffman.encode(chunk0, spec.tables[0])
    rest, bits = huffman.encode_chunks(indices[K.CHUNK:], spec.tables[0], K.CHUNK)
    tensor.data.payload = first + rest
    tensor.chunk_bits = [bits0] + bits


def test_17_chunk_ends_before_its_element_count(tmp_path, decoder):
    # The cut falls on a code boundary: 15 codes where 16 are declared.
    spec = valid()
    _rechunk(spec, K.tiny_indices()[: K.CHUNK - 1])
    expect(tmp_path, spec, HuffmanError, "tensor 'init:W'", "chunk 0", "16 codes do not take exactly chunk_bits")


def test_17_chunk_ends_in_the_middle_of_a_code(tmp_path, decoder):
    spec = valid()
    tensor = spec.tensors[1]
    lengths = spec.tables[0]
    chunk0 = K.tiny_indices()[: K.CHUNK]
    data, bits = huffman.encode(chunk0, lengths)
    cut = bits - 1                        # drop the last bit of the last code
    assert lengths[chunk0[-1]] > 1
    stream = bytearray(data[: (cut + 7) // 8])
    if cut % 8:
        stream[-1] &= (0xFF << (8 - cut % 8)) & 0xFF
    rest, rest_bits = huffman.encode_chunks(K.tiny_indices()[K.CHUNK:], lengths, K.CHUNK)
    tensor.data.payload = bytes(stream) + rest
    tensor.chunk_bits = [cut] + rest_bits
    expect(tmp_path, spec, HuffmanError, "chunk 0", f"chunk_bits {cut}")


def test_18_chunk_holds_more_codes_than_elements(tmp_path, decoder):
    spec = valid()
    extra = np.append(K.tiny_indices()[: K.CHUNK], [2, 2, 2])
    _rechunk(spec, extra)
    expect(tmp_path, spec, HuffmanError, "chunk 0", "16 codes do not take exactly chunk_bits")


def test_18_more_than_seven_bits_left_over(tmp_path, decoder):
    spec = valid()
    tensor = spec.tensors[1]
    first, bits0 = huffman.encode(K.tiny_indices()[: K.CHUNK], spec.tables[0])
    rest, bits = huffman.encode_chunks(K.tiny_indices()[K.CHUNK:], spec.tables[0], K.CHUNK)
    tensor.data.payload = first + b"\0" + rest
    tensor.chunk_bits = [bits0 + 8] + bits
    expect(tmp_path, spec, HuffmanError, "chunk 0", f"chunk_bits {bits0 + 8}")


def test_18_chunk_bits_disagree_with_the_stored_bytes(tmp_path):
    spec = valid()
    spec.tensors[1].chunk_bits[0] += 8
    expect(tmp_path, spec, StructureError, "chunk_bits need")


def test_19_chunk_count_does_not_match_the_elements(tmp_path):
    spec = valid()
    spec.tensors[1].chunk_elements = 32
    expect(tmp_path, spec, StructureError, "4 chunks", "need 2")


@pytest.mark.parametrize("chunk_elements", [0, (1 << 24) + 1])
def test_19_chunk_elements_out_of_range(tmp_path, chunk_elements):
    spec = valid()
    spec.tensors[1].chunk_elements = chunk_elements
    expect(tmp_path, spec, LimitError, f"chunk_elements {chunk_elements}")


def test_19_chunk_bits_impossible_for_the_count(tmp_path):
    # Chunk offsets are not stored (each chunk follows the last), so they cannot be out of
    # order; a chunk declaring fewer bits than codes, or more than 20 per code, is rejected
    # from the index before anything is decoded.
    spec = valid()
    tensor = spec.tensors[1]
    tensor.chunk_bits = [8, 8 * 8 * 20 * 2, tensor.chunk_bits[2], tensor.chunk_bits[3]]
    expect(tmp_path, spec, HuffmanError, "chunk_bits[0] = 8", "impossible for 16 codes")


# ---------------------------------------------------------------- 20-24 integrity and graph


def test_20_tensor_checksum_mismatch(tmp_path):
    spec = valid()
    spec.tensors[1].data.checksum = K.Checksum(digest=bytes(32))
    expect(tmp_path, spec, ChecksumError, "tensor 'init:W'", "checksum mismatch")


def test_20_graph_checksum_mismatch(tmp_path):
    spec = valid()
    spec.graph.checksum = K.Checksum(digest=bytes(32))
    expect(tmp_path, spec, ChecksumError, "graph", "checksum mismatch")


def test_20_payload_digest_mismatch(tmp_path):
    spec = valid()
    spec.payload_digest = K.Checksum(digest=bytes(32))
    path = write(tmp_path, spec)
    # every blob is intact, but verify and load accept the same files: both check the digest
    with pytest.raises(ChecksumError, match="whole-payload digest mismatch"):
        full_read(path)
    problems = moub_inspect.verify_file(path)
    assert len(problems) == 1 and "whole-payload digest mismatch" in problems[0] and str(path) in problems[0]


def test_20_index_digest_mismatch(tmp_path):
    data = bytearray(K.build(valid()))
    codebooks = K.follow(data, K.model_field(data, "codebooks"))
    values = K.follow(data, K.field_pos(data, K.follow(data, codebooks + 4), 0))
    data[values + 4 + 3 * 4] ^= 0x01      # one mantissa bit of codebook[0][3]: no blob checksum covers it
    expect(tmp_path, bytes(data), ChecksumError, "index_digest mismatch")


@pytest.mark.parametrize("size", [0, 16, 64])
def test_20_checksum_of_the_wrong_length(tmp_path, size):
    spec = valid()
    spec.tensors[1].data.checksum = K.Checksum(digest=bytes(size))
    expect(tmp_path, spec, StructureError, "tensor 'init:W'.data.checksum", f"{size} bytes")


def test_20_missing_checksum(tmp_path):
    spec = valid()
    spec.tensors[1].data.checksum = None
    expect(tmp_path, spec, StructureError, "checksum is missing")


def test_20_missing_index_digest(tmp_path):
    spec = valid()
    spec.index_digest = None
    expect(tmp_path, spec, StructureError, "index_digest is missing")


def test_21_duplicate_tensor_paths(tmp_path):
    spec = valid()
    spec.tensors[0].path = "init:W"
    expect(tmp_path, spec, StructureError, "'init:W' appears more than once")


def test_21_tensors_not_sorted(tmp_path):
    spec = valid()
    spec.tensors.reverse()
    expect(tmp_path, spec, StructureError, "not sorted by path")


def test_21_tensor_without_a_site(tmp_path):
    spec = valid()
    spec.tensors[1].path = "init:Z"
    expect(tmp_path, spec, GraphError, "'init:Z' has no matching tensor")


def test_21_graph_tensor_the_file_does_not_provide(tmp_path):
    spec = valid()
    del spec.tensors[1]
    expect(tmp_path, spec, GraphError, "'init:W' has no data")


def test_21_dtype_differs_from_the_graph(tmp_path):
    spec = valid()
    spec.tensors[1].dtype = TensorProto.FLOAT16
    expect(tmp_path, spec, GraphError, "'init:W'", "element type 10")


def test_21_dims_differ_from_the_graph(tmp_path):
    spec = valid()
    spec.tensors[1].dims = [64]
    expect(tmp_path, spec, GraphError, "'init:W'", "dims [64]")


def test_21_graph_keeps_the_data_too(tmp_path):
    spec = valid()
    model = K.tiny_model()
    model.graph.initializer[1].ClearField("raw_data")  # B stripped, W left in place
    model.graph.initializer[1].ClearField("float_data")
    spec.graph = K.Blob(model.SerializeToString())
    expect(tmp_path, spec, GraphError, "'init:W' is stored twice")


def _if_model() -> onnx.ModelProto:
    then = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wt"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(np.zeros((8, 8), np.float32), "Wt")],
    )
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 8])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    then = next(a for a in model.graph.node[0].attribute if a.name == "then_branch")
    for tensor in then.g.initializer:
        tensor.ClearField("raw_data")
    return model


def test_21_subgraph_site_with_other_dims(tmp_path):
    spec = valid()
    spec.graph = K.Blob(_if_model().SerializeToString())
    tensor = K.huffman_tensor(K.tiny_indices(), spec.tables[0], path="node:0/then_branch/init:Wt", name="Wt", dims=[4, 16])
    spec.tensors = [tensor]
    expect(tmp_path, spec, GraphError, "'node:0/then_branch/init:Wt'", "dims [4, 16]")


def test_21_subgraph_site_round_trips(tmp_path):
    spec = valid()
    spec.graph = K.Blob(_if_model().SerializeToString())
    spec.tensors = [K.huffman_tensor(K.tiny_indices(), spec.tables[0], path="node:0/then_branch/init:Wt", name="Wt")]
    model = full_read(write(tmp_path, spec))
    then = next(a for a in model.graph.node[0].attribute if a.name == "then_branch")
    weight = numpy_helper.to_array(then.g.initializer[0])
    assert np.array_equal(weight.ravel(), K.CODEBOOK[K.tiny_indices()])


def test_22_graph_above_the_size_cap(tmp_path):
    expect(tmp_path, valid(), LimitError, "graph size in bytes", "limit 100", limits=ReaderLimits(max_graph_bytes=100))


def test_22_graph_inflates_past_its_declared_length(tmp_path):
    spec = valid()
    spec.graph.decoded_length = 50  # the stream holds more: inflation stops at 50 + 1 bytes
    expect(tmp_path, spec, StructureError, "graph", "does not inflate to exactly 50 bytes")


def test_22_graph_zlib_bomb_above_the_expansion_ratio(tmp_path):
    spec = valid()
    spec.graph = K.Blob(zlib.compress(bytes(1 << 20), 9), C.CODEC_ZLIB, decoded_length=1 << 20)
    expect(tmp_path, spec, LimitError, "graph", "exceeds 64 x", limits=ReaderLimits(max_expansion_ratio=64))


def test_22_corrupt_zlib_stream(tmp_path):
    spec = valid()
    spec.graph.payload = spec.graph.payload[:10] + bytes(len(spec.graph.payload) - 10)
    expect(tmp_path, spec, StructureError, "graph", "zlib")


def test_22_graph_that_is_not_onnx(tmp_path):
    spec = valid()
    spec.graph = K.Blob(b"\xff" * 40)
    expect(tmp_path, spec, GraphError, "graph", "does not parse")


def test_22_graph_referring_to_external_data(tmp_path):
    model = K.tiny_model()
    for tensor in model.graph.initializer:
        tensor.ClearField("raw_data")
    bias = model.graph.initializer[1]
    bias.data_location = TensorProto.EXTERNAL
    entry = bias.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    spec = valid()
    spec.graph = K.Blob(model.SerializeToString())
    del spec.tensors[0]
    expect(tmp_path, spec, GraphError, "'init:B' refers to external data")


def test_22_codec_none_with_another_decoded_length(tmp_path):
    spec = valid()
    spec.graph = K.Blob(zlib.decompress(spec.graph.payload), decoded_length=5)
    expect(tmp_path, spec, StructureError, "graph", "decoded_length 5")


def test_23_metadata_key_too_long(tmp_path):
    spec = valid()
    spec.metadata = [("k" * 257, "v")]
    expect(tmp_path, spec, MetadataError, "metadata[0].key of 257 bytes", "limit 256")


def test_23_metadata_value_too_long(tmp_path):
    expect(tmp_path, valid(), MetadataError, "metadata[0].value of 13 bytes", "limit 4",
           limits=ReaderLimits(max_metadata_value_bytes=4))


def test_23_metadata_not_utf8(tmp_path):
    spec = valid()
    spec.metadata = [("moub.purpose", b"\xc3\x28")]
    expect(tmp_path, spec, StructureError, "metadata[0].value", "UTF-8")


def test_23_too_many_metadata_entries(tmp_path):
    spec = valid()
    spec.metadata = [(f"k{i:04d}", "v") for i in range(1025)]
    expect(tmp_path, spec, LimitError, "metadata entry count 1025", "limit 1024")


def test_23_duplicate_metadata_keys(tmp_path):
    spec = valid()
    spec.metadata = [("a", "1"), ("a", "2")]
    expect(tmp_path, spec, MetadataError, "'a' appears more than once")


def test_23_unsorted_metadata_keys(tmp_path):
    spec = valid()
    spec.metadata = [("b", "1"), ("a", "2")]
    expect(tmp_path, spec, MetadataError, "not sorted")


class _Trap:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_24_metadata_is_data_never_unpickled_or_evaluated(tmp_path, capsys):
    sentinel = tmp_path / "executed"
    spec = valid()
    payload = pickle.dumps(_Trap(str(sentinel)), protocol=0).decode("latin-1")
    spec.metadata = [("moub.pickle", payload), ("moub.settings", f"__import__('pathlib').Path({str(sentinel)!r}).touch()")]
    path = write(tmp_path, spec)
    full_read(path)
    moub_inspect.summarize(path)
    assert moub_inspect.verify_file(path) == []
    from moub_runtime.cli import main
    assert main(["inspect", str(path), "--json"]) == 0
    assert not sentinel.exists()
    assert '"moub.pickle": "c__builtin__' in capsys.readouterr().out  # shown as data


def test_24_custom_op_domains_load_nothing(tmp_path, monkeypatch):
    # The format has no field for libraries; a graph node in an unknown domain stays data:
    # decoding works, a session fails in onnxruntime, and no library is ever registered.
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("a custom-op library was registered")

    monkeypatch.setattr(onnxruntime.SessionOptions, "register_custom_ops_library", refuse, raising=False)
    model = K.tiny_model()
    node = model.graph.node[1]
    node.op_type, node.domain = "Evil", "com.evil"
    node.attribute.append(helper.make_attribute("library_path", "/tmp/libevil.so"))
    model.opset_import.append(helper.make_opsetid("com.evil", 1))
    spec = valid()
    spec.graph = K.stripped_graph(model)
    path = write(tmp_path, spec)
    decoded = full_read(path)
    assert decoded.graph.node[1].domain == "com.evil"
    with pytest.raises(Exception) as caught:
        moub_runtime.InferenceSession(path)
    assert not isinstance(caught.value, AssertionError)


def test_24_unknown_index_fields_are_ignored(tmp_path):
    # A newer minor may append fields; this reader ignores them (FORMAT.md §2): a tensor
    # table with a field in a slot the schema does not have still reads, and the field
    # cannot make the reader do anything.
    spec = valid()
    spec.tensors[1].future_field = 0xDEADBEEF
    data = K.build(spec)
    vtable = K.vtable_pos(data, K.tensor_table(data, 1))
    assert int.from_bytes(data[vtable : vtable + 2], "little") == 4 + 2 * 11
    full_read(write(tmp_path, data))
