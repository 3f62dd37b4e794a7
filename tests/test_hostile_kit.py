"""Building blocks for hostile .moub files (no tests here).

A :class:`Spec` mirrors the index field by field; :func:`build` turns it into
bytes, laying out the payload and recomputing blob checksums, the payload
digest and the index digest unless a test pins them. Tests start from
:func:`valid_spec`, break exactly one thing and assert the exact error, so each
file reaches the check it targets. :func:`locate` finds the byte position of
FlatBuffer structures for patches below the level of fields.
"""

from __future__ import annotations

import copy
import hashlib
import zlib
from dataclasses import dataclass, field, replace

import flatbuffers
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moub_format import constants as C
from moub_format import huffman
from moub_format.fb import Blob as FbBlob
from moub_format.fb import Checksum as FbChecksum
from moub_format.fb import Codebook as FbCodebook
from moub_format.fb import HuffmanTable as FbHuffmanTable
from moub_format.fb import MetadataEntry as FbMetadataEntry
from moub_format.fb import Model as FbModel
from moub_format.fb import Pack as FbPack
from moub_format.fb import Tensor as FbTensor
from moub_format.writer import index_digest_position
from moub_runtime.payload import clear_payload

AUTO = None  # a field left to build(): computed from the rest


@dataclass
class Checksum:
    algorithm: int = C.CHECKSUM_SHA256
    digest: bytes | None = AUTO


@dataclass
class Blob:
    payload: bytes
    codec: int = C.CODEC_NONE
    offset: int | None = AUTO
    length: int | None = AUTO
    decoded_length: int | None = AUTO
    checksum: Checksum | None = field(default_factory=Checksum)


@dataclass
class Tensor:
    path: str | bytes
    name: str | bytes
    dtype: int
    dims: list[int]
    encoding: int
    data: Blob | None
    codebook: int = 0
    table: int = 0
    chunk_elements: int = 0
    chunk_bits: list[int] | None = None
    future_field: int | None = None   # a uint32 in slot 10, which this schema does not have


@dataclass
class Grid:
    """A grid codebook (1.2): ``first .. first + count - 1``; ``values`` set too makes it invalid."""

    first: int
    count: int
    values: np.ndarray | None = None


@dataclass
class Table:
    """A HuffmanTable field by field (1.2): ``code_lengths``, or ``packed_lengths`` with its
    ``count``; any other mix makes it invalid. A plain array in ``Spec.tables`` is the plain form."""

    code_lengths: np.ndarray | None = None
    packed_lengths: bytes | None = None
    count: int = 0


def packed_table(lengths: np.ndarray) -> Table:
    """The packed form of ``lengths``, as the writer makes it (whatever its size)."""
    return Table(None, huffman.pack_lengths(lengths), len(lengths))


@dataclass
class Pack:
    sites: list[int] | None
    counts: list[int] | None
    scales: list[float] | None
    data: Blob | None
    codebook: int = 0
    table: int = 0
    chunk_elements: int = 0
    chunk_bits: list[int] | None = None
    offsets: list[int] | None = None
    counts32: list[int] | None = None       # the 1.3 forms (FEATURE_COMPACT_PACKS)
    chunk_bits32: list[int] | None = None
    offsets32: list[int] | None = None


def compact(pack: Pack) -> Pack:
    """The same pack with its counts, chunk_bits and offsets in the 32-bit vectors of format 1.3."""
    return replace(pack, counts=None, chunk_bits=None, offsets=None,
                   counts32=pack.counts, chunk_bits32=pack.chunk_bits, offsets32=pack.offsets)


@dataclass
class Spec:
    graph: Blob | None
    codebooks: list[np.ndarray | Grid]
    tables: list[np.ndarray | Table]
    tensors: list[Tensor]
    metadata: list[tuple[str | bytes, str | bytes]]
    packs: list[Pack] | None = None
    format_major: int = C.FORMAT_MAJOR
    format_minor: int = C.FORMAT_MINOR
    required_features: int = 0
    producer: str | bytes = "moub hostile-kit"
    alignment: int = C.DEFAULT_ALIGNMENT
    layout_alignment: int | None = None      # alignment used to place blobs (default: alignment)
    payload_offset: int | None = AUTO
    payload_digest: Checksum | None = field(default_factory=Checksum)
    index_digest: Checksum | None = field(default_factory=Checksum)
    padding_byte: int = 0                    # fill between payload blobs
    index_padding_byte: int = 0              # fill between index and payload_offset
    trailing: bytes = b""                    # bytes after the last blob


# ---------------------------------------------------------------- a tiny valid model

N_IN, N_OUT = 8, 8
CODEBOOK = np.array([-0.5, -0.25, 0.0, 0.25, 0.5], dtype=np.float32)
CHUNK = 16


def _lengths() -> np.ndarray:
    lengths = np.array([3, 2, 1, 4, 4], dtype=np.uint8)  # 1/8 + 1/4 + 1/2 + 1/16 + 1/16 = 1
    huffman.validate_lengths(lengths)
    return lengths


def tiny_model() -> onnx.ModelProto:
    """x[1,8] -> MatMul W[8,8] (Huffman) -> Add B[8,8] (raw float) -> y."""
    rng = np.random.default_rng(7)
    weight = CODEBOOK[rng.integers(0, CODEBOOK.size, (N_IN, N_OUT))]
    bias = rng.standard_normal((N_IN, N_OUT)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [N_IN, N_OUT])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tiny_indices() -> np.ndarray:
    model = tiny_model()
    weight = numpy_helper.to_array(model.graph.initializer[0]).ravel()
    return np.searchsorted(CODEBOOK, weight).astype(np.int64)


def stripped_graph(model: onnx.ModelProto | None = None, codec: int = C.CODEC_ZLIB) -> Blob:
    model = copy.deepcopy(model or tiny_model())
    for tensor in model.graph.initializer:
        clear_payload(tensor)
    data = model.SerializeToString(deterministic=True)
    if codec == C.CODEC_ZLIB:
        return Blob(zlib.compress(data, 9), C.CODEC_ZLIB, decoded_length=len(data))
    return Blob(data)


def huffman_tensor(indices: np.ndarray, lengths: np.ndarray, chunk: int = CHUNK, path: str = "init:W", name: str = "W",
                   dims: list[int] | None = None, dtype: int = TensorProto.FLOAT) -> Tensor:
    data, bits = huffman.encode_chunks(indices, lengths, chunk)
    return Tensor(path, name, dtype, dims or [N_IN, N_OUT], C.ENCODING_HUFFMAN, Blob(data), 0, 0, chunk, bits)


def raw_tensor(array: np.ndarray, path: str, name: str, dtype: int = TensorProto.FLOAT) -> Tensor:
    return Tensor(path, name, dtype, list(array.shape), C.ENCODING_RAW, Blob(np.ascontiguousarray(array).tobytes()))


def valid_spec() -> Spec:
    model = tiny_model()
    bias = numpy_helper.to_array(model.graph.initializer[1])
    return Spec(
        graph=stripped_graph(model),
        codebooks=[CODEBOOK.copy()],
        tables=[_lengths()],
        tensors=[raw_tensor(bias, "init:B", "B"), huffman_tensor(tiny_indices(), _lengths())],
        metadata=[("moub.purpose", "hostile tests")],
    )


# ---------------------------------------------------------------- a tiny valid 1.2 file with a pack

SCALES = (0.25, 0.125)  # W is exactly CODEBOOK = 0.25 x {-2..2}; B is rounded to multiples of 1/8


def pack_ints() -> np.ndarray:
    """The integers of W (site 0) then B (site 1): value = integer x scale."""
    model = tiny_model()
    weight, bias = (numpy_helper.to_array(t).ravel() for t in model.graph.initializer)
    return np.concatenate([np.rint(weight / SCALES[0]), np.rint(bias / SCALES[1])]).astype(np.int64)


def pack_of(ints: np.ndarray, first: int, lengths: np.ndarray, sites=(0, 1), counts=None, scales=SCALES, chunk: int = CHUNK,
            offsets=None) -> Pack:
    data, bits = huffman.encode_chunks(ints - first, lengths, chunk)
    counts = list(counts) if counts is not None else [N_IN * N_OUT] * len(sites)
    return Pack(list(sites), counts, list(scales), Blob(data), 0, 0, chunk, bits, list(offsets) if offsets is not None else None)


def valid_pack_spec() -> Spec:
    """Both initializers of the tiny model as one pack over a grid codebook (format 1.2)."""
    ints = pack_ints()
    first, count = int(ints.min()), int(ints.max() - ints.min() + 1)
    lengths = huffman.code_lengths(np.bincount(ints - first, minlength=count), 15)
    return Spec(
        graph=stripped_graph(),
        codebooks=[Grid(first, count)],
        tables=[lengths],
        tensors=[],
        metadata=[("moub.purpose", "hostile tests")],
        packs=[pack_of(ints, first, lengths)],
        required_features=C.FEATURE_PACKS,
    )


def expected_pack_values() -> list[np.ndarray]:
    ints = pack_ints().astype(np.float32)
    n = N_IN * N_OUT
    return [(ints[:n] * np.float32(SCALES[0])).reshape(N_IN, N_OUT), (ints[n:] * np.float32(SCALES[1])).reshape(N_IN, N_OUT)]


B_OFFSET = 7   # B's levels minus this on the grid: W's and B's stored integers overlap


def valid_offset_pack_spec() -> Spec:
    """The pack of :func:`valid_pack_spec` with an offsets vector: W at offset 0, B's levels
    stored as level - B_OFFSET. Decodes to the same values (:func:`expected_pack_values`)."""
    ints = pack_ints()
    n = N_IN * N_OUT
    stored = np.concatenate([ints[:n], ints[n:] - B_OFFSET])
    first, count = int(stored.min()), int(stored.max() - stored.min() + 1)
    lengths = huffman.code_lengths(np.bincount(stored - first, minlength=count), 15)
    spec = valid_pack_spec()
    spec.codebooks, spec.tables = [Grid(first, count)], [lengths]
    spec.packs = [pack_of(stored, first, lengths, offsets=[0, B_OFFSET])]
    return spec


# ---------------------------------------------------------------- building


def _layout(spec: Spec) -> tuple[list[Blob], bytes]:
    blobs = [b for b in [spec.graph] + [t.data for t in spec.tensors] + [p.data for p in spec.packs or []] if b is not None]
    alignment = spec.layout_alignment or spec.alignment or 1
    position, placed = 0, []
    for blob in blobs:
        start = blob.offset if blob.offset is not None else -(-position // alignment) * alignment
        placed.append((start, blob))
        position = max(position, start + len(blob.payload))
    payload = bytearray([spec.padding_byte]) * position
    for start, blob in placed:
        payload[start : start + len(blob.payload)] = blob.payload
    return [(start, blob) for start, blob in placed], bytes(payload) + spec.trailing


def build(spec: Spec) -> bytes:
    placed, payload = _layout(spec)
    offsets = {id(blob): start for start, blob in placed}

    def index_bytes(payload_offset: int) -> bytes:
        builder = flatbuffers.Builder(1024)

        def checksum(item: Checksum | None, data: bytes) -> int | None:
            if item is None:
                return None
            digest = item.digest if item.digest is not None else hashlib.sha256(data).digest()
            vec = builder.CreateNumpyVector(np.frombuffer(digest, dtype=np.uint8))
            FbChecksum.Start(builder)
            FbChecksum.AddAlgorithm(builder, item.algorithm)
            FbChecksum.AddDigest(builder, vec)
            return FbChecksum.End(builder)

        def blob(item: Blob | None) -> int | None:
            if item is None:
                return None
            digest = checksum(item.checksum, item.payload)
            FbBlob.Start(builder)
            FbBlob.AddOffset(builder, item.offset if item.offset is not None else offsets[id(item)])
            FbBlob.AddLength(builder, item.length if item.length is not None else len(item.payload))
            FbBlob.AddCodec(builder, item.codec)
            FbBlob.AddDecodedLength(builder, item.decoded_length if item.decoded_length is not None else len(item.payload))
            if digest is not None:
                FbBlob.AddChecksum(builder, digest)
            return FbBlob.End(builder)

        def vector(start, items: list[int]) -> int:
            start(builder, len(items))
            for item in reversed(items):
                builder.PrependUOffsetTRelative(item)
            return builder.EndVector()

        codebooks = []
        for values in spec.codebooks:
            if isinstance(values, Grid):
                vec = builder.CreateNumpyVector(np.asarray(values.values, dtype="<f4")) if values.values is not None else None
                FbCodebook.Start(builder)
                if vec is not None:
                    FbCodebook.AddValues(builder, vec)
                FbCodebook.AddFirst(builder, values.first)
                FbCodebook.AddCount(builder, values.count)
            else:
                vec = builder.CreateNumpyVector(np.asarray(values, dtype="<f4"))
                FbCodebook.Start(builder)
                FbCodebook.AddValues(builder, vec)
            codebooks.append(FbCodebook.End(builder))
        tables = []
        for item in spec.tables:
            item = item if isinstance(item, Table) else Table(item)
            plain = builder.CreateNumpyVector(np.asarray(item.code_lengths, dtype=np.uint8)) if item.code_lengths is not None else None
            packed = (builder.CreateNumpyVector(np.frombuffer(item.packed_lengths, dtype=np.uint8))
                      if item.packed_lengths is not None else None)
            FbHuffmanTable.Start(builder)
            if plain is not None:
                FbHuffmanTable.AddCodeLengths(builder, plain)
            if packed is not None:
                FbHuffmanTable.AddPackedLengths(builder, packed)
            FbHuffmanTable.AddCount(builder, item.count)
            tables.append(FbHuffmanTable.End(builder))
        tensors = []
        for t in spec.tensors:
            path = builder.CreateString(t.path)
            name = builder.CreateString(t.name)
            dims = builder.CreateNumpyVector(np.asarray(t.dims, dtype="<i8"))
            data = blob(t.data)
            bits = builder.CreateNumpyVector(np.asarray(t.chunk_bits, dtype="<u8")) if t.chunk_bits is not None else None
            if t.future_field is None:
                FbTensor.Start(builder)
            else:
                builder.StartObject(11)
                builder.PrependUint32Slot(10, t.future_field, 0)
            FbTensor.AddPath(builder, path)
            FbTensor.AddName(builder, name)
            FbTensor.AddDtype(builder, t.dtype)
            FbTensor.AddDims(builder, dims)
            FbTensor.AddEncoding(builder, t.encoding)
            if data is not None:
                FbTensor.AddData(builder, data)
            FbTensor.AddCodebook(builder, t.codebook)
            FbTensor.AddTable(builder, t.table)
            FbTensor.AddChunkElements(builder, t.chunk_elements)
            if bits is not None:
                FbTensor.AddChunkBits(builder, bits)
            tensors.append(FbTensor.End(builder))
        packs = []
        for p in spec.packs or []:
            vectors = [
                builder.CreateNumpyVector(np.asarray(v, dtype=dt)) if v is not None else None
                for v, dt in ((p.sites, "<u4"), (p.counts, "<u8"), (p.scales, "<f4"), (p.chunk_bits, "<u8"), (p.offsets, "<i8"),
                              (p.counts32, "<u4"), (p.chunk_bits32, "<u4"), (p.offsets32, "<i4"))
            ]
            data = blob(p.data)
            FbPack.Start(builder)
            adders = (FbPack.AddSites, FbPack.AddCounts, FbPack.AddScales, FbPack.AddChunkBits, FbPack.AddOffsets,
                      FbPack.AddCounts32, FbPack.AddChunkBits32, FbPack.AddOffsets32)
            for add, vec in zip(adders, vectors):
                if vec is not None:
                    add(builder, vec)
            FbPack.AddCodebook(builder, p.codebook)
            FbPack.AddTable(builder, p.table)
            FbPack.AddChunkElements(builder, p.chunk_elements)
            if data is not None:
                FbPack.AddData(builder, data)
            packs.append(FbPack.End(builder))
        entries = []
        for key, value in spec.metadata:
            k, v = builder.CreateString(key), builder.CreateString(value)
            FbMetadataEntry.Start(builder)
            FbMetadataEntry.AddKey(builder, k)
            FbMetadataEntry.AddValue(builder, v)
            entries.append(FbMetadataEntry.End(builder))
        producer = builder.CreateString(spec.producer)
        graph = blob(spec.graph)
        codebooks_vec = vector(FbModel.StartCodebooksVector, codebooks)
        tables_vec = vector(FbModel.StartTablesVector, tables)
        tensors_vec = vector(FbModel.StartTensorsVector, tensors)
        metadata_vec = vector(FbModel.StartMetadataVector, entries)
        packs_vec = vector(FbModel.StartPacksVector, packs) if spec.packs is not None else None
        payload_digest = checksum(spec.payload_digest, payload)
        index_digest = None
        if spec.index_digest is not None:  # zeros now; build() fills in the real digest
            placeholder = spec.index_digest.digest if spec.index_digest.digest is not None else bytes(32)
            index_digest = checksum(Checksum(spec.index_digest.algorithm, placeholder), b"")
        FbModel.Start(builder)
        FbModel.AddFormatMajor(builder, spec.format_major)
        FbModel.AddFormatMinor(builder, spec.format_minor)
        FbModel.AddRequiredFeatures(builder, spec.required_features)
        FbModel.AddProducer(builder, producer)
        FbModel.AddAlignment(builder, spec.alignment)
        FbModel.AddPayloadOffset(builder, payload_offset)
        if graph is not None:
            FbModel.AddGraph(builder, graph)
        FbModel.AddCodebooks(builder, codebooks_vec)
        FbModel.AddTables(builder, tables_vec)
        FbModel.AddTensors(builder, tensors_vec)
        FbModel.AddMetadata(builder, metadata_vec)
        if payload_digest is not None:
            FbModel.AddPayloadDigest(builder, payload_digest)
        if index_digest is not None:
            FbModel.AddIndexDigest(builder, index_digest)
        if packs_vec is not None:
            FbModel.AddPacks(builder, packs_vec)
        builder.Finish(FbModel.End(builder), file_identifier=C.FILE_IDENTIFIER)
        return bytes(builder.Output())

    alignment = spec.alignment if spec.alignment and not spec.alignment & (spec.alignment - 1) else 64
    draft = index_bytes((1 << 64) - 1 if spec.payload_offset is None else spec.payload_offset)
    payload_offset = spec.payload_offset if spec.payload_offset is not None else -(-len(draft) // alignment) * alignment
    index = index_bytes(payload_offset)
    head = bytearray(index + bytes([spec.index_padding_byte]) * max(0, payload_offset - len(index)))
    if spec.index_digest is not None and spec.index_digest.digest is None and payload_offset >= len(index):
        head = head[:payload_offset]
        position = index_digest_position(head)
        head[position : position + 32] = hashlib.sha256(bytes(head)).digest()
    return bytes(head) + payload


def reseal(data: bytes | bytearray) -> bytes:
    """Recompute the index digest of a patched file (the patch must keep the index verifiable)."""
    head_end = FbModel.Model.GetRootAs(data, 0).PayloadOffset()
    head = bytearray(data[:head_end])
    position = index_digest_position(head)
    head[position : position + 32] = bytes(32)
    head[position : position + 32] = hashlib.sha256(bytes(head)).digest()
    return bytes(head) + bytes(data[head_end:])


# ---------------------------------------------------------------- locating structures


def root_pos(data: bytes) -> int:
    return int.from_bytes(data[0:4], "little")


def vtable_pos(data: bytes, table: int) -> int:
    return table - int.from_bytes(data[table : table + 4], "little", signed=True)


def field_pos(data: bytes, table: int, slot: int) -> int:
    """Absolute position of field ``slot`` of the table at ``table`` (0 if absent)."""
    vt = vtable_pos(data, table)
    voffset = int.from_bytes(data[vt + 4 + 2 * slot : vt + 6 + 2 * slot], "little")
    return table + voffset if voffset else 0


def follow(data: bytes, pos: int) -> int:
    return pos + int.from_bytes(data[pos : pos + 4], "little")


MODEL_SLOTS = {name: i for i, name in enumerate(
    ["format_major", "format_minor", "required_features", "producer", "alignment", "payload_offset", "graph",
     "codebooks", "tables", "tensors", "metadata", "payload_digest", "index_digest", "packs"]
)}
PACK_SLOTS = {name: i for i, name in enumerate(
    ["sites", "counts", "scales", "codebook", "table", "chunk_elements", "chunk_bits", "data", "offsets",
     "counts32", "chunk_bits32", "offsets32"]
)}
TENSOR_SLOTS = {name: i for i, name in enumerate(
    ["path", "name", "dtype", "dims", "encoding", "data", "codebook", "table", "chunk_elements", "chunk_bits"]
)}


def model_field(data: bytes, name: str) -> int:
    return field_pos(data, root_pos(data), MODEL_SLOTS[name])


def tensor_table(data: bytes, i: int) -> int:
    vector = follow(data, model_field(data, "tensors"))
    return follow(data, vector + 4 + 4 * i)


def patch(data: bytes, pos: int, new: bytes) -> bytes:
    return data[:pos] + new + data[pos + len(new):]
