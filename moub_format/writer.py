"""Write .moub files: canonical (same input, same bytes) and atomic.

Canonical: tensors sorted by path, metadata by key, fixed alignment and zero
padding, zlib at a fixed level, no timestamps. Atomic: the bytes go to a
temporary file in the target folder, are fsynced, then renamed over the
target, so a reader that has the old file mapped never sees it truncated.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import flatbuffers
import numpy as np

from . import constants as C
from . import dtypes, huffman
from .fb import Blob as FbBlob
from .fb import Checksum as FbChecksum
from .fb import Codebook as FbCodebook
from .fb import HuffmanTable as FbHuffmanTable
from .fb import MetadataEntry as FbMetadataEntry
from .fb import Model as FbModel
from .fb import Tensor as FbTensor

ZLIB_LEVEL = 9
PRODUCER = "moub 0.1.0"


@dataclass(frozen=True)
class HuffmanTensor:
    """A tensor stored as codebook indices (one per element, C order)."""

    path: str
    name: str
    dtype: int
    dims: tuple[int, ...]
    indices: np.ndarray
    codebook: int
    table: int | None = None  # None: the shared table of its codebook


@dataclass(frozen=True)
class RawTensor:
    """A pass-through tensor: its raw little-endian bytes, optionally zlib-packed."""

    path: str
    name: str
    dtype: int
    dims: tuple[int, ...]
    data: bytes
    codec: int = C.CODEC_NONE


TensorSpec = HuffmanTensor | RawTensor


@dataclass(frozen=True)
class _Stored:
    payload: bytes
    codec: int
    decoded_length: int


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _pack(data: bytes, codec: int) -> _Stored:
    if codec == C.CODEC_NONE:
        return _Stored(data, codec, len(data))
    if codec == C.CODEC_ZLIB:
        return _Stored(zlib.compress(data, ZLIB_LEVEL), codec, len(data))
    raise ValueError(f"unknown codec {codec}")


def shared_tables(codebooks: Sequence[np.ndarray], tensors: Sequence[TensorSpec]) -> list[np.ndarray]:
    """One length-limited Huffman table per codebook, from all indices that use it."""
    frequencies = [np.zeros(len(cb), dtype=np.int64) for cb in codebooks]
    for tensor in tensors:
        if isinstance(tensor, HuffmanTensor):
            frequencies[tensor.codebook] += np.bincount(tensor.indices, minlength=len(codebooks[tensor.codebook]))
    tables = []
    for freq in frequencies:
        if not freq.any():
            freq = freq.copy()
            freq[0] = 1
        tables.append(huffman.code_lengths(freq, huffman.writer_max_length(int(np.count_nonzero(freq)))))
    return tables


def default_chunk_elements(total_elements: int) -> int:
    """Elements per chunk when :func:`build` is not told: a power of two in
    [MIN_DEFAULT_CHUNK_ELEMENTS, DEFAULT_CHUNK_ELEMENTS] = [512, 4096], the
    largest that still gives the lane decoder about DECODER_LANES chunks.
    Each chunk costs 64 bits (its chunk_bits entry) plus ~4 bits of padding:
    0.017 bits/weight at 4096, 0.066 at 1024, 0.13 at 512 (models under 1 M
    weights, where decode time is mostly per-step overhead)."""
    target = max(1, total_elements // C.DECODER_LANES)
    return min(C.DEFAULT_CHUNK_ELEMENTS, max(C.MIN_DEFAULT_CHUNK_ELEMENTS, 1 << (target.bit_length() - 1)))


def _validate_spec(tensor: TensorSpec, codebooks: Sequence[np.ndarray]) -> None:
    elements = 1
    for dim in tensor.dims:
        if dim < 0:
            raise ValueError(f"tensor {tensor.path!r}: negative dimension in {tensor.dims}")
        elements *= dim
    if tensor.dtype not in dtypes.STORAGE_DTYPES:
        raise ValueError(f"tensor {tensor.path!r}: unsupported element type {tensor.dtype}")
    if isinstance(tensor, HuffmanTensor):
        if tensor.dtype not in dtypes.FLOAT_DTYPES:
            raise ValueError(f"tensor {tensor.path!r}: codebook tensors must be float, not type {tensor.dtype}")
        if tensor.indices.ndim != 1 or tensor.indices.size != elements:
            raise ValueError(f"tensor {tensor.path!r}: {tensor.indices.size} indices for {elements} elements")
        if not 0 <= tensor.codebook < len(codebooks):
            raise ValueError(f"tensor {tensor.path!r}: codebook {tensor.codebook} does not exist")
        if tensor.indices.size and (tensor.indices.min() < 0 or tensor.indices.max() >= len(codebooks[tensor.codebook])):
            raise ValueError(f"tensor {tensor.path!r}: index outside codebook {tensor.codebook}")
    elif len(tensor.data) != elements * dtypes.STORAGE_DTYPES[tensor.dtype].itemsize:
        raise ValueError(f"tensor {tensor.path!r}: {len(tensor.data)} bytes do not match dims {tensor.dims}")


def build(
    graph: bytes,
    codebooks: Sequence[np.ndarray],
    tensors: Sequence[TensorSpec],
    metadata: Mapping[str, str] | None = None,
    *,
    tables: Sequence[np.ndarray] | None = None,
    chunk_elements: int | None = None,
    alignment: int = C.DEFAULT_ALIGNMENT,
    graph_codec: int = C.CODEC_ZLIB,
    producer: str = PRODUCER,
) -> bytes:
    """Assemble a complete .moub file in memory and return its bytes."""
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(sum(t.indices.size for t in tensors if isinstance(t, HuffmanTensor)))
    if not 1 <= chunk_elements <= C.DEFAULT_LIMITS.max_chunk_elements:
        raise ValueError(f"chunk_elements {chunk_elements} outside [1, {C.DEFAULT_LIMITS.max_chunk_elements}]")
    if alignment <= 0 or alignment & (alignment - 1) or alignment > C.MAX_ALIGNMENT:
        raise ValueError(f"alignment {alignment} is not a power of two <= {C.MAX_ALIGNMENT}")
    codebooks = [np.ascontiguousarray(cb, dtype="<f4") for cb in codebooks]
    for i, cb in enumerate(codebooks):
        if cb.size == 0 or not np.isfinite(cb).all():
            raise ValueError(f"codebook {i} is empty or holds non-finite values")
    tensors = sorted(tensors, key=lambda t: t.path)
    paths = [t.path for t in tensors]
    if len(set(paths)) != len(paths):
        raise ValueError("tensor paths must be unique")
    for tensor in tensors:
        _validate_spec(tensor, codebooks)
    tables = list(tables) if tables is not None else shared_tables(codebooks, tensors)
    for i, lengths in enumerate(tables):
        huffman.validate_lengths(lengths, C.MAX_CODE_LENGTH, f"Huffman table {i}")

    # Payload: graph first, then tensors in path order, each aligned.
    stored: list[_Stored] = [_pack(graph, graph_codec)]
    chunk_bits: list[list[int]] = []
    for tensor in tensors:
        if isinstance(tensor, HuffmanTensor):
            table_id = tensor.codebook if tensor.table is None else tensor.table
            lengths = tables[table_id]
            if lengths.size != codebooks[tensor.codebook].size:
                raise ValueError(f"tensor {tensor.path!r}: table {table_id} does not fit codebook {tensor.codebook}")
            data, bits = huffman.encode_chunks(tensor.indices, lengths, chunk_elements)
            stored.append(_Stored(data, C.CODEC_NONE, len(data)))
            chunk_bits.append(bits)
        else:
            stored.append(_pack(tensor.data, tensor.codec))
            chunk_bits.append([])
    offsets, position = [], 0
    for item in stored:
        position = -(-position // alignment) * alignment
        offsets.append(position)
        position += len(item.payload)
    payload = bytearray(position)
    for offset, item in zip(offsets, stored):
        payload[offset : offset + len(item.payload)] = item.payload

    def index_bytes(payload_offset: int) -> bytes:
        builder = flatbuffers.Builder(1024)

        def checksum(digest: bytes) -> int:
            vec = builder.CreateNumpyVector(np.frombuffer(digest, dtype=np.uint8))
            FbChecksum.Start(builder)
            FbChecksum.AddAlgorithm(builder, C.CHECKSUM_SHA256)
            FbChecksum.AddDigest(builder, vec)
            return FbChecksum.End(builder)

        def blob(offset: int, item: _Stored) -> int:
            digest = checksum(_sha256(item.payload))
            FbBlob.Start(builder)
            FbBlob.AddOffset(builder, offset)
            FbBlob.AddLength(builder, len(item.payload))
            FbBlob.AddCodec(builder, item.codec)
            FbBlob.AddDecodedLength(builder, item.decoded_length)
            FbBlob.AddChecksum(builder, digest)
            return FbBlob.End(builder)

        def table_vector(start_fn, offsets_: list[int]) -> int:
            start_fn(builder, len(offsets_))
            for off in reversed(offsets_):
                builder.PrependUOffsetTRelative(off)
            return builder.EndVector()

        codebook_offsets = []
        for cb in codebooks:
            values = builder.CreateNumpyVector(cb)
            FbCodebook.Start(builder)
            FbCodebook.AddValues(builder, values)
            codebook_offsets.append(FbCodebook.End(builder))
        table_offsets = []
        for lengths in tables:
            vec = builder.CreateNumpyVector(np.ascontiguousarray(lengths, dtype=np.uint8))
            FbHuffmanTable.Start(builder)
            FbHuffmanTable.AddCodeLengths(builder, vec)
            table_offsets.append(FbHuffmanTable.End(builder))
        tensor_offsets = []
        for tensor, offset, item, bits in zip(tensors, offsets[1:], stored[1:], chunk_bits):
            path = builder.CreateString(tensor.path)
            name = builder.CreateString(tensor.name)
            dims = builder.CreateNumpyVector(np.asarray(tensor.dims, dtype="<i8"))
            data = blob(offset, item)
            bits_vec = builder.CreateNumpyVector(np.asarray(bits, dtype="<u8")) if isinstance(tensor, HuffmanTensor) else None
            FbTensor.Start(builder)
            FbTensor.AddPath(builder, path)
            FbTensor.AddName(builder, name)
            FbTensor.AddDtype(builder, tensor.dtype)
            FbTensor.AddDims(builder, dims)
            FbTensor.AddData(builder, data)
            if isinstance(tensor, HuffmanTensor):
                FbTensor.AddEncoding(builder, C.ENCODING_HUFFMAN)
                FbTensor.AddCodebook(builder, tensor.codebook)
                FbTensor.AddTable(builder, tensor.codebook if tensor.table is None else tensor.table)
                FbTensor.AddChunkElements(builder, chunk_elements)
                FbTensor.AddChunkBits(builder, bits_vec)
            else:
                FbTensor.AddEncoding(builder, C.ENCODING_RAW)
            tensor_offsets.append(FbTensor.End(builder))
        entry_offsets = []
        for key in sorted(metadata or {}):
            k = builder.CreateString(key)
            v = builder.CreateString(str(metadata[key]))
            FbMetadataEntry.Start(builder)
            FbMetadataEntry.AddKey(builder, k)
            FbMetadataEntry.AddValue(builder, v)
            entry_offsets.append(FbMetadataEntry.End(builder))
        producer_str = builder.CreateString(producer)
        graph_blob = blob(offsets[0], stored[0])
        codebooks_vec = table_vector(FbModel.StartCodebooksVector, codebook_offsets)
        tables_vec = table_vector(FbModel.StartTablesVector, table_offsets)
        tensors_vec = table_vector(FbModel.StartTensorsVector, tensor_offsets)
        metadata_vec = table_vector(FbModel.StartMetadataVector, entry_offsets)
        digest = checksum(_sha256(bytes(payload)))
        index_digest = checksum(bytes(32))  # placeholder, filled in by index_digest_position
        FbModel.Start(builder)
        FbModel.AddFormatMajor(builder, C.FORMAT_MAJOR)
        FbModel.AddFormatMinor(builder, C.FORMAT_MINOR)
        FbModel.AddRequiredFeatures(builder, 0)
        FbModel.AddProducer(builder, producer_str)
        FbModel.AddAlignment(builder, alignment)
        FbModel.AddPayloadOffset(builder, payload_offset)
        FbModel.AddGraph(builder, graph_blob)
        FbModel.AddCodebooks(builder, codebooks_vec)
        FbModel.AddTables(builder, tables_vec)
        FbModel.AddTensors(builder, tensors_vec)
        FbModel.AddMetadata(builder, metadata_vec)
        FbModel.AddPayloadDigest(builder, digest)
        FbModel.AddIndexDigest(builder, index_digest)
        builder.Finish(FbModel.End(builder), file_identifier=C.FILE_IDENTIFIER)
        return bytes(builder.Output())

    # payload_offset is a fixed-width field: a non-default placeholder gives the final size.
    draft = index_bytes((1 << 64) - 1)
    payload_offset = -(-len(draft) // alignment) * alignment
    index = index_bytes(payload_offset)
    if len(index) != len(draft):
        raise AssertionError("index size changed between passes")
    head = bytearray(index + bytes(payload_offset - len(index)))
    position = index_digest_position(head)
    head[position : position + 32] = _sha256(bytes(head))
    return bytes(head) + bytes(payload)


def index_digest_position(index: bytes | bytearray | memoryview) -> int:
    """Offset of the 32 bytes of Model.index_digest in a (verified) index."""
    root = FbModel.Model.GetRootAs(index, 0)
    table = root.IndexDigest()
    return table._tab.Vector(table._tab.Offset(6))  # slot 1 of Checksum: digest


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, rename."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def write(path: str | os.PathLike, *args, **kwargs) -> int:
    """Build a .moub (same arguments as :func:`build`) and write it atomically; return its size."""
    data = build(*args, **kwargs)
    write_atomic(path, data)
    return len(data)
