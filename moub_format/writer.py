"""Write .moub files: canonical (same input, same bytes) and atomic.

Canonical: tensors sorted by path, packs by first site, metadata by key, only
the codebooks and tables some stream uses, fixed alignment and zero padding,
zlib, xz and packed code-length tables at fixed settings, no timestamps.
Atomic: the bytes go to a temporary file in the target folder, are fsynced,
then renamed over the target, so a reader that has the old file mapped never
sees it truncated.
Streamed: :func:`write` never assembles the file in memory; it writes the index,
then each encoded stream, so its peak memory is the encoded streams once (about
the file's size), not the three or four copies an in-memory assembly makes.
"""

from __future__ import annotations

import hashlib
import lzma
import operator
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import flatbuffers
import numpy as np

from . import constants as C
from . import dtypes, huffman
from .atomic import write_atomic
from .fb import Blob as FbBlob
from .fb import Checksum as FbChecksum
from .fb import Codebook as FbCodebook
from .fb import HuffmanTable as FbHuffmanTable
from .fb import MetadataEntry as FbMetadataEntry
from .fb import Model as FbModel
from .fb import Pack as FbPack
from .fb import Tensor as FbTensor
from .version import DISTRIBUTION, distribution_version

ZLIB_LEVEL = 9
PRODUCER = f"{DISTRIBUTION} {distribution_version()}"  # written into every file's index


OWN = "own"            # a stream's ``table``: a Huffman table built from its own indices alone
SMALLEST = "smallest"  # a codec argument: the smallest of NONE, ZLIB and LZMA (ties: the lower codec)


@dataclass(frozen=True)
class GridCodebook:
    """A codebook of the integers ``first .. first + count - 1`` as float32 (format 1.2):
    12 bytes in the index whatever its size. Pair it with per-member scales (and offsets)
    in a pack (value = (integer + offset) x scale: a uniform quantizer of step ``scale``)."""

    first: int
    count: int

    def values(self) -> np.ndarray:
        """The float32 values a reader decodes symbol ``i`` to."""
        return np.arange(self.first, self.first + self.count, dtype=np.int64).astype(np.float32)

    @property
    def size(self) -> int:
        return self.count


CodebookSpec = np.ndarray | GridCodebook


@dataclass(frozen=True)
class HuffmanTensor:
    """A tensor stored as codebook indices (one per element, C order)."""

    path: str
    name: str
    dtype: int
    dims: tuple[int, ...]
    indices: np.ndarray
    codebook: int
    table: int | str | None = None  # None: the shared table of its codebook; OWN: its own table


@dataclass(frozen=True)
class RawTensor:
    """A pass-through tensor: its raw little-endian bytes, optionally compressed.
    ``data``: bytes or any C-contiguous buffer (a NumPy array, a memoryview), used
    without a copy when stored uncompressed."""

    path: str
    name: str
    dtype: int
    dims: tuple[int, ...]
    data: bytes | memoryview
    codec: int | str = C.CODEC_NONE   # CODEC_NONE, CODEC_ZLIB, CODEC_LZMA or SMALLEST


@dataclass(frozen=True)
class PackSpec:
    """Several float tensors coded as one stream with one codebook and table (format 1.2).

    ``sites``: the members' site ordinals (``moub_runtime.sites.iter_tensor_sites``
    order), strictly increasing; ``counts``: their element counts; ``scales``: one
    per member, rounded to float32; ``offsets``: one integer per member, added to the
    grid value (None or all zero: none, and the file stores no offsets vector; non-zero
    offsets need a grid codebook); member value = float32(codebook value + offset) x
    float32(scale), cast to the site's dtype; ``indices``: the members' codebook
    indices concatenated in ``sites`` order (1-D); ``table``: None for the shared
    table of ``codebook``, OWN for a table of this pack's own indices, or an index
    into ``tables``.
    """

    sites: tuple[int, ...]
    counts: tuple[int, ...]
    scales: Sequence[float] | np.ndarray
    indices: np.ndarray
    codebook: int
    table: int | str | None = None
    offsets: Sequence[int] | np.ndarray | None = None


TensorSpec = HuffmanTensor | RawTensor


@dataclass(frozen=True)
class _Stored:
    """One payload blob as written, with its SHA-256 (hashed once: the index is built twice)."""

    payload: bytes | memoryview
    codec: int
    decoded_length: int
    digest: bytes


def _stored(payload: bytes | memoryview, codec: int, decoded_length: int) -> _Stored:
    return _Stored(payload, codec, decoded_length, _sha256(payload))


def _byte_view(data) -> bytes | memoryview:
    """``data`` as a flat byte buffer, without a copy (len() is then its size in bytes)."""
    return data if isinstance(data, bytes) else memoryview(data).cast("B")


def _sha256(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def lzma_dict_size(n_bytes: int) -> int:
    """The LZMA2 dictionary writers use: the next power of two >= the input, in [4 KiB, 8 MiB]
    (a bigger one gains nothing and costs a device that much memory to decode)."""
    return min(C.LZMA_MAX_DICT, max(C.LZMA_MIN_DICT, 1 << max(0, n_bytes - 1).bit_length()))


# LZMA2 literal-context and position bits tried for blobs up to XZ_TUNE_MAX_BYTES, after
# the preset's own (lc=3, pb=2): a serialized ONNX graph has no 4-byte structure, so
# pb=0 takes 1-2% off a typical graph.
XZ_TUNINGS = ({}, {"lc": 0, "pb": 0}, {"lc": 1, "pb": 0}, {"lc": 2, "pb": 0}, {"lc": 3, "pb": 0})
XZ_TUNE_MAX_BYTES = 1 << 22


def xz_compress(data: bytes) -> bytes:
    """The canonical LZMA blob: one .xz stream, preset 9e, no integrity check, a small
    dictionary; the smallest over XZ_TUNINGS (ties: the earlier), any of which every
    .xz decoder reads."""
    tunings = XZ_TUNINGS if len(data) <= XZ_TUNE_MAX_BYTES else XZ_TUNINGS[:1]
    best = b""
    for tuning in tunings:
        filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": lzma_dict_size(len(data)), **tuning}]
        packed = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, filters=filters)
        if not best or len(packed) < len(best):
            best = packed
    return best


def _pack(data: bytes | memoryview, codec: int | str) -> _Stored:
    data = _byte_view(data)
    if codec == SMALLEST:
        candidates = [_pack(data, c) for c in (C.CODEC_NONE, C.CODEC_ZLIB, C.CODEC_LZMA)]
        return min(candidates, key=lambda s: (len(s.payload), s.codec))
    if codec == C.CODEC_NONE:
        return _stored(data, codec, len(data))
    if codec == C.CODEC_ZLIB:
        return _stored(zlib.compress(data, ZLIB_LEVEL), codec, len(data))
    if codec == C.CODEC_LZMA:
        packed = xz_compress(data)
        if len(data) > max(len(packed), 1) * C.DEFAULT_LIMITS.max_expansion_ratio:
            return _pack(data, C.CODEC_ZLIB)  # readers refuse ratios beyond 4096 (bombs); zlib stays below 1032
        return _stored(packed, codec, len(data))
    raise ValueError(f"unknown codec {codec!r}")


def compact_pack_fits(counts: Sequence[int], chunk_bits: Sequence[int]) -> bool:
    """Whether a pack can use the 32-bit vectors of format 1.3: every member count and
    chunk bit length below 2^32 (offsets always fit: the levels they shift stay within 2^24)."""
    return max(counts, default=0) < 1 << 32 and max(chunk_bits, default=0) < 1 << 32


def shared_tables(codebooks: Sequence[CodebookSpec], tensors: Sequence[TensorSpec | PackSpec]) -> list[np.ndarray]:
    """One length-limited Huffman table per codebook, from all indices that use it."""
    frequencies = [np.zeros(_codebook_size(cb), dtype=np.int64) for cb in codebooks]
    for tensor in tensors:
        if isinstance(tensor, (HuffmanTensor, PackSpec)):
            frequencies[tensor.codebook] += symbol_counts(tensor.indices, frequencies[tensor.codebook].size)
    return [own_table(freq) for freq in frequencies]


def symbol_counts(indices: np.ndarray, minlength: int) -> np.ndarray:
    """``np.bincount(indices, minlength)``, a slice at a time: bincount converts its whole
    input to intp first, 8 bytes per index, where the indices may be 2."""
    indices = np.asarray(indices).reshape(-1)
    step = huffman.ENCODE_SLICE_ELEMENTS
    counts = np.bincount(indices[:step], minlength=minlength)
    for start in range(step, indices.size, step):
        part = np.bincount(indices[start : start + step], minlength=counts.size)
        if part.size > counts.size:
            part[: counts.size] += counts
            counts = part
        else:
            counts += part
    return counts


def own_table(frequencies: np.ndarray) -> np.ndarray:
    """The writer's length-limited table for these symbol frequencies (a one-symbol
    table if none is used)."""
    freq = np.asarray(frequencies, dtype=np.int64)
    if not freq.any():
        freq = freq.copy()
        freq[0] = 1
    return huffman.code_lengths(freq, huffman.writer_max_length(int(np.count_nonzero(freq))))


def default_chunk_elements(total_elements: int) -> int:
    """Elements per chunk when :func:`build` is not told: a power of two in
    [MIN_DEFAULT_CHUNK_ELEMENTS, DEFAULT_CHUNK_ELEMENTS] = [512, 4096], the
    largest that still gives the lane decoder about DECODER_LANES chunks.
    Each chunk costs 64 bits (its chunk_bits entry; 32 in a 1.3 pack) plus ~4
    bits of padding: 0.017 bits/weight at 4096, 0.066 at 1024, 0.13 at 512
    (models under 1 M weights, where decode time is mostly per-step overhead)."""
    target = max(1, total_elements // C.DECODER_LANES)
    return min(C.DEFAULT_CHUNK_ELEMENTS, max(C.MIN_DEFAULT_CHUNK_ELEMENTS, 1 << (target.bit_length() - 1)))


def _codebook_size(codebook: CodebookSpec) -> int:
    return codebook.count if isinstance(codebook, GridCodebook) else len(codebook)


def codebook_values(codebook: CodebookSpec) -> np.ndarray:
    """The float32 values a codebook decodes to (a grid's integers, or the array itself)."""
    return codebook.values() if isinstance(codebook, GridCodebook) else np.asarray(codebook, dtype=np.float32)


def _check_codebook(i: int, codebook: CodebookSpec) -> CodebookSpec:
    if isinstance(codebook, GridCodebook):
        first, count = int(codebook.first), int(codebook.count)
        if count < 1 or abs(first) >= C.GRID_LIMIT or abs(first + count - 1) >= C.GRID_LIMIT:
            raise ValueError(f"grid codebook {i}: first {first}, count {count}: needs count >= 1 and values within (-2^24, 2^24)")
        return GridCodebook(first, count)
    values = np.ascontiguousarray(codebook, dtype="<f4")
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"codebook {i} is empty, not 1-D or holds non-finite values")
    return values


def _check_indices(subject: str, indices: np.ndarray, elements: int, codebook: int, codebooks: Sequence[CodebookSpec]) -> None:
    if indices.ndim != 1 or indices.size != elements:
        raise ValueError(f"{subject}: {indices.size} indices for {elements} elements")
    if not 0 <= codebook < len(codebooks):
        raise ValueError(f"{subject}: codebook {codebook} does not exist")
    if indices.size and (indices.min() < 0 or indices.max() >= _codebook_size(codebooks[codebook])):
        raise ValueError(f"{subject}: index outside codebook {codebook}")


def _validate_spec(tensor: TensorSpec, codebooks: Sequence[CodebookSpec]) -> None:
    elements = 1
    for dim in tensor.dims:
        if dim < 0:
            raise ValueError(f"tensor {tensor.path!r}: negative dimension in {tensor.dims}")
        elements *= dim
    if tensor.dtype not in dtypes.STORAGE_DTYPES:
        raise ValueError(f"tensor {tensor.path!r}: unsupported element type {tensor.dtype}")
    if isinstance(tensor, HuffmanTensor):
        if tensor.dtype not in dtypes.CODEBOOK_DTYPES:
            raise ValueError(f"tensor {tensor.path!r}: codebook tensors must be float or 8/16-bit integer, not type {tensor.dtype}")
        _check_indices(f"tensor {tensor.path!r}", tensor.indices, elements, tensor.codebook, codebooks)
        if tensor.dtype in dtypes.INTEGER_RANGES:
            values = codebook_values(codebooks[tensor.codebook])
            low, high = dtypes.INTEGER_RANGES[tensor.dtype]
            if (values != np.floor(values)).any() or values.min() < low or values.max() > high:
                raise ValueError(f"tensor {tensor.path!r}: codebook {tensor.codebook} holds values that are not "
                                 f"{dtypes.NAMES[tensor.dtype]} integers")
    elif (size := len(_byte_view(tensor.data))) != elements * dtypes.STORAGE_DTYPES[tensor.dtype].itemsize:
        raise ValueError(f"tensor {tensor.path!r}: {size} bytes do not match dims {tensor.dims}")


def _normalize_pack(pack: PackSpec, codebooks: Sequence[CodebookSpec]) -> PackSpec:
    sites = tuple(int(s) for s in pack.sites)
    counts = tuple(int(n) for n in pack.counts)
    scales = np.asarray(pack.scales, dtype=np.float64).astype(np.float32)
    subject = f"pack at sites {list(sites[:4])}{'...' if len(sites) > 4 else ''}"
    if not sites or not len(sites) == len(counts) == scales.size:
        raise ValueError(f"{subject}: needs one site, count and scale per member, at least one member "
                         f"(got {len(sites)}, {len(counts)}, {scales.size})")
    if any(b <= a for a, b in zip(sites, sites[1:])) or sites[0] < 0 or sites[-1] >= 1 << 32:
        raise ValueError(f"{subject}: site ordinals must be strictly increasing in [0, 2^32)")
    if any(n < 0 for n in counts):
        raise ValueError(f"{subject}: negative member count")
    if not np.isfinite(scales).all():
        raise ValueError(f"{subject}: scales must be finite float32 values")
    indices = np.asarray(pack.indices)
    _check_indices(subject, indices, sum(counts), pack.codebook, codebooks)
    offsets = _normalize_offsets(subject, pack.offsets, len(sites))
    codebook = codebooks[pack.codebook]
    if isinstance(codebook, GridCodebook):
        first, last = codebook.first, codebook.first + codebook.count - 1
        for j, offset in enumerate(offsets):
            if abs(first + offset) >= C.GRID_LIMIT or abs(last + offset) >= C.GRID_LIMIT:
                raise ValueError(f"{subject}: member {j} offset {offset} puts grid codebook {pack.codebook}'s values at levels "
                                 f"{first + offset}..{last + offset}, outside (-2^24, 2^24)")
        magnitudes = np.array([max(abs(first + o), abs(last + o)) for o in offsets or (0,) * len(sites)], dtype=np.float32)
    else:
        if offsets:
            raise ValueError(f"{subject}: offsets need a grid codebook; codebook {pack.codebook} holds explicit values")
        magnitudes = np.full(len(sites), np.abs(codebook).max(), dtype=np.float32)
    with np.errstate(over="ignore"):
        if not np.isfinite(magnitudes * np.abs(scales)).all():
            raise ValueError(f"{subject}: a scale times codebook {pack.codebook}'s largest value overflows float32")
    return PackSpec(sites, counts, tuple(float(x) for x in scales), indices, pack.codebook, pack.table, offsets)


def _normalize_offsets(subject: str, offsets, members: int) -> tuple[int, ...]:
    """Python ints, one per member; () when there are none or all are zero (canonical:
    the file then stores no offsets vector)."""
    if offsets is None:
        return ()
    try:
        values = tuple(operator.index(o) for o in (offsets.tolist() if isinstance(offsets, np.ndarray) else offsets))
    except TypeError:
        raise ValueError(f"{subject}: offsets must be integers") from None
    if len(values) != members:
        raise ValueError(f"{subject}: {len(values)} offsets for {members} members")
    return values if any(values) else ()


def _resolve_tables(
    codebooks: list[CodebookSpec], streams: list[HuffmanTensor | PackSpec], tables: Sequence[np.ndarray] | None
) -> tuple[list[np.ndarray], list[int]]:
    """The tables to write and each stream's table id.

    ``table=None`` is the shared table of the stream's codebook: with ``tables``
    given, ``tables[codebook]``; without, one built from the indices of every
    stream sharing it. An int is an index into ``tables`` (without ``tables``: the
    shared table of that codebook). OWN appends a table of the stream's own indices.
    """
    n_codebooks = len(codebooks)
    if tables is not None:
        base = [np.asarray(lengths, dtype=np.uint8) for lengths in tables]
        for i, lengths in enumerate(base):
            huffman.validate_lengths(lengths, C.MAX_CODE_LENGTH, f"Huffman table {i}")
    refs: list[int | None] = []
    for s in streams:
        if isinstance(s.table, str):
            if s.table != OWN:
                raise ValueError(f"table {s.table!r} is not an index, None or {OWN!r}")
            refs.append(None)
        else:
            refs.append(s.codebook if s.table is None else int(s.table))
    if tables is None:
        frequencies: dict[int, np.ndarray] = {}
        for s, ref in zip(streams, refs):
            if ref is None:
                continue
            if not 0 <= ref < n_codebooks:
                raise ValueError(f"table {ref} does not exist ({n_codebooks} shared tables, one per codebook)")
            freq = frequencies.setdefault(ref, np.zeros(_codebook_size(codebooks[ref]), dtype=np.int64))
            freq += symbol_counts(s.indices, freq.size)[: freq.size]
        base = [own_table(frequencies[c]) if c in frequencies else np.zeros(0, np.uint8) for c in range(n_codebooks)]
    ids, out = [], list(base)
    for s, ref in zip(streams, refs):
        if ref is None:
            out.append(own_table(symbol_counts(s.indices, _codebook_size(codebooks[s.codebook]))))
            ref = len(out) - 1
        if not 0 <= ref < len(out):
            raise ValueError(f"table {ref} does not exist ({len(out)} tables)")
        if out[ref].size != _codebook_size(codebooks[s.codebook]):
            raise ValueError(f"table {ref} does not fit codebook {s.codebook}")
        ids.append(ref)
    return out, ids


def _compact(items: list, ids: list[int]) -> tuple[list, list[int]]:
    """Keep only the items some stream refers to, in their order; renumber the references."""
    used = sorted(set(ids))
    renumber = {old: new for new, old in enumerate(used)}
    return [items[i] for i in used], [renumber[i] for i in ids]


def build(*args, **kwargs) -> bytes:
    """Assemble a complete .moub file in memory and return its bytes (arguments: :func:`assemble`)."""
    return b"".join(assemble(*args, **kwargs))


def assemble(
    graph: bytes,
    codebooks: Sequence[CodebookSpec],
    tensors: Sequence[TensorSpec],
    metadata: Mapping[str, str] | None = None,
    *,
    packs: Sequence[PackSpec] = (),
    tables: Sequence[np.ndarray] | None = None,
    chunk_elements: int | None = None,
    alignment: int = C.DEFAULT_ALIGNMENT,
    graph_codec: int | str = C.CODEC_ZLIB,
    raw_codec: int | str | None = None,
    producer: str = PRODUCER,
    graph_features: int = 0,
) -> list[bytes | memoryview]:
    """The pieces of a complete .moub file, in order: the index (padded to the
    payload), then each payload blob and the zero padding between blobs. Joined,
    they are the file; nothing is copied into one buffer here.

    ``codebooks``: float32 arrays or :class:`GridCodebook`; ``packs``: streams of
    several tensors (format 1.2); ``graph_codec``: CODEC_NONE, CODEC_ZLIB,
    CODEC_LZMA or SMALLEST; ``raw_codec``: when set, the codec of every raw
    tensor (else each RawTensor's own). Codebooks and tables no stream uses are
    not written (indices are renumbered); the required-feature bits follow from
    what the file uses. In a file that needs a 1.2 feature anyway, a code-length
    table is stored packed when that is smaller (:func:`huffman.packed_table`).
    ``graph_features``: required-feature bits of what was done to ``graph`` (which
    this module does not parse), so far only FEATURE_CONSTANT_NAMES.
    """
    if graph_features & ~C.FEATURE_CONSTANT_NAMES:
        raise ValueError(f"graph_features 0x{graph_features:x}: only FEATURE_CONSTANT_NAMES describes a graph")
    codebooks = [_check_codebook(i, cb) for i, cb in enumerate(codebooks)]
    packs = sorted((_normalize_pack(p, codebooks) for p in packs), key=lambda p: p.sites[0])
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(
            sum(t.indices.size for t in tensors if isinstance(t, HuffmanTensor)) + sum(p.indices.size for p in packs)
        )
    if not 1 <= chunk_elements <= C.DEFAULT_LIMITS.max_chunk_elements:
        raise ValueError(f"chunk_elements {chunk_elements} outside [1, {C.DEFAULT_LIMITS.max_chunk_elements}]")
    if alignment <= 0 or alignment & (alignment - 1) or alignment > C.MAX_ALIGNMENT:
        raise ValueError(f"alignment {alignment} is not a power of two <= {C.MAX_ALIGNMENT}")
    tensors = sorted(tensors, key=lambda t: t.path)
    paths = [t.path for t in tensors]
    if len(set(paths)) != len(paths):
        raise ValueError("tensor paths must be unique")
    for tensor in tensors:
        _validate_spec(tensor, codebooks)
    all_sites = [site for p in packs for site in p.sites]
    if len(set(all_sites)) != len(all_sites):
        raise ValueError("a site is a member of more than one pack")
    streams: list[HuffmanTensor | PackSpec] = [t for t in tensors if isinstance(t, HuffmanTensor)] + list(packs)
    table_list, table_ids = _resolve_tables(codebooks, streams, tables)
    table_list, table_ids = _compact(table_list, table_ids)
    codebooks, codebook_ids = _compact(codebooks, [s.codebook for s in streams])
    stream_refs = {id(s): (c, t) for s, c, t in zip(streams, codebook_ids, table_ids)}

    # Payload: graph first, then tensors in path order, then packs, each aligned.
    stored: list[_Stored] = [_pack(graph, graph_codec)]
    chunk_bits: list[list[int]] = []
    for stream in tensors + packs:
        if isinstance(stream, RawTensor):
            stored.append(_pack(stream.data, stream.codec if raw_codec is None else raw_codec))
            chunk_bits.append([])
            continue
        data, bits = huffman.encode_chunks(stream.indices, table_list[stream_refs[id(stream)][1]], chunk_elements)
        stored.append(_stored(data, C.CODEC_NONE, len(data)))
        chunk_bits.append(bits)
    # The payload section: each blob at an aligned offset, zero bytes between them.
    payload: list[bytes | memoryview] = []
    offsets, position = [], 0
    for item in stored:
        start = -(-position // alignment) * alignment
        if start > position:
            payload.append(bytes(start - position))
        offsets.append(start)
        payload.append(item.payload)
        position = start + len(item.payload)
    payload_hash = hashlib.sha256()
    for piece in payload:
        payload_hash.update(piece)
    payload_digest = payload_hash.digest()
    features = graph_features
    if packs or any(isinstance(cb, GridCodebook) for cb in codebooks):
        features |= C.FEATURE_PACKS
    if any(item.codec == C.CODEC_LZMA for item in stored):
        features |= C.FEATURE_LZMA
    compact = [compact_pack_fits(pack.counts, bits) for pack, bits in zip(packs, chunk_bits[len(tensors):])]
    if any(compact):
        features |= C.FEATURE_COMPACT_PACKS
    if any(isinstance(t, HuffmanTensor) and t.dtype in dtypes.INTEGER_RANGES for t in tensors):
        features |= C.FEATURE_INTEGER_TENSORS
    # Packed tables (1.2) only in a file that needs a 1.2 feature anyway: a 1.1-style file
    # (explicit codebooks, no packs, no LZMA) stays readable by 1.1 readers.
    packed_tables = [huffman.packed_table(lengths) if features else None for lengths in table_list]
    if any(packed is not None for packed in packed_tables):
        features |= C.FEATURE_PACKED_TABLES

    def index_bytes(payload_offset: int) -> bytes:
        builder = flatbuffers.Builder(1024)

        def checksum(digest: bytes) -> int:
            vec = builder.CreateNumpyVector(np.frombuffer(digest, dtype=np.uint8))
            FbChecksum.Start(builder)
            FbChecksum.AddAlgorithm(builder, C.CHECKSUM_SHA256)
            FbChecksum.AddDigest(builder, vec)
            return FbChecksum.End(builder)

        def blob(offset: int, item: _Stored) -> int:
            digest = checksum(item.digest)
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
            if isinstance(cb, GridCodebook):
                FbCodebook.Start(builder)
                FbCodebook.AddFirst(builder, cb.first)
                FbCodebook.AddCount(builder, cb.count)
            else:
                values = builder.CreateNumpyVector(cb)
                FbCodebook.Start(builder)
                FbCodebook.AddValues(builder, values)
            codebook_offsets.append(FbCodebook.End(builder))
        table_offsets = []
        for lengths, packed in zip(table_list, packed_tables):
            if packed is None:
                vec = builder.CreateNumpyVector(np.ascontiguousarray(lengths, dtype=np.uint8))
                FbHuffmanTable.Start(builder)
                FbHuffmanTable.AddCodeLengths(builder, vec)
            else:
                vec = builder.CreateNumpyVector(np.frombuffer(packed, dtype=np.uint8))
                FbHuffmanTable.Start(builder)
                FbHuffmanTable.AddPackedLengths(builder, vec)
                FbHuffmanTable.AddCount(builder, len(lengths))
            table_offsets.append(FbHuffmanTable.End(builder))
        n_tensors = len(tensors)
        tensor_offsets = []
        for tensor, offset, item, bits in zip(tensors, offsets[1:], stored[1:], chunk_bits):
            path = builder.CreateString(tensor.path)
            name = builder.CreateString(tensor.name)
            dims = builder.CreateNumpyVector(np.asarray(tensor.dims, dtype="<i8"))
            data = blob(offset, item)
            huff = isinstance(tensor, HuffmanTensor)
            bits_vec = builder.CreateNumpyVector(np.asarray(bits, dtype="<u8")) if huff else None
            FbTensor.Start(builder)
            FbTensor.AddPath(builder, path)
            FbTensor.AddName(builder, name)
            FbTensor.AddDtype(builder, tensor.dtype)
            FbTensor.AddDims(builder, dims)
            FbTensor.AddData(builder, data)
            if huff:
                codebook_id, table_id = stream_refs[id(tensor)]
                FbTensor.AddEncoding(builder, C.ENCODING_HUFFMAN)
                FbTensor.AddCodebook(builder, codebook_id)
                FbTensor.AddTable(builder, table_id)
                FbTensor.AddChunkElements(builder, chunk_elements)
                FbTensor.AddChunkBits(builder, bits_vec)
            else:
                FbTensor.AddEncoding(builder, C.ENCODING_RAW)
            tensor_offsets.append(FbTensor.End(builder))
        pack_offsets = []
        packs_out = zip(packs, offsets[1 + n_tensors :], stored[1 + n_tensors :], chunk_bits[n_tensors:], compact)
        for pack, offset, item, bits, small in packs_out:
            sites = builder.CreateNumpyVector(np.asarray(pack.sites, dtype="<u4"))
            counts = builder.CreateNumpyVector(np.asarray(pack.counts, dtype="<u4" if small else "<u8"))
            scales = builder.CreateNumpyVector(np.asarray(pack.scales, dtype="<f4"))
            bits_vec = builder.CreateNumpyVector(np.asarray(bits, dtype="<u4" if small else "<u8"))
            offsets_vec = (builder.CreateNumpyVector(np.asarray(pack.offsets, dtype="<i4" if small else "<i8"))
                           if pack.offsets else None)
            data = blob(offset, item)
            codebook_id, table_id = stream_refs[id(pack)]
            FbPack.Start(builder)
            FbPack.AddSites(builder, sites)
            FbPack.AddScales(builder, scales)
            FbPack.AddCodebook(builder, codebook_id)
            FbPack.AddTable(builder, table_id)
            FbPack.AddChunkElements(builder, chunk_elements)
            FbPack.AddData(builder, data)
            if small:
                FbPack.AddCounts32(builder, counts)
                FbPack.AddChunkBits32(builder, bits_vec)
                if offsets_vec is not None:
                    FbPack.AddOffsets32(builder, offsets_vec)
            else:
                FbPack.AddCounts(builder, counts)
                FbPack.AddChunkBits(builder, bits_vec)
                if offsets_vec is not None:
                    FbPack.AddOffsets(builder, offsets_vec)
            pack_offsets.append(FbPack.End(builder))
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
        packs_vec = table_vector(FbModel.StartPacksVector, pack_offsets) if pack_offsets else None
        digest = checksum(payload_digest)
        index_digest = checksum(bytes(32))  # placeholder, filled in by index_digest_position
        FbModel.Start(builder)
        FbModel.AddFormatMajor(builder, C.FORMAT_MAJOR)
        FbModel.AddFormatMinor(builder, C.FORMAT_MINOR)
        FbModel.AddRequiredFeatures(builder, features)
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
        if packs_vec is not None:
            FbModel.AddPacks(builder, packs_vec)
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
    head[position : position + 32] = _sha256(head)
    return [bytes(head), *payload]


def index_digest_position(index: bytes | bytearray | memoryview) -> int:
    """Offset of the 32 bytes of Model.index_digest in a (verified) index."""
    root = FbModel.Model.GetRootAs(index, 0)
    table = root.IndexDigest()
    return table._tab.Vector(table._tab.Offset(6))  # slot 1 of Checksum: digest


def write(path: str | os.PathLike, *args, **kwargs) -> int:
    """Write a .moub (arguments: :func:`assemble`) atomically, piece by piece (the same
    bytes as :func:`build`, never joined in memory); return its size."""
    pieces = assemble(*args, **kwargs)
    write_atomic(path, pieces)
    return sum(len(piece) for piece in pieces)
