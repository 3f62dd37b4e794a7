"""The validated, plain-Python view of a .moub index.

:func:`parse_index` runs the structural verifier, which reads every field once
(in range), then builds frozen dataclasses and checks the semantics: versions,
required features, enums, caps, dims, counts, codebooks (explicit and grid),
code-length tables (plain, or packed and inflated with a hard output limit), packs
(member vectors, site order, disjoint sites, scales, offsets), cross-references
and the exact tiling of the payload section. Nothing is decoded or allocated
per tensor before the whole index has passed. What needs the graph (pack
members' dtypes and dims) is checked by the runtime before decoding.

What parsing materialises beyond views of the file -- codebook values, code
lengths (packed ones inflated), grid codebooks, chunk tables, pack member
records -- is charged to the file's memory budget from the verified vector
sizes before any of it is created (:func:`_charge_parsing`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from . import constants as C
from . import dtypes, fbverify
from .budget import MemoryBudget
from .errors import (
    ChecksumError,
    CodebookError,
    EnumError,
    HuffmanError,
    LayoutError,
    LimitError,
    MetadataError,
    StructureError,
    VersionError,
)


NO_CHUNKS = np.zeros(0, dtype=np.int64)
NO_CHUNKS.flags.writeable = False
PACK_MEMBER_BYTES = 512   # Python objects of one pack member once parsed (site, count, scale, offset, PackMember)


@dataclass(frozen=True)
class BlobInfo:
    offset: int              # relative to the payload section
    length: int
    codec: int
    decoded_length: int
    checksum_algorithm: int
    checksum: bytes


@dataclass(frozen=True)
class TensorInfo:
    path: str
    name: str
    dtype: int
    dims: tuple[int, ...]
    encoding: int
    data: BlobInfo
    codebook: int = 0
    table: int = 0
    chunk_elements: int = 0
    chunk_bits: np.ndarray = field(default_factory=lambda: NO_CHUNKS, compare=False)   # int64, read-only: exact bits per chunk

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.dims:
            count *= dim
        return count

    @property
    def decoded_bytes(self) -> int:
        return self.n_elements * dtypes.STORAGE_DTYPES[self.dtype].itemsize

    @property
    def subject(self) -> str:
        """How messages name it: ``tensor 'init:W'``."""
        return f"tensor {self.path!r}"


@dataclass(frozen=True)
class PackMember:
    """One member of a pack: a site of the graph and its slice of the pack's stream."""

    pack: int                # position of the pack in Index.packs
    member: int              # position of the member in the pack
    site: int                # site ordinal (FORMAT.md §5 order)
    count: int               # elements
    scale: float             # a float32 value (exact as a Python float)
    start: int               # first element of the member in the pack's stream
    offset: int = 0          # added to the grid value: level = first + symbol + offset (grid codebooks only)

    @property
    def subject(self) -> str:
        return f"pack {self.pack} member {self.member} (site {self.site})"


@dataclass(frozen=True)
class PackInfo:
    """Several tensors coded as one stream (format 1.2). Element types and shapes come
    from the graph's sites; the index knows the element counts only."""

    number: int              # position in Index.packs
    sites: tuple[int, ...]
    counts: tuple[int, ...]
    scales: tuple[float, ...]
    codebook: int
    table: int
    chunk_elements: int
    chunk_bits: np.ndarray = field(compare=False)   # int64, read-only
    data: BlobInfo
    n_elements: int
    offsets: tuple[int, ...] = ()   # one per member as the file stores them; () when the file has none (all zero)
    compact: bool = False           # stored with the 32-bit vectors (format 1.3)

    @property
    def subject(self) -> str:
        return f"pack {self.number}"

    @property
    def member_offsets(self) -> tuple[int, ...]:
        """Each member's offset (zeros when the file stores none)."""
        return self.offsets or (0,) * len(self.sites)

    @property
    def members(self) -> tuple[PackMember, ...]:
        out, start = [], 0
        for i, (site, count, scale, offset) in enumerate(zip(self.sites, self.counts, self.scales, self.member_offsets)):
            out.append(PackMember(self.number, i, site, count, scale, start, offset))
            start += count
        return tuple(out)

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the pack's decoded float32 values (what the reader holds while splitting it)."""
        return 4 * self.n_elements


@dataclass(frozen=True)
class Index:
    filename: str
    format_major: int
    format_minor: int
    required_features: int
    producer: str
    alignment: int
    payload_offset: int
    file_size: int
    graph: BlobInfo
    codebooks: tuple[np.ndarray | None, ...]   # explicit values; None for a grid codebook (:meth:`codebook_values`)
    tables: tuple[np.ndarray, ...]
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    payload_digest_algorithm: int = 0
    payload_digest: bytes = b""
    packs: tuple[PackInfo, ...] = ()
    grids: tuple[tuple[int, int] | None, ...] = ()   # per codebook: (first, count) of a grid codebook, else None
    table_bytes: tuple[int, ...] = ()   # per table: bytes it stores in the index (code_lengths entries, or packed_lengths bytes)

    def codebook_size(self, codebook: int) -> int:
        grid = self.grids[codebook] if self.grids else None
        return grid[1] if grid else int(self.codebooks[codebook].size)

    def codebook_values(self, codebook: int) -> np.ndarray:
        """A codebook's float32 values: the explicit ones, or a grid's integers made now (a grid
        of 2^24 values costs 64 MiB and 12 index bytes, so it is made only when decoding needs
        it, which the file's memory plan has charged)."""
        grid = self.grids[codebook] if self.grids else None
        if grid is None:
            return self.codebooks[codebook]
        first, count = grid
        return np.arange(first, first + count, dtype=np.int32).astype(np.float32)  # |values| < 2^24: exact

    def table_is_packed(self, table: int) -> bool:
        """Whether table ``table`` is stored packed (format 1.2): a packed table is always shorter than its lengths."""
        return bool(self.table_bytes) and self.table_bytes[table] < self.tables[table].size

    @property
    def decoded_bytes(self) -> int:
        """Decoded tensors, plus 4 bytes per pack element (packs' element types are in the graph;
        the runtime checks the exact size with them)."""
        return sum(t.decoded_bytes for t in self.tensors) + sum(p.decoded_bytes for p in self.packs)

    def blobs(self) -> list[tuple[str, BlobInfo]]:
        """Every payload range the index declares, with how messages name it."""
        return (
            [("graph", self.graph)]
            + [(t.subject, t.data) for t in self.tensors]
            + [(p.subject, p.data) for p in self.packs]
        )


def _text(value: str | None) -> str:
    return value if value is not None else ""


def _checksum(table, where: str, filename: str) -> tuple[int, bytes]:
    if table is None:
        raise StructureError(f"{filename}: {where}: checksum is missing")
    algorithm = table["algorithm"]
    if algorithm not in C.CHECKSUMS:
        raise EnumError(f"{filename}: {where}: unknown checksum algorithm {algorithm}")
    digest = table["digest"].tobytes() if table["digest"] is not None else b""
    expected = C.CHECKSUMS[algorithm][1]
    if len(digest) != expected:
        raise StructureError(f"{filename}: {where}: checksum of {len(digest)} bytes, {C.CHECKSUMS[algorithm][0]} needs {expected}")
    return algorithm, digest


def _blob(table, where: str, filename: str, limits: C.ReaderLimits) -> BlobInfo:
    if table is None:
        raise StructureError(f"{filename}: {where}: data blob is missing")
    codec = table["codec"]
    if codec not in C.CODECS:
        raise EnumError(f"{filename}: {where}: unknown codec {codec}")
    length, decoded = table["length"], table["decoded_length"]
    if codec == C.CODEC_NONE and decoded != length:
        raise StructureError(f"{filename}: {where}: decoded_length {decoded} != length {length} for codec none")
    if codec != C.CODEC_NONE and decoded > max(length, 1) * limits.max_expansion_ratio:
        raise LimitError(
            f"{filename}: {where}: decoded_length {decoded} exceeds {limits.max_expansion_ratio} x the {length} stored bytes"
        )
    algorithm, digest = _checksum(table["checksum"], where + ".checksum", filename)
    return BlobInfo(table["offset"], length, codec, decoded, algorithm, digest)


def _cap(value: int, limit: int, what: str, filename: str) -> None:
    if value > limit:
        raise LimitError(f"{filename}: {what} {value} exceeds the limit {limit}")


def _chunks(table, elements: int, data: BlobInfo, where: str, filename: str, limits: C.ReaderLimits) -> tuple[int, np.ndarray]:
    """Check the chunk table of a Huffman stream of ``elements`` codes (a tensor or a pack)
    against its stored bytes; return (chunk_elements, chunk_bits as a read-only int64 array)."""
    if data.codec != C.CODEC_NONE:
        raise StructureError(f"{filename}: {where}: data.codec {data.codec}: Huffman streams are stored without a codec")
    chunk_elements = table["chunk_elements"]
    n_chunks = table["chunk_bits"].size if table["chunk_bits"] is not None else 0
    _cap(n_chunks, limits.max_chunks_per_tensor, f"{where}: chunk count", filename)
    if elements and not 1 <= chunk_elements <= limits.max_chunk_elements:
        raise LimitError(f"{filename}: {where}: chunk_elements {chunk_elements} outside [1, {limits.max_chunk_elements}]")
    expected_chunks = -(-elements // chunk_elements) if elements else 0
    if n_chunks != expected_chunks:
        raise StructureError(
            f"{filename}: {where}: {n_chunks} chunks, but {elements} elements in chunks of {chunk_elements} need {expected_chunks}"
        )
    bits = table["chunk_bits"] if n_chunks else np.zeros(0, dtype=np.uint64)
    counts = np.full(n_chunks, chunk_elements, dtype=np.uint64)
    if n_chunks:
        counts[-1] = elements - chunk_elements * (n_chunks - 1)
    # Every code is 1..MAX_CODE_LENGTH bits: this bounds the elements by 8 x the stored bytes
    # (no decompression bomb) and keeps every sum below in range.
    bad = np.flatnonzero((bits < counts) | (bits > counts * np.uint64(C.MAX_CODE_LENGTH)))
    if bad.size:
        c = int(bad[0])
        raise HuffmanError(
            f"{filename}: {where}: chunk_bits[{c}] = {int(bits[c])} is impossible for {int(counts[c])} codes of "
            f"1..{C.MAX_CODE_LENGTH} bits"
        )
    stored_bytes = int(((bits + np.uint64(7)) >> np.uint64(3)).sum())
    if stored_bytes != data.length:
        raise StructureError(
            f"{filename}: {where}: chunk_bits need {stored_bytes} bytes, data.length is {data.length}"
        )
    owned = bits.astype(np.int64)  # < 2^63: at most MAX_CODE_LENGTH x 2^24 bits per chunk
    owned.flags.writeable = False
    return chunk_elements, owned


def _tensor(table, i: int, index_parts: dict, filename: str, limits: C.ReaderLimits) -> TensorInfo:
    path = table["path"]
    where = f"tensor {path!r}" if path else f"tensor #{i}"
    dtype = table["dtype"]
    if dtype not in dtypes.STORAGE_DTYPES:
        raise EnumError(f"{filename}: {where}: dtype {dtype} is not an element type this reader knows")
    dims_vector = table["dims"]
    rank = dims_vector.size if dims_vector is not None else 0
    _cap(rank, limits.max_rank, f"{where}: rank", filename)
    dims = tuple(dims_vector.tolist()) if rank else ()
    if any(d < 0 for d in dims):
        raise LimitError(f"{filename}: {where}: dims {list(dims)} hold a negative dimension")
    elements = 1
    for d in dims:  # Python ints: no wrap-around
        elements *= d
    _cap(elements, limits.max_tensor_elements, f"{where}: element count (product of dims)", filename)
    encoding = table["encoding"]
    if encoding not in C.ENCODINGS:
        raise EnumError(f"{filename}: {where}: encoding {encoding} is not one this reader knows")
    data = _blob(table["data"], where + ".data", filename, limits)
    itemsize = dtypes.STORAGE_DTYPES[dtype].itemsize
    decoded_bytes = elements * itemsize
    stored = max(data.length, 1)
    if decoded_bytes > stored * limits.max_expansion_ratio:
        raise LimitError(
            f"{filename}: {where}: {decoded_bytes} decoded bytes exceed {limits.max_expansion_ratio} x the {data.length} stored bytes"
        )
    if encoding == C.ENCODING_RAW:
        if table["chunk_bits"] is not None or table["chunk_elements"] or table["codebook"] or table["table"]:
            raise StructureError(f"{filename}: {where}: a RAW tensor must not set codebook, table, chunk_elements or chunk_bits")
        if data.decoded_length != decoded_bytes:
            raise StructureError(
                f"{filename}: {where}: raw data decodes to {data.decoded_length} bytes, dims {list(dims)} x {itemsize} need {decoded_bytes}"
            )
        return TensorInfo(path, _text(table["name"]), dtype, dims, encoding, data)
    # HUFFMAN
    if dtype not in dtypes.CODEBOOK_DTYPES:
        raise StructureError(
            f"{filename}: {where}: dtype {dtype} cannot be restored from a codebook "
            f"(HUFFMAN needs a float type or int8, uint8, int16, uint16)"
        )
    codebook, table_id = _references(table, where, index_parts, filename)
    chunk_elements, chunk_bits = _chunks(table, elements, data, where, filename, limits)
    return TensorInfo(path, _text(table["name"]), dtype, dims, encoding, data, codebook, table_id, chunk_elements, chunk_bits)


def _references(table, where: str, index_parts: dict, filename: str) -> tuple[int, int]:
    codebook, table_id = table["codebook"], table["table"]
    if codebook >= index_parts["codebooks"]:
        raise CodebookError(f"{filename}: {where}: codebook {codebook} does not exist ({index_parts['codebooks']} codebooks)")
    if table_id >= index_parts["tables"]:
        raise HuffmanError(f"{filename}: {where}: Huffman table {table_id} does not exist ({index_parts['tables']} tables)")
    return codebook, table_id


WIDE_PACK_VECTORS = ("counts", "chunk_bits", "offsets")
COMPACT_PACK_VECTORS = ("counts32", "chunk_bits32", "offsets32")   # since 1.3


def _pack_vectors(table, where: str, filename: str) -> tuple[dict, bool]:
    """The pack's counts, chunk_bits and offsets (None where absent) from exactly one
    form: the 64-bit vectors, or since 1.3 the 32-bit ones (never a mix); and whether
    the compact form was used (it needs FEATURE_COMPACT_PACKS, checked by the caller)."""
    wide = [name for name in WIDE_PACK_VECTORS if table[name] is not None]
    compact = [name for name in COMPACT_PACK_VECTORS if table[name] is not None]
    if wide and compact:
        raise StructureError(
            f"{filename}: {where}: mixes 64-bit vectors ({', '.join(wide)}) with 32-bit ones ({', '.join(compact)}); "
            f"a pack uses one form"
        )
    names = COMPACT_PACK_VECTORS if compact else WIDE_PACK_VECTORS
    vectors = {plain: table[name] for plain, name in zip(WIDE_PACK_VECTORS, names)}
    if vectors["chunk_bits"] is not None:
        vectors["chunk_bits"] = vectors["chunk_bits"].astype(np.uint64)
    return vectors, bool(compact)


def _pack(table, i: int, index_parts: dict, filename: str, limits: C.ReaderLimits) -> PackInfo:
    """One Pack (format 1.2; compact vectors since 1.3), checked on its own: member vectors,
    counts, scales, chunks, the length of offsets. Cross-pack rules (order, disjoint sites),
    codebook/table sizes and the offsets' ranges (they need the codebook) are checked by the caller."""
    where = f"pack {i}"
    sized, compact = _pack_vectors(table, where, filename)
    vectors = {"sites": table["sites"], "counts": sized["counts"], "scales": table["scales"]}
    lengths = {name: (v.size if v is not None else 0) for name, v in vectors.items()}
    if len(set(lengths.values())) != 1:
        raise StructureError(
            f"{filename}: {where}: sites, {'counts32' if compact else 'counts'} and scales must have one entry per member, got "
            f"{lengths['sites']}, {lengths['counts']} and {lengths['scales']}"
        )
    members = lengths["sites"]
    if members == 0:
        raise StructureError(f"{filename}: {where}: a pack needs at least one member")
    _cap(members, limits.max_pack_members, f"{where}: member count", filename)
    offsets = sized["offsets"]
    if offsets is not None and offsets.size != members:
        raise StructureError(
            f"{filename}: {where}: {'offsets32' if compact else 'offsets'} must have one entry per member ({members}) or be absent, got {offsets.size}"
        )
    sites = vectors["sites"].astype(np.int64)
    steps = np.flatnonzero(sites[1:] <= sites[:-1])
    if steps.size:
        j = int(steps[0]) + 1
        raise StructureError(
            f"{filename}: {where}: site ordinals must be strictly increasing (member {j}: {int(sites[j])} after {int(sites[j - 1])})"
        )
    counts = tuple(vectors["counts"].tolist())  # Python ints: the sum cannot wrap
    for j, count in enumerate(counts):
        if count > limits.max_tensor_elements:
            raise LimitError(f"{filename}: {where}: member {j} count {count} exceeds the limit {limits.max_tensor_elements}")
    elements = sum(counts)
    _cap(elements, limits.max_tensor_elements, f"{where}: element count (sum of counts)", filename)
    scales = vectors["scales"]
    bad = np.flatnonzero(~np.isfinite(scales))
    if bad.size:
        j = int(bad[0])
        raise CodebookError(f"{filename}: {where}: member {j} scale {float(scales[j])} is not finite")
    data = _blob(table["data"], where + ".data", filename, limits)
    if 4 * elements > max(data.length, 1) * limits.max_expansion_ratio:
        raise LimitError(
            f"{filename}: {where}: {4 * elements} decoded bytes exceed {limits.max_expansion_ratio} x the {data.length} stored bytes"
        )
    codebook, table_id = _references(table, where, index_parts, filename)
    chunks = {"chunk_elements": table["chunk_elements"], "chunk_bits": sized["chunk_bits"]}
    chunk_elements, chunk_bits = _chunks(chunks, elements, data, where, filename, limits)
    return PackInfo(
        i, tuple(sites.tolist()), counts, tuple(float(x) for x in scales.tolist()), codebook, table_id,
        chunk_elements, chunk_bits, data, elements, tuple(offsets.tolist()) if offsets is not None else (), compact,
    )


def _codebook(table, i: int, filename: str, limits: C.ReaderLimits) -> tuple[np.ndarray | None, tuple[int, int] | None]:
    """(values, None) for an explicit codebook, (None, (first, count)) for a grid (1.2)."""
    values, first, count = table["values"], table["first"], table["count"]
    if values is not None and values.size:
        if first or count:
            raise CodebookError(f"{filename}: codebook {i} sets both values and a grid (first {first}, count {count})")
        _cap(values.size, limits.max_codebook_entries, f"codebook {i} length", filename)
        values = values.copy()  # owned: outlives the mapping
        if not np.isfinite(values).all():
            raise CodebookError(f"{filename}: codebook {i} holds non-finite values")
        return values, None
    if count == 0:
        raise CodebookError(f"{filename}: codebook {i} is empty")
    _cap(count, limits.max_codebook_entries, f"codebook {i} length", filename)
    last = first + count - 1
    if abs(first) >= C.GRID_LIMIT or abs(last) >= C.GRID_LIMIT:
        raise CodebookError(
            f"{filename}: grid codebook {i}: values {first}..{last} must lie strictly between -2^24 and 2^24 (exact in float32)"
        )
    return None, (first, count)


def _table(table, i: int, entries_so_far: int, filename: str, limits: C.ReaderLimits) -> tuple[np.ndarray, int]:
    """One HuffmanTable: its code lengths, checked (complete code, longest at most
    MAX_CODE_LENGTH), and the bytes it stores in the index.

    Exactly one form: ``code_lengths`` (``count`` unset), or since 1.2 ``packed_lengths``,
    a raw DEFLATE stream shorter than ``count`` bytes that inflates to exactly ``count``
    (capped by ``max_codebook_entries``; inflated with an output limit of count + 1).
    Every table's entries count against ``max_table_entries`` before it is inflated."""
    from . import huffman  # local: keeps import graph flat

    subject = f"{filename}: Huffman table {i}"
    plain, packed, count = table["code_lengths"], table["packed_lengths"], table["count"]
    if plain is not None and packed is not None:
        raise StructureError(f"{subject}: has both code_lengths and packed_lengths; exactly one must be present")
    if plain is None and packed is None:
        raise StructureError(f"{subject}: has neither code_lengths nor packed_lengths; exactly one must be present")
    if plain is not None:
        if count:
            raise StructureError(
                f"{subject}: count {count} is set, but count belongs to packed_lengths only (must be 0 with code_lengths)"
            )
        _cap(entries_so_far + plain.size, limits.max_table_entries, "code lengths of all Huffman tables together", filename)
        lengths, stored = plain.copy(), int(plain.size)
    else:
        _cap(count, limits.max_codebook_entries, f"Huffman table {i}: count", filename)
        if packed.size >= count:
            raise LimitError(
                f"{subject}: packed_lengths of {packed.size} bytes must be shorter than the {count} code lengths it packs"
            )
        _cap(entries_so_far + count, limits.max_table_entries, "code lengths of all Huffman tables together", filename)
        lengths, stored = huffman.unpack_lengths(packed, count, subject), int(packed.size)
    huffman.validate_lengths(lengths, C.MAX_CODE_LENGTH, subject)
    return lengths, stored


def _check_references(streams, codebooks: list, tables: list, grids: list, filename: str) -> None:
    """Huffman tensors and packs against their codebook and table: sizes agree, chunks fit
    the longest code."""
    for s in streams:
        size = tables[s.table].size
        entries = grids[s.codebook][1] if grids[s.codebook] else codebooks[s.codebook].size
        if size != entries:
            raise HuffmanError(
                f"{filename}: {s.subject}: Huffman table {s.table} has {size} lengths for codebook {s.codebook} of {entries} entries"
            )
        longest = int(tables[s.table].max())
        if len(s.chunk_bits) and int(s.chunk_bits.max()) > s.chunk_elements * longest:
            c = int(np.argmax(s.chunk_bits))
            raise HuffmanError(
                f"{filename}: {s.subject}: chunk_bits[{c}] = {int(s.chunk_bits[c])} exceeds {s.chunk_elements} codes of "
                f"at most {longest} bits (Huffman table {s.table})"
            )


def _member_magnitudes(p: PackInfo, codebooks: list, grids: list, filename: str) -> np.ndarray:
    """Per member, the largest |level| it can decode to before its scale (float32, exact).

    Offsets (format 1.2) need a grid codebook, and every member's levels
    ``first + offset .. first + count - 1 + offset`` must lie strictly between
    -2^24 and 2^24 (exact in float32). Checked in int64 after a bound on the offsets
    themselves, so no sum wraps around."""
    offsets = np.asarray(p.offsets, dtype=np.int64)
    if not grids[p.codebook]:
        if offsets.size:
            raise CodebookError(
                f"{filename}: {p.subject}: has offsets, but codebook {p.codebook} holds explicit values "
                f"(offsets are only allowed with a grid codebook)"
            )
        return np.full(len(p.sites), np.abs(codebooks[p.codebook]).max(), dtype=np.float32)
    first, count = grids[p.codebook]
    last = first + count - 1
    if not offsets.size:
        return np.full(len(p.sites), max(abs(first), abs(last)), dtype=np.float32)
    # |first|, |last| < 2^24: an offset of magnitude 2^25 or more leaves the range whatever it is.
    far = (offsets <= -2 * C.GRID_LIMIT) | (offsets >= 2 * C.GRID_LIMIT)
    low, high = first + np.where(far, 0, offsets), last + np.where(far, 0, offsets)
    bad = np.flatnonzero(far | (np.abs(low) >= C.GRID_LIMIT) | (np.abs(high) >= C.GRID_LIMIT))
    if bad.size:
        j = int(bad[0])
        offset = int(offsets[j])
        raise CodebookError(
            f"{filename}: {p.subject}: member {j} offset {offset} puts grid codebook {p.codebook}'s values "
            f"{first}..{last} at levels {first + offset}..{last + offset}; levels must lie strictly between -2^24 and 2^24"
        )
    return np.maximum(np.abs(low), np.abs(high)).astype(np.float32)


def _check_packs(packs: list[PackInfo], codebooks: list, grids: list, tensors: int, filename: str, limits: C.ReaderLimits) -> None:
    """Packs sorted by first site, sites disjoint across packs, offsets only over grid
    codebooks and within the grid's exact range, every scale times its member's largest
    magnitude finite in float32 (so no member decodes to inf)."""
    members = sum(len(p.sites) for p in packs)
    _cap(tensors + members, limits.max_tensors, "stored tensor count (tensors and pack members)", filename)
    for previous, current in zip(packs, packs[1:]):
        if current.sites[0] <= previous.sites[0]:
            raise StructureError(
                f"{filename}: packs are not sorted by first site ({current.subject} starts at site {current.sites[0]}, "
                f"{previous.subject} at {previous.sites[0]})"
            )
    if packs:
        all_sites = np.sort(np.concatenate([np.asarray(p.sites, dtype=np.int64) for p in packs]))
        repeated = np.flatnonzero(all_sites[1:] == all_sites[:-1])
        if repeated.size:
            site = int(all_sites[repeated[0]])
            owners = [p.number for p in packs if site in p.sites]
            raise StructureError(f"{filename}: site {site} is a member of packs {owners}: each site belongs to one pack at most")
    for p in packs:
        magnitudes = _member_magnitudes(p, codebooks, grids, filename)
        with np.errstate(over="ignore"):
            products = magnitudes * np.abs(np.asarray(p.scales, dtype=np.float32))
        bad = np.flatnonzero(~np.isfinite(products))
        if bad.size:
            j = int(bad[0])
            raise CodebookError(
                f"{filename}: {p.subject}: member {j} scale {p.scales[j]} times its largest magnitude "
                f"{float(magnitudes[j])} (codebook {p.codebook}) overflows float32"
            )


def _used_symbols(table: np.ndarray) -> np.ndarray:
    return np.flatnonzero(table)


def _overflows(magnitudes: np.ndarray, dtype: int) -> np.ndarray:
    """Which float32 magnitudes become infinite in element type ``dtype`` (float16 and
    bfloat16 have smaller ranges; casting rounds to nearest, so the largest magnitude decides)."""
    if dtype not in (dtypes.FLOAT16, dtypes.BFLOAT16):
        return np.zeros(magnitudes.shape, dtype=bool)
    with np.errstate(over="ignore"):
        cast = dtypes.storage_to_float32(dtypes.cast_from_float32(magnitudes.astype(np.float32), dtype), dtype)
    return ~np.isfinite(cast)


def check_tensor_ranges(tensors: list[TensorInfo], codebooks: list, grids: list, tables: list, filename: str) -> None:
    """No Huffman tensor decodes to infinity: the largest magnitude among the codebook values
    its table can produce must be finite in the tensor's element type."""
    for t in tensors:
        if t.encoding != C.ENCODING_HUFFMAN or t.dtype not in (dtypes.FLOAT16, dtypes.BFLOAT16):
            continue
        used = _used_symbols(tables[t.table])
        if grids[t.codebook]:
            first = grids[t.codebook][0]
            largest = np.float32(max(abs(first + int(used[0])), abs(first + int(used[-1]))))
        else:
            largest = np.abs(codebooks[t.codebook][used]).max(initial=0).astype(np.float32)
        if _overflows(np.asarray([largest]), t.dtype)[0]:
            raise CodebookError(
                f"{filename}: {t.subject}: codebook {t.codebook} value of magnitude {float(largest):g} overflows "
                f"the tensor's element type {dtypes.NAMES.get(t.dtype, t.dtype)}"
            )


def check_integer_codebooks(tensors: list[TensorInfo], codebooks: list, grids: list, filename: str) -> None:
    """An integer Huffman tensor (format 1.4) restores its codebook's values exactly: every
    value of its codebook must be an integer within the tensor's element type (a grid's first
    and last value decide), so the cast from float32 is exact and never wraps."""
    for t in tensors:
        if t.encoding != C.ENCODING_HUFFMAN or t.dtype not in dtypes.INTEGER_RANGES:
            continue
        low, high = dtypes.INTEGER_RANGES[t.dtype]
        name = dtypes.NAMES[t.dtype]
        if grids[t.codebook]:
            first, count = grids[t.codebook]
            if first < low or first + count - 1 > high:
                raise CodebookError(
                    f"{filename}: {t.subject}: grid codebook {t.codebook} values {first}..{first + count - 1} "
                    f"leave the {name} range {low}..{high}"
                )
            continue
        values = codebooks[t.codebook]
        fractional = np.flatnonzero(values != np.floor(values))
        if fractional.size:
            raise CodebookError(
                f"{filename}: {t.subject}: codebook {t.codebook} value {float(values[fractional[0]])!r} is not an integer; "
                f"an {name} tensor needs integer values"
            )
        outside = np.flatnonzero((values < low) | (values > high))
        if outside.size:
            raise CodebookError(
                f"{filename}: {t.subject}: codebook {t.codebook} value {float(values[outside[0]]):g} "
                f"leaves the {name} range {low}..{high}"
            )


def member_magnitudes(p: PackInfo, codebooks: tuple, grids: tuple, tables: tuple) -> np.ndarray:
    """Per member, the largest float32 magnitude it decodes to: its largest level among the
    symbols the pack's table codes, times its scale (an exact float32 product, as decoded)."""
    used = _used_symbols(tables[p.table])
    if grids[p.codebook]:
        first = grids[p.codebook][0]
        offsets = np.asarray(p.member_offsets, dtype=np.int64)
        low, high = first + int(used[0]) + offsets, first + int(used[-1]) + offsets  # checked: below 2^24 in magnitude
        levels = np.maximum(np.abs(low), np.abs(high)).astype(np.float32)
    else:
        levels = np.full(len(p.sites), np.abs(codebooks[p.codebook][used]).max(), dtype=np.float32)
    with np.errstate(over="ignore"):
        return levels * np.abs(np.asarray(p.scales, dtype=np.float32))


def check_member_ranges(index: Index, dtype_of) -> None:
    """No pack member decodes to infinity in its site's element type (``dtype_of(site)``,
    from the graph): float32 products are checked with the index; float16 and bfloat16
    members have smaller ranges."""
    for p in index.packs:
        member_dtypes = np.array([dtype_of(site) for site in p.sites])
        narrow = np.isin(member_dtypes, [dtypes.FLOAT16, dtypes.BFLOAT16])
        if not narrow.any():
            continue
        magnitudes = member_magnitudes(p, index.codebooks, index.grids, index.tables)
        for dtype in (dtypes.FLOAT16, dtypes.BFLOAT16):
            bad = np.flatnonzero((member_dtypes == dtype) & _overflows(magnitudes, dtype))
            if bad.size:
                j = int(bad[0])
                raise CodebookError(
                    f"{index.filename}: pack {p.number} member {j} (site {p.sites[j]}): values up to {float(magnitudes[j]):g} "
                    f"(scale {p.scales[j]:g}) overflow the site's element type {dtypes.NAMES[dtype]}"
                )


def _check_features(declared: int, packs: list, grids: list, blobs: list[tuple[str, BlobInfo]], packed_tables: bool,
                    tensors: list[TensorInfo], filename: str) -> None:
    """A file that uses a 1.2, 1.3 or 1.4 feature must declare its required-feature bit, so that an
    older reader refuses it instead of misreading it."""
    used = 0
    if packs or any(grids):
        used |= C.FEATURE_PACKS
    if any(blob.codec == C.CODEC_LZMA for _, blob in blobs):
        used |= C.FEATURE_LZMA
    if packed_tables:
        used |= C.FEATURE_PACKED_TABLES
    if any(p.compact for p in packs):
        used |= C.FEATURE_COMPACT_PACKS
    if any(t.encoding == C.ENCODING_HUFFMAN and t.dtype in dtypes.INTEGER_RANGES for t in tensors):
        used |= C.FEATURE_INTEGER_TENSORS
    missing = used & ~declared
    if missing:
        names = ", ".join(name for bit, name in C.FEATURES.items() if bit & missing)
        raise StructureError(
            f"{filename}: the file uses {names} but required_features 0x{declared:x} lacks 0x{missing:x}"
        )


def _check_layout(blobs: list[tuple[str, BlobInfo]], alignment: int, payload_size: int, filename: str) -> None:
    """Blobs must tile [0, payload_size) in order: aligned, no overlap, no gap beyond padding, nothing after."""
    position = 0
    for where, blob in sorted(blobs, key=lambda item: (item[1].offset, item[1].length)):
        expected = -(-position // alignment) * alignment
        if blob.offset < position:
            raise LayoutError(f"{filename}: {where}: payload range at {blob.offset} overlaps the previous one ending at {position}")
        if blob.offset != expected:
            raise LayoutError(
                f"{filename}: {where}: payload range starts at {blob.offset}, expected {expected} (a gap or misalignment)"
            )
        position = blob.offset + blob.length
        if position > payload_size:
            raise LayoutError(f"{filename}: {where}: payload range ends at {position}, past the {payload_size}-byte payload")
    if position != payload_size:
        raise LayoutError(f"{filename}: {payload_size - position} bytes after the last payload range")


def _check_feature_versions(required: int, minor: int, filename: str) -> None:
    """Each feature bit belongs to the version that defined it: a file labelled 1.0 (which
    needs no index digest) must not set a 1.2 bit and so have its index read unprotected."""
    for bit, since in C.FEATURE_SINCE_MINOR.items():
        if required & bit and minor < since:
            raise VersionError(
                f"{filename}: format {C.FORMAT_MAJOR}.{minor} sets feature 0x{bit:x} ({C.FEATURES[bit]}), "
                f"which format {C.FORMAT_MAJOR}.{since} defined; the file must say {C.FORMAT_MAJOR}.{since} or later"
            )


def _check_index_digest(buf: memoryview, root: dict, file_size: int, minor: int, filename: str) -> None:
    """Model.index_digest (format 1.1): SHA-256 of [0, payload_offset) with its own 32 bytes zeroed.

    Checked whenever present, before any other field is trusted; required from
    minor version 1 on. Files of 1.0 have none (nothing covers their index)."""
    table = root["index_digest"]
    if table is None:
        if minor >= 1:
            raise StructureError(f"{filename}: index_digest is missing; format 1.{minor} requires it")
        return
    algorithm, digest = _checksum(table, "index_digest", filename)
    end = root["payload_offset"]
    if end > file_size:
        raise LayoutError(f"{filename}: payload_offset {end} lies past the end of the {file_size}-byte file")
    start = table["digest@"]  # the digest bytes, inside the verified index
    head = bytearray(buf[:end])
    if start + len(digest) > end:
        raise LayoutError(f"{filename}: index_digest lies past payload_offset {end}")
    head[start : start + len(digest)] = bytes(len(digest))
    if hashlib.new(C.CHECKSUMS[algorithm][0], head).digest() != digest:
        raise ChecksumError(f"{filename}: index_digest mismatch: the index (bytes [0, {end})) is corrupt")


def _charge_parsing(root: dict, budget: MemoryBudget) -> None:
    """Charge, from the verified vector sizes and counts, what parsing creates beyond views
    of the file: codebook copies (a grid codebook's values are made only to decode, in the
    reader's plan), code lengths (a packed table's inflated bytes twice: zlib's output and the array),
    chunk tables (int64) and pack member records."""

    def size(vector) -> int:
        return 0 if vector is None else int(vector.size)

    codebooks = root["codebooks"] or []
    budget.charge(sum(4 * size(cb["values"]) for cb in codebooks), "the codebook values")
    tables = root["tables"] or []
    budget.charge(sum(size(t["code_lengths"]) + (2 * t["count"] if t["packed_lengths"] is not None else 0) for t in tables),
                  "the code-length tables")
    streams = (root["tensors"] or []) + (root["packs"] or [])
    chunks = sum(size(t["chunk_bits"]) for t in streams) + sum(size(p["chunk_bits32"]) for p in root["packs"] or [])
    budget.charge(8 * chunks, "the chunk tables")
    budget.charge(PACK_MEMBER_BYTES * sum(size(p["sites"]) for p in root["packs"] or []), "the pack member records")


def parse_index(buf: memoryview, file_size: int, filename: str, limits: C.ReaderLimits = C.DEFAULT_LIMITS,
                budget: MemoryBudget | None = None) -> Index:
    """Verify and read the index of a .moub file held in ``buf`` (the whole file), charging
    what it materialises to ``budget`` (default: a budget of ``limits``) first."""
    budget = budget if budget is not None else MemoryBudget.of(limits, filename)
    index_view = buf[: min(file_size, limits.max_index_bytes)]
    index_end, root = fbverify.verify_tree(index_view, limits, filename, budget)
    major, minor = root["format_major"], root["format_minor"]
    if major != C.FORMAT_MAJOR:
        raise VersionError(f"{filename}: format version {major}.{minor}; this reader reads major version {C.FORMAT_MAJOR}")
    unknown = root["required_features"] & ~C.KNOWN_REQUIRED_FEATURES
    if unknown:
        raise VersionError(f"{filename}: format {major}.{minor} requires features 0x{unknown:x} this reader does not implement")
    _check_feature_versions(root["required_features"], minor, filename)
    _check_index_digest(buf, root, file_size, minor, filename)
    alignment = root["alignment"]
    if alignment == 0 or alignment & (alignment - 1) or alignment > C.MAX_ALIGNMENT:
        raise LayoutError(f"{filename}: alignment {alignment} is not a power of two in [1, {C.MAX_ALIGNMENT}]")
    payload_offset = root["payload_offset"]
    if payload_offset % alignment or payload_offset < index_end or payload_offset > file_size:
        raise LayoutError(
            f"{filename}: payload_offset {payload_offset} must be a multiple of {alignment} in [{index_end}, {file_size}]"
        )
    if any(bytes(buf[index_end:payload_offset])):
        raise LayoutError(f"{filename}: padding between the index (ends {index_end}) and the payload is not zero")

    codebook_tables, huffman_tables = root["codebooks"] or [], root["tables"] or []
    tensor_tables, metadata_tables = root["tensors"] or [], root["metadata"] or []
    pack_tables = root["packs"] or []
    counts = {"codebooks": len(codebook_tables), "tables": len(huffman_tables)}
    _cap(counts["codebooks"], limits.max_codebooks, "codebook count", filename)
    _cap(counts["tables"], limits.max_tables, "Huffman table count", filename)
    _cap(len(tensor_tables), limits.max_tensors, "tensor count", filename)
    _cap(len(pack_tables), limits.max_packs, "pack count", filename)
    _cap(len(metadata_tables), limits.max_metadata_entries, "metadata entry count", filename)
    _charge_parsing(root, budget)

    codebooks: list[np.ndarray | None] = []
    grids: list[tuple[int, int] | None] = []
    for i, table in enumerate(codebook_tables):
        values, grid = _codebook(table, i, filename, limits)
        codebooks.append(values)
        grids.append(grid)
    tables, table_bytes, table_entries = [], [], 0
    for i, table in enumerate(huffman_tables):
        lengths, stored = _table(table, i, table_entries, filename, limits)
        tables.append(lengths)
        table_bytes.append(stored)
        table_entries += lengths.size

    tensors = [_tensor(table, i, counts, filename, limits) for i, table in enumerate(tensor_tables)]
    for previous, current in zip(tensors, tensors[1:]):
        if previous.path == current.path:
            raise StructureError(f"{filename}: tensor path {current.path!r} appears more than once")
        if previous.path > current.path:
            raise StructureError(f"{filename}: tensors are not sorted by path ({previous.path!r} before {current.path!r})")
    packs = [_pack(table, i, counts, filename, limits) for i, table in enumerate(pack_tables)]
    huffman_streams = [t for t in tensors if t.encoding == C.ENCODING_HUFFMAN] + packs
    _check_references(huffman_streams, codebooks, tables, grids, filename)
    _check_packs(packs, codebooks, grids, len(tensors), filename, limits)
    # A grid codebook costs 12 index bytes whatever its count: its values are made only when a
    # stream that uses it decodes (an unused one is invalid), charged in the reader's plan.
    used_codebooks = {s.codebook for s in huffman_streams}
    for i, grid in enumerate(grids):
        if grid is not None and i not in used_codebooks:
            raise CodebookError(f"{filename}: grid codebook {i} is used by no tensor or pack")
    check_tensor_ranges(tensors, codebooks, grids, tables, filename)
    check_integer_codebooks(tensors, codebooks, grids, filename)
    decoded_total = sum(t.decoded_bytes for t in tensors) + sum(p.decoded_bytes for p in packs)
    _cap(decoded_total, limits.max_decoded_bytes, "decoded model size in bytes", filename)

    graph = _blob(root["graph"], "graph", filename, limits)
    _cap(graph.decoded_length, limits.max_graph_bytes, "graph size in bytes", filename)

    metadata: dict[str, str] = {}
    for i, entry in enumerate(metadata_tables):
        key_text, value_text = entry["key"], entry["value"]  # the verifier checked UTF-8
        key_bytes, value_bytes = len(key_text.encode("utf-8")), len(value_text.encode("utf-8"))
        if key_bytes > limits.max_metadata_key_bytes:
            raise MetadataError(f"{filename}: metadata[{i}].key of {key_bytes} bytes exceeds the limit {limits.max_metadata_key_bytes}")
        if value_bytes > limits.max_metadata_value_bytes:
            raise MetadataError(
                f"{filename}: metadata[{i}].value of {value_bytes} bytes exceeds the limit {limits.max_metadata_value_bytes}"
            )
        if key_text in metadata:
            raise MetadataError(f"{filename}: metadata key {key_text!r} appears more than once")
        if metadata and key_text < next(reversed(metadata)):
            raise MetadataError(f"{filename}: metadata keys are not sorted ({key_text!r} after {next(reversed(metadata))!r})")
        metadata[key_text] = value_text

    digest_algorithm, digest = _checksum(root["payload_digest"], "payload_digest", filename)
    blobs = [("graph", graph)] + [(t.subject, t.data) for t in tensors] + [(p.subject, p.data) for p in packs]
    packed_tables = any(stored < lengths.size for stored, lengths in zip(table_bytes, tables))
    _check_features(root["required_features"], packs, grids, blobs, packed_tables, tensors, filename)
    _check_layout(blobs, alignment, file_size - payload_offset, filename)
    return Index(
        filename=filename,
        format_major=major,
        format_minor=minor,
        required_features=root["required_features"],
        producer=_text(root["producer"]),
        alignment=alignment,
        payload_offset=payload_offset,
        file_size=file_size,
        graph=graph,
        codebooks=tuple(codebooks),
        tables=tuple(tables),
        tensors=tuple(tensors),
        metadata=metadata,
        payload_digest_algorithm=digest_algorithm,
        payload_digest=digest,
        packs=tuple(packs),
        grids=tuple(grids),
        table_bytes=tuple(table_bytes),
    )
