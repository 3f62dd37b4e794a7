"""Read .moub files from untrusted storage.

Order of operations: a regular file of a size within the cap is mapped; the
whole index is verified and validated (:mod:`.index`, including the index
digest), everything reading it may materialise charged to the file's memory
budget (:mod:`.budget`) before it is created; zero padding between payload
ranges is checked. Then, per window of about ``batch_elements`` Huffman elements
(DECODE_BATCH_ELEMENTS by default): checksum of each tensor's stored bytes,
chunk checks (bit ranges, zero padding bits), decoding of all chunks in lock
step (:mod:`.lanes`, on ``decode_workers`` threads; bitarray chunk by chunk
when there are few) bounded by declared counts, each chunk required to take
exactly its declared bits. Indices cannot leave the codebook (the code-length
table has one entry per codebook entry). A raw tensor's array is allocated only
after its stored bytes' checksum has passed, then filled from the mapping or by
inflating into it. Memory: what the plan charged, never more: the decoded
window (the arrays handed out are views of it) plus the lane decoder's scratch,
about the window's stored bytes (at most DECODER_SCRATCH_BYTES) and a few MB.

Packs (format 1.2) are streams like tensors: their chunks are lanes too. A
pack decodes to float32 codebook values, then each member is offset, scaled
and cast into an array of its own (:func:`scale_member`); a one-member pack
decodes straight to its final values (offset and scale folded into the
per-symbol table). zlib and xz blobs are decoded with a hard output limit
(and, for xz, a decoder memory limit) and must end exactly.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import lzma
import math
import mmap
import os
import stat
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from . import constants as C
from . import dtypes
from .budget import MemoryBudget
from .errors import ChecksumError, HuffmanError, LayoutError, LimitError, StructureError, TruncatedFileError
from .huffman import CanonicalDecoder
from .lanes import BLOCK_BYTES, PAGE_BACKED_BYTES, WINDOW_SLACK, LookupTable, MixedTables, decode_lanes, empty_pages
from .index import BlobInfo, Index, PackInfo, PackMember, TensorInfo, parse_index

Stream = TensorInfo | PackInfo   # a Huffman-coded stream: one tensor, or one pack of several


@dataclass(frozen=True)
class Levels:
    """A value key: a grid stream decoded to its integer levels plus ``shift``
    (``first + symbol + shift``), in the integer type ``dtype`` (a NumPy dtype string)."""

    dtype: str
    shift: int = 0


ValueKey = int | tuple[int, float, int] | Levels | None  # what a stream decodes to: an element type, (type, scale, offset), levels, or symbols
# What a .moub can be read from: a path (mapped), the file's bytes, or a binary file object (read whole).
Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


DECODE_BATCH_ELEMENTS = 1 << 22  # elements decoded together (lanes of several tensors)
MIN_LANES_PER_WORKER = 8192      # lanes a decoding thread needs before splitting pays (GIL turns)
MIN_LANES = 128                  # fewer chunks than this decode faster one by one (bitarray)
MIN_LANES_FOR_COPY_THREAD = 2048 # lanes before a second thread copying finished blocks pays
DECODER_SCRATCH_BYTES = 1 << 25  # stream words the lane decoder holds per call (all its lanes), at most
CONCURRENT_CHECK_BYTES = 1 << 20 # stored bytes worth hashing on other threads while decoding
RAW_COPY_WINDOW = 1 << 26        # bytes of a stored raw tensor hashed and copied per step
INFLATE_PIECE = 1 << 20          # bytes a compressed blob inflates per step, straight into its destination
INFLATE_INPUT = 1 << 16          # stored bytes handed to the inflater per step
LOOKUP_SYMBOL_BYTES = 80         # per used symbol of a table: the lookup table's sorted arrays, bitarray's symbol list
LANE_BYTES = 128                 # per chunk: the lane decoder's per-lane state (positions, counts, tables)
WORKING_BYTES = 1 << 20          # small buffers of any decode (inflate pieces, hashers)
READ_PIECE = 1 << 20             # bytes read from a file object per call


def default_decode_workers() -> int:
    """Decoding threads when none are asked for: one per core this process may run on, up to 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``alignment`` boundary
    (the decoded tensors are views of it and go to onnxruntime as they are). Big ones
    are page-aligned mappings of their own (:func:`.lanes.empty_pages`): freed, their
    memory goes back to the system at once."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for dim in shape:
        nbytes *= dim
    if nbytes >= PAGE_BACKED_BYTES:
        return empty_pages(shape, dtype)
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A 64-byte-aligned uninitialised array, as the decoded tensors are, for arrays built from
    them that go to onnxruntime too (the compact session's packed 4-bit levels)."""
    return _aligned_empty(shape, dtype)


def _aligned(view: np.ndarray, alignment: int = 64) -> np.ndarray:
    """``view`` itself when its data is ``alignment``-aligned, else an aligned copy: streams
    after the first in a lane buffer start wherever the previous one's rows end."""
    if view.ctypes.data % alignment == 0:
        return view
    copy = _aligned_empty(view.shape, view.dtype, alignment)
    copy[...] = view
    return copy


_RELEASE_PAGES = hasattr(mmap, "MADV_DONTNEED") and hasattr(mmap.mmap, "madvise")


def _digest(algorithm: int, data) -> bytes:
    name = C.CHECKSUMS[algorithm][0]
    return hashlib.new(name, data).digest()


class MoubFile:
    """An open, validated .moub file. Use as a context manager."""

    def __init__(
        self,
        path: Source,
        limits: C.ReaderLimits = C.DEFAULT_LIMITS,
        batch_elements: int = DECODE_BATCH_ELEMENTS,
        decode_workers: int | None = 1,
        plan_decoding: bool = True,
    ) -> None:
        """Open and validate ``path``: a file's path (mapped), its bytes, or a binary file
        object (read from its position to the end, at most ``limits.max_file_bytes``; a
        writable buffer is copied first, so the bytes checked are the bytes decoded).
        ``decode_workers``: threads that decode Huffman
        lanes (None: up to 4, one per core); ``batch_elements``: elements decoded
        together, which bounds the decoder's working memory. Everything reading the file
        may materialise is charged to ``self.budget`` (``limits.memory_budget``) before
        it is created: the index as it is parsed, the graph, and with ``plan_decoding``
        (False: the index is all the caller reads) the decoding of every tensor and pack."""
        self.path = Path(path) if isinstance(path, (str, os.PathLike)) else None
        self.batch_elements = max(1, batch_elements)
        self.decode_workers = max(1, decode_workers if decode_workers is not None else default_decode_workers())
        self.filename = source_name(path)
        self.limits = limits
        self.budget = MemoryBudget.of(limits, self.filename)
        self._mmap: mmap.mmap | None = None
        self._lookups: dict[int, LookupTable | None] = {}
        self._value_tables: dict[tuple, np.ndarray] = {}
        self._symbol_values: dict[tuple, np.ndarray] = {}
        self._bitarray_decoders: dict[int, CanonicalDecoder] = {}
        self._planned_values: dict[int, int] = {}    # codebook -> per-symbol value arrays the plan charged
        self._planned_entries: dict[int, int] = {}   # table -> lookup-entry arrays the plan charged
        if self.path is not None:
            self._mmap, size = self._map(limits)
            self._buffer: mmap.mmap | bytes | bytearray = self._mmap
        else:
            self._buffer = self._read(path, limits)
            size = len(self._buffer)
        self._view = memoryview(self._buffer)
        try:
            self.index: Index = parse_index(self._view, size, self.filename, limits, self.budget)
            self._check_padding()
            self.budget.charge(3 * self.index.graph.decoded_length, "the graph (inflated, parsed and serialized again)")
            if plan_decoding:
                self._charge_decoding()
        except BaseException:
            self.close()
            raise

    def _map(self, limits: C.ReaderLimits) -> tuple[mmap.mmap, int]:
        """Map the file read-only once it is known to be a regular file of a size within
        the limits (a FIFO or device is refused before it can block or mislead)."""
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise StructureError(f"{self.filename}: not a regular file")
            size = info.st_size
            if size < C.PREAMBLE_SIZE:
                raise TruncatedFileError(f"{self.filename}: {size} bytes is shorter than the {C.PREAMBLE_SIZE}-byte preamble")
            if size > limits.max_file_bytes:
                raise LimitError(f"{self.filename}: file size {size} exceeds the limit {limits.max_file_bytes}")
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ), size
        finally:
            os.close(fd)

    def _read(self, source, limits: C.ReaderLimits) -> bytes | bytearray:
        """The bytes of an in-memory file or of a file object, checked against the preamble
        size and the file-size cap before any decoding (a file object is read at most one
        byte past the cap)."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = source if isinstance(source, bytes) else bytes(source)
        elif hasattr(source, "read"):
            data = bytearray()  # private to this reader: nobody else can change it
            while len(data) <= limits.max_file_bytes:
                piece = source.read(min(READ_PIECE, limits.max_file_bytes + 1 - len(data)))
                if not piece:
                    break
                if not isinstance(piece, bytes):
                    raise StructureError(f"{self.filename}: not a binary file object (read() gave {type(piece).__name__})")
                data += piece
        else:
            raise TypeError(f"a .moub is read from a path, bytes or a binary file object, not {type(source).__name__}")
        if len(data) > limits.max_file_bytes:
            raise LimitError(f"{self.filename}: file size {len(data)} exceeds the limit {limits.max_file_bytes}")
        if len(data) < C.PREAMBLE_SIZE:
            raise TruncatedFileError(f"{self.filename}: {len(data)} bytes is shorter than the {C.PREAMBLE_SIZE}-byte preamble")
        return data

    # the memory plan --------------------------------------------------------
    def _value_slots(self) -> dict[tuple[int, int], int]:
        """Per (table, codebook): how many per-symbol value arrays and lookup tables decoding
        builds, one per distinct element type (one-member packs: one each, their scale and
        offset are folded into their values)."""
        keys: set[tuple] = set()
        for t in self.index.tensors:
            if t.encoding == C.ENCODING_HUFFMAN:
                keys.add((t.table, t.codebook, t.dtype))
        for p in self.index.packs:
            keys.add((p.table, p.codebook, ("member", p.number) if len(p.sites) == 1 else dtypes.FLOAT))
        slots: dict[tuple[int, int], int] = {}
        for table, codebook, _ in keys:
            slots[(table, codebook)] = slots.get((table, codebook), 0) + 1
        return slots

    def _entries_bytes(self, table: int) -> int:
        """A lookup table's packed entries (2^L of 8 bytes), twice: the cached array and its
        copy when lanes of several tables decode together (:class:`MixedTables`); 0 for the
        one-symbol table, which decodes without one."""
        lengths = self.index.tables[table]
        if np.count_nonzero(lengths) < 2:
            return 0
        return 2 * 8 * (1 << int(lengths.max()))

    def _charge_decoding(self) -> None:
        """Charge what decoding every tensor and pack creates, before any of it is: code
        tables (each table in use, and per distinct value type its per-symbol values and its
        2^L lookup entries), the decoded model (pack elements at 4 bytes; the runtime adds
        what wider element types need), and working memory (two windows of the largest
        decode, the lane decoder's scratch and blocks, the xz decoder)."""
        index, budget = self.index, self.budget
        streams: list[Stream] = [t for t in index.tensors if t.encoding == C.ENCODING_HUFFMAN] + list(index.packs)
        used_tables = {s.table for s in streams}
        budget.charge(sum(LOOKUP_SYMBOL_BYTES * int(np.count_nonzero(index.tables[t])) for t in used_tables),
                      "the decoders of the code-length tables in use")
        slots = self._value_slots()
        for (table, codebook), count in slots.items():
            self._planned_values[codebook] = self._planned_values.get(codebook, 0) + count
            self._planned_entries[table] = self._planned_entries.get(table, 0) + count
        budget.charge(sum(count * 8 * index.codebook_size(codebook) for (_, codebook), count in slots.items()),
                      "the per-symbol values of the codebooks in use (grid codebooks made then)")
        budget.charge(sum(count * self._entries_bytes(table) for (table, _), count in slots.items()),
                      f"the lookup tables of {len(used_tables)} code-length tables (2^L entries each)")
        budget.charge(index.decoded_bytes, "the decoded model")
        huffman_bytes = sum(s.decoded_bytes for s in streams)
        largest = max([t.decoded_bytes for t in index.tensors] + [p.decoded_bytes for p in index.packs], default=0)
        window = max(largest, min(huffman_bytes, DECODE_BATCH_ELEMENTS * 8))
        chunks = sum(len(s.chunk_bits) for s in streams)
        stream_words = min(DECODER_SCRATCH_BYTES, 2 * sum(s.data.length for s in streams) + LANE_BYTES * chunks)
        blocks = min(2 * BLOCK_BYTES, 16 * sum(s.n_elements for s in streams))
        lzma_memory = self.limits.max_lzma_memory if any(b.codec == C.CODEC_LZMA for _, b in index.blobs()) else 0
        budget.charge(2 * window + stream_words + blocks + lzma_memory + WORKING_BYTES, "the decoding working memory")

    def _charge_unplanned(self, planned: dict[int, int], owner: int, nbytes: int, what: str) -> None:
        """Use up one array the plan charged for ``owner``, or charge ``nbytes`` now (a caller
        asking for values the plan did not foresee, such as :meth:`decode_indices`)."""
        if planned.get(owner, 0) > 0:
            planned[owner] -= 1
        else:
            self.budget.charge(nbytes, what)

    # lifecycle -------------------------------------------------------------
    def close(self) -> None:
        view = getattr(self, "_view", None)
        if self._mmap is not None:
            mapping, self._mmap = self._mmap, None
            try:
                view.release()
                mapping.close()
            except BufferError:
                pass  # slices still referenced (e.g. by a traceback): unmapped when they go
        elif view is not None:
            with contextlib.suppress(BufferError):
                view.release()

    def __enter__(self) -> MoubFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # raw access ------------------------------------------------------------
    def _check_padding(self) -> None:
        base = self.index.payload_offset
        blobs = sorted((blob for _, blob in self.index.blobs()), key=lambda b: b.offset)
        position = 0
        for blob in blobs:
            if any(self._view[base + position : base + blob.offset]):
                raise LayoutError(f"{self.filename}: padding before payload offset {blob.offset} is not zero")
            position = blob.offset + blob.length

    def stored_bytes(self, blob: BlobInfo) -> memoryview:
        start = self.index.payload_offset + blob.offset
        return self._view[start : start + blob.length]

    def _checked(self, blob: BlobInfo, subject: str) -> memoryview:
        data = self.stored_bytes(blob)
        if _digest(blob.checksum_algorithm, data) != blob.checksum:
            raise ChecksumError(f"{self.filename}: {subject}: checksum mismatch of the {blob.length} stored bytes")
        return data

    def _check_windows(self, blob: BlobInfo, subject: str) -> None:
        """Check a stored blob's digest a window at a time, letting each window's pages of
        the mapping go after it: kept, they would count as this process's memory (a 4 GiB
        tensor would cost 4 GiB before its array exists)."""
        start = self.index.payload_offset + blob.offset
        hasher = hashlib.new(C.CHECKSUMS[blob.checksum_algorithm][0])
        for begin in range(0, blob.length, RAW_COPY_WINDOW):
            end = min(blob.length, begin + RAW_COPY_WINDOW)
            hasher.update(self._view[start + begin : start + end])
            self._release_pages(start + begin, end - begin)
        if hasher.digest() != blob.checksum:
            raise ChecksumError(f"{self.filename}: {subject}: checksum mismatch of the {blob.length} stored bytes")

    def _copy_windows(self, blob: BlobInfo, out: np.ndarray) -> None:
        """Copy a stored blob (already checked) into ``out`` (bytes), a window at a time,
        each window's pages of the mapping let go after it."""
        start = self.index.payload_offset + blob.offset
        for begin in range(0, blob.length, RAW_COPY_WINDOW):
            end = min(blob.length, begin + RAW_COPY_WINDOW)
            out[begin:end] = np.frombuffer(self._view[start + begin : start + end], dtype=np.uint8)
            self._release_pages(start + begin, end - begin)

    def _release_pages(self, start: int, length: int) -> None:
        """Drop this range's pages from the mapping (not from the page cache; read again,
        they fault back in). Only for ranges of at least a window: small ones are not worth
        a system call."""
        if length < RAW_COPY_WINDOW // 2 or not _RELEASE_PAGES or self._mmap is None:
            return
        first = start - start % mmap.PAGESIZE
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, start + length - first)
        except (OSError, ValueError):
            pass

    def _inflate_into(self, data: memoryview, blob: BlobInfo, subject: str, out: memoryview) -> None:
        """Inflate a checked zlib or xz blob straight into ``out`` (exactly ``decoded_length``
        bytes), INFLATE_PIECE bytes at a time: never more output than one byte past the
        declared length, no second copy of the output, the stream must end exactly with its
        input. xz decoding is bounded by ``limits.max_lzma_memory`` as well."""
        n = blob.decoded_length
        kind = "xz" if blob.codec == C.CODEC_LZMA else "zlib"
        if blob.codec == C.CODEC_LZMA:
            decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=self.limits.max_lzma_memory)
            errors: tuple[type[Exception], ...] = (lzma.LZMAError,)
        else:
            decoder = zlib.decompressobj()
            errors = (zlib.error,)
        position, pending, fed, ended = 0, b"", 0, False
        try:
            while not ended:
                # input goes in INFLATE_INPUT pieces: handing zlib the whole blob would copy its
                # unconsumed tail (most of the blob) at every step of INFLATE_PIECE output
                if blob.codec == C.CODEC_LZMA:
                    feed = data[fed : fed + INFLATE_INPUT] if decoder.needs_input else b""
                    fed += len(feed)
                    piece = decoder.decompress(feed, min(INFLATE_PIECE, n + 1 - position))
                    progress = bool(piece) or bool(feed)
                else:
                    if not pending:
                        pending = data[fed : fed + INFLATE_INPUT]
                        fed += len(pending)
                    before = len(pending)
                    piece = decoder.decompress(pending, min(INFLATE_PIECE, n + 1 - position))
                    pending = decoder.unconsumed_tail
                    progress = bool(piece) or len(pending) < before
                ended = decoder.eof
                if position + len(piece) > n:
                    position += len(piece)
                    break
                out[position : position + len(piece)] = piece
                position += len(piece)
                if not progress:  # the input is used up and the stream has not ended: cut short
                    break
        except errors as exc:
            if blob.codec == C.CODEC_LZMA and "memory" in str(exc).lower():
                raise LimitError(
                    f"{self.filename}: {subject}: the xz stream needs more decoder memory than the limit "
                    f"{self.limits.max_lzma_memory} bytes ({exc})"
                ) from None
            raise StructureError(f"{self.filename}: {subject}: {kind} stream is corrupt ({exc})") from None
        unused = (len(decoder.unused_data) + len(data) - fed) if ended else 0
        if position != n or not ended or unused:
            verb = "decode" if kind == "xz" else "inflate"
            raise StructureError(
                f"{self.filename}: {subject}: {kind} stream does not {verb} to exactly {n} bytes "
                f"(got {min(position, n + 1)}{'' if ended else ', stream not ended'}"
                f"{f', {unused} bytes after its end' if unused else ''})"
            )

    def graph_bytes(self) -> bytes | bytearray:
        """The serialized ONNX ModelProto (payloads of stored tensors removed), checked,
        then inflated into a buffer of its declared length."""
        graph = self.index.graph
        with self.allocating("graph"):
            data = self._checked(graph, "graph")
            if graph.codec == C.CODEC_NONE:
                return bytes(data)
            out = bytearray(graph.decoded_length)
            self._inflate_into(data, graph, "graph", memoryview(out))
            return out

    def identity(self) -> bytes:
        """A digest naming this file's content: SHA-256 of its index bytes (codebooks, tables,
        dims: everything outside the blobs) and of its payload digest (the blobs)."""
        return hashlib.sha256(bytes(self._view[: self.index.payload_offset]) + self.index.payload_digest).digest()

    def verify_payload_digest(self) -> None:
        """The whole-payload digest, a window at a time (each window's mapped pages let go)."""
        start = self.index.payload_offset
        hasher = hashlib.new(C.CHECKSUMS[self.index.payload_digest_algorithm][0])
        for begin in range(start, self.index.file_size, RAW_COPY_WINDOW):
            end = min(self.index.file_size, begin + RAW_COPY_WINDOW)
            hasher.update(self._view[begin:end])
            self._release_pages(begin, end - begin)
        if hasher.digest() != self.index.payload_digest:
            raise ChecksumError(f"{self.filename}: whole-payload digest mismatch")

    def start_payload_check(self) -> Callable[[], None]:
        """Check the whole-payload digest: now with one decoding thread, else on a thread of
        its own (hashlib releases the GIL) while the caller decodes. Returns what the caller
        calls before handing out any result, to wait for the check and raise its error."""
        if self.decode_workers < 2:
            self.verify_payload_digest()
            return lambda: None
        pool = ThreadPoolExecutor(1)
        check = pool.submit(self.verify_payload_digest)
        pool.shutdown(wait=False)
        return check.result

    def blob_problems(self) -> list[str]:
        """Every tensor and pack blob whose stored bytes do not match their checksum, by name
        (the graph's is checked when it is read)."""
        problems = []
        for subject, blob in self.index.blobs()[1:]:
            try:
                self._check_windows(blob, subject)
            except ChecksumError as exc:
                problems.append(str(exc))
        return problems

    # decoding --------------------------------------------------------------
    def _lookup(self, table: int) -> LookupTable | None:
        """The decode table of a validated Huffman table (None: the one-symbol table)."""
        if table not in self._lookups:
            lengths = self.index.tables[table]
            self._lookups[table] = LookupTable(lengths) if np.count_nonzero(lengths) > 1 else None
        return self._lookups[table]

    def _by_symbol(self, codebook: int, dtype: ValueKey) -> np.ndarray:
        """Each symbol's decoded value in the storage dtype (dtype None: the symbol itself;
        a (dtype, scale, offset) triple: the final value of a one-member pack, by
        :func:`scale_member`, so that decoding to it gives the same bits as offsetting and
        scaling afterwards)."""
        if dtype is None:
            return np.arange(self.index.codebook_size(codebook), dtype=np.uint32)
        if isinstance(dtype, Levels):
            grid = self.index.grids[codebook] if self.index.grids else None
            levels = (np.arange(grid[1], dtype=np.int64) + grid[0] if grid is not None
                      else self.index.codebooks[codebook].astype(np.int64))  # integers: see integer_codebook
            return (levels + dtype.shift).astype(np.dtype(dtype.dtype))
        if isinstance(dtype, tuple):
            element, scale, offset = dtype
            return scale_member(self.index.codebook_values(codebook), scale, element, offset)
        return dtypes.cast_from_float32(self.index.codebook_values(codebook), dtype)

    def _values(self, codebook: int, dtype: ValueKey) -> np.ndarray:
        """:meth:`_by_symbol`, computed once per (codebook, dtype)."""
        key = (codebook, dtype)
        if key not in self._symbol_values:
            self._charge_unplanned(self._planned_values, codebook, 8 * self.index.codebook_size(codebook),
                                   f"per-symbol values of codebook {codebook}")
            self._symbol_values[key] = self._by_symbol(codebook, dtype)
        return self._symbol_values[key]

    def _entries(self, table: int, codebook: int, dtype: ValueKey) -> tuple:
        key = (table, codebook, dtype)
        if key not in self._value_tables:
            self._charge_unplanned(self._planned_entries, table, self._entries_bytes(table),
                                   f"the lookup table of Huffman table {table}")
            self._value_tables[key] = self._lookup(table).entries(self._values(codebook, dtype))
        return self._value_tables[key]

    def _group_lanes(self, streams: list[Stream], max_length: int | list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """The chunks of ``streams`` as lanes: absolute start byte, declared bits, element
        count, and each stream's (first lane, lanes). Checked, for the whole group at
        once: bits possible for codes of 1..max_length bits (per stream, when a list),
        padding bits zero."""
        bits_parts, counts_parts, offsets, rows = [], [], [], []
        row = 0
        for stream in streams:
            n, per, n_chunks = stream.n_elements, stream.chunk_elements, len(stream.chunk_bits)
            counts = np.full(n_chunks, per, dtype=np.int64)
            counts[-1] = n - per * (n_chunks - 1)
            bits_parts.append(np.asarray(stream.chunk_bits, dtype=np.int64))  # < 8 x file size: checked in the index
            counts_parts.append(counts)
            offsets.append(self.index.payload_offset + stream.data.offset)
            rows.append((row, n_chunks))
            row += n_chunks
        bits = np.concatenate(bits_parts)
        counts = np.concatenate(counts_parts)
        nbytes = (bits + 7) >> 3
        starts = np.cumsum(nbytes) - nbytes  # running position ...
        first_lanes = np.array([r for r, _ in rows], dtype=np.int64)
        lanes_per_stream = np.array([k for _, k in rows], dtype=np.int64)
        starts += np.repeat(np.asarray(offsets, dtype=np.int64) - starts[first_lanes], lanes_per_stream)  # ... per stream

        def fail(lane: int, message: str) -> None:
            t = int(np.searchsorted(first_lanes, lane, side="right")) - 1
            raise HuffmanError(f"{self.filename}: {streams[t].subject}: chunk {lane - rows[t][0]}: {message}")

        longest = np.repeat(np.broadcast_to(np.asarray(max_length, dtype=np.int64), (len(streams),)), lanes_per_stream)
        bad = np.flatnonzero((bits < counts) | (bits > counts * longest))
        if bad.size:
            lane = int(bad[0])
            fail(lane, f"chunk_bits {int(bits[lane])} is impossible for {int(counts[lane])} codes of 1..{int(longest[lane])} bits")
        tail = bits & 7
        ragged = np.flatnonzero(tail)
        if ragged.size:
            last = np.frombuffer(self._buffer, dtype=np.uint8)[starts[ragged] + nbytes[ragged] - 1]
            dirty = np.flatnonzero(last & (np.uint8(0xFF) >> tail[ragged].astype(np.uint8)))
            if dirty.size:
                lane = int(ragged[dirty[0]])
                fail(lane, f"padding bits after bit {int(bits[lane])} are not zero")
        return starts, bits, counts, rows

    def _decode_group(self, streams: list[Stream], value_keys: list[ValueKey]) -> list[np.ndarray]:
        """Decode Huffman streams sharing a chunk size and a value dtype of at most 4 bytes
        (each with its own table, codebook and values), or sharing table, codebook and
        value key, all lanes at once.

        Returns one flat array per stream (views into one buffer) of the storage
        dtype, or of uint32 symbols when its value key is None.
        """
        first, dtype = streams[0], value_keys[0]
        by_symbol = self._values(first.codebook, dtype)
        lookup = self._lookup(first.table)
        if lookup is None:  # one used symbol, code "0" of one bit: the stream is count zero bits
            # (such streams are grouped only with streams of the same table and values)
            symbol_value = by_symbol[int(np.flatnonzero(self.index.tables[first.table])[0])]
            stored = [self._checked(stream.data, stream.subject) for stream in streams]
            self._group_lanes(streams, 1)  # 1-bit codes: bits == count for every chunk
            results = []
            for stream, data in zip(streams, stored):
                if np.frombuffer(data, dtype=np.uint8).any():
                    raise HuffmanError(f"{self.filename}: {stream.subject}: a one-symbol stream must be all zero bits")
                filled = _aligned_empty((stream.n_elements,), by_symbol.dtype)
                filled[...] = symbol_value
                results.append(filled)
            return results
        checks = self._start_checks(streams)
        try:
            results = self._decode_lanes_group(streams, value_keys)
        except BaseException:
            for check in checks:  # corrupt stored bytes are the cause to report, not what decoding them did
                failure = check.exception()
                if isinstance(failure, ChecksumError):
                    raise failure from None
            raise
        for check in checks:
            check.result()
        return results

    def _decode_lanes_group(self, streams: list[Stream], value_keys: list[ValueKey]) -> list[np.ndarray]:
        keys = [(s.table, s.codebook, v) for s, v in zip(streams, value_keys)]
        lookups = [self._lookup(table) for table, _, _ in keys]
        by_symbol = self._values(keys[0][1], keys[0][2])  # the group's dtype (shared by all its streams)
        lane_starts, lane_bits, lane_counts, rows = self._group_lanes(streams, [lk.max_length for lk in lookups])
        row = lane_bits.size
        # Rows as long as the longest chunk (not chunk_elements: one-element tensors
        # declaring 2**24-element chunks must not allocate 2**24 slots each). When every
        # stream is one chunk, rows are rounded up to whole 64-byte lines so that every
        # stream starts 64-byte aligned (else a stream of several chunks needs rows of
        # exactly chunk_elements to be contiguous, and a misaligned one is copied).
        steps = int(lane_counts.max())
        if len(streams) > 1 and all(n_chunks == 1 for _, n_chunks in rows):
            line = 64 // math.gcd(64, by_symbol.dtype.itemsize)
            steps = -(-steps // line) * line
        out = _aligned_empty((row, steps), by_symbol.dtype)
        if row < MIN_LANES:
            for stream, stream_rows, (table, codebook, value_key) in zip(streams, rows, keys):
                self._decode_few([stream], [stream_rows], lane_starts, lane_bits, lane_counts, table,
                                 self._values(codebook, value_key), out)
            return [_aligned(out[r : r + n_chunks].reshape(-1)[: s.n_elements]) for s, (r, n_chunks) in zip(streams, rows)]
        data, base = self._lane_bytes(streams)
        lane_starts -= base
        distinct = list(dict.fromkeys(keys))
        lane_tables = None
        if len(distinct) == 1:
            lookup, entries = lookups[0], self._entries(*distinct[0])
        else:  # lanes of every table in one lock step
            lookup = MixedTables([self._lookup(table) for table, _, _ in distinct], [self._entries(*k)[0] for k in distinct])
            entries = (lookup.entries, None)
            number = {k: i for i, k in enumerate(distinct)}
            lane_ids = np.repeat(np.array([number[k] for k in keys], dtype=np.int64), [n for _, n in rows])
            lane_tables = lookup.lane_arrays(lane_ids)
        # Lanes per call: as many as the window and DECODER_SCRATCH_BYTES (the decoder's
        # stream words, for all threads together) allow, since NumPy's per-call overhead
        # shrinks with every lane added. Split between threads only when each gets
        # MIN_LANES_PER_WORKER lanes: the threads take turns at the GIL around every
        # NumPy call, which costs more than the calls of a few thousand lanes do.
        rows_per_lane = int(((lane_starts & 7) * 8 + lane_bits).max()) // 64 + 2
        in_memory = max(1, min(self.batch_elements // steps, DECODER_SCRATCH_BYTES // (8 * rows_per_lane)))
        threads = max(1, min(self.decode_workers, row // MIN_LANES_PER_WORKER))
        per_call = max(1, min(in_memory // threads, -(-row // threads)))
        per_call = -(-row // -(-row // per_call))  # equal spans
        spans = [(a, min(row, a + per_call)) for a in range(0, row, per_call)]

        def run(span: tuple[int, int], helper: ThreadPoolExecutor | None = None) -> np.ndarray:
            a, b = span
            span_tables = None if lane_tables is None else (lane_tables[0][a:b], lane_tables[1][a:b])
            return decode_lanes(data, lane_starts[a:b], lane_bits[a:b], lane_counts[a:b], lookup, by_symbol, out[a:b], entries,
                                helper, span_tables)

        if threads > 1 and len(spans) > 1:
            with ThreadPoolExecutor(threads) as pool:
                consumed_parts = list(pool.map(run, spans))
        elif self.decode_workers > 1 and row >= MIN_LANES_FOR_COPY_THREAD:
            # one more thread copies finished blocks into ``out`` (with fewer lanes the copies are
            # small, and the decoding thread would only wait for the GIL at every block)
            with ThreadPoolExecutor(1) as helper:
                consumed_parts = [run(span, helper) for span in spans]
        else:
            consumed_parts = [run(span) for span in spans]
        consumed = np.concatenate(consumed_parts)
        bad = np.flatnonzero(consumed != lane_bits)
        if bad.size:
            self._raise_lane(streams, rows, int(bad[0]), int(consumed[bad[0]]), int(lane_bits[bad[0]]))
        return [_aligned(out[r : r + n_chunks].reshape(-1)[: s.n_elements]) for s, (r, n_chunks) in zip(streams, rows)]

    def _start_checks(self, streams: list[Stream]) -> list[Future]:
        """Check the streams' stored bytes against their checksums. With one decoding
        thread, or little to hash, at once (and return nothing to wait for). Otherwise
        on ``decode_workers - 1`` threads (hashlib releases the GIL) while the calling
        thread decodes; the caller waits for them before handing out any result and
        reports a mismatch (the first in stream order) before anything the decoder
        found: the lane decoder is safe on any bytes (bounded loops, clipped gathers)."""
        if self.decode_workers < 2 or sum(s.data.length for s in streams) < CONCURRENT_CHECK_BYTES:
            for stream in streams:
                self._checked(stream.data, stream.subject)
            return []
        pool = ThreadPoolExecutor(self.decode_workers - 1)
        checks = [pool.submit(self._checked, stream.data, stream.subject) for stream in streams]
        pool.shutdown(wait=False)
        return checks

    def _decode_few(self, streams, rows, starts, bits, counts, table: int, by_symbol: np.ndarray, out: np.ndarray) -> None:
        """Few, long chunks (files written with big chunks): bitarray's decoder, chunk by
        chunk, beats lock-step lanes there. Same exactness: count codes in exactly the
        declared bits."""
        if table not in self._bitarray_decoders:
            self._bitarray_decoders[table] = CanonicalDecoder(self.index.tables[table])
        decoder = self._bitarray_decoders[table]
        for stream, (r, n_chunks) in zip(streams, rows):
            for c in range(n_chunks):
                lane = r + c
                start, length = int(starts[lane]), (int(bits[lane]) + 7) // 8
                try:
                    symbols = decoder.decode(self._view[start : start + length], int(bits[lane]), int(counts[lane]), "stream")
                except HuffmanError as exc:
                    raise HuffmanError(
                        f"{self.filename}: {stream.subject}: chunk {c}: {int(counts[lane])} codes do not take exactly "
                        f"chunk_bits {int(bits[lane])} ({str(exc).removeprefix('stream: ')})"
                    ) from None
                out[lane, : symbols.size] = by_symbol[symbols]

    def _lane_bytes(self, streams: list[Stream]) -> tuple[np.ndarray, int]:
        """The stream bytes of ``streams`` with WINDOW_SLACK bytes after them, and the
        file offset of element 0. A view of the mapping when the file has the slack."""
        begin = self.index.payload_offset + min(s.data.offset for s in streams)
        end = self.index.payload_offset + max(s.data.offset + s.data.length for s in streams)
        if end + WINDOW_SLACK <= self.index.file_size:
            return np.frombuffer(self._buffer, dtype=np.uint8, count=end + WINDOW_SLACK - begin, offset=begin), begin
        data = np.zeros(end - begin + WINDOW_SLACK, dtype=np.uint8)
        data[: end - begin] = np.frombuffer(self._buffer, dtype=np.uint8, count=end - begin, offset=begin)
        return data, begin

    def _raise_lane(self, streams: list[Stream], rows: list[tuple[int, int]], lane: int, consumed: int, declared: int) -> None:
        for stream, (r, n_chunks) in zip(streams, rows):
            if r <= lane < r + n_chunks:
                c = lane - r
                count = min(stream.chunk_elements, stream.n_elements - c * stream.chunk_elements)
                raise HuffmanError(
                    f"{self.filename}: {stream.subject}: chunk {c}: {count} codes do not take exactly "
                    f"chunk_bits {declared} (they take {consumed}: the stream is truncated, cut mid-code or has bits left over)"
                )
        raise AssertionError("lane outside every stream")

    def _decode_huffman(self, streams: list[Stream], dtype_of: Callable[[Stream], ValueKey]) -> list[np.ndarray]:
        """:meth:`_decode_streams`, with a failed allocation reported as a LimitError."""
        if not streams:
            return []
        subject = streams[0].subject if len(streams) == 1 else f"{streams[0].subject} and {len(streams) - 1} more streams"
        with self.allocating(subject):
            return self._decode_streams(streams, dtype_of)

    def _decode_streams(self, streams: list[Stream], dtype_of: Callable[[Stream], ValueKey]) -> list[np.ndarray]:
        """Decode Huffman streams (flat arrays, in the order given), grouped so each
        group shares one lane decode: streams of any tables whose values have the same
        dtype of at most 4 bytes decode together (a default-mode file has a table per
        pack, and decoding packs one by one pays NumPy's per-call cost once per pack and
        step: several times the load time of the plain .onnx). Streams
        of the one-symbol table, or of wider values, group by table, codebook and
        values. Streams whose longest chunks differ by more than
        2x decode in different groups: every lane steps as often as the group's longest
        chunk is long, and the output buffer has rows that long, so a file mixing
        one-element tensors with 2**24-element chunks must not give each of them a row
        of 2**24 elements (the buffer stays within 2x the decoded size)."""
        groups: dict[tuple, list[int]] = {}
        results: list[np.ndarray | None] = [None] * len(streams)
        value_keys: list[ValueKey] = [None] * len(streams)
        for i, stream in enumerate(streams):
            value_keys[i] = dtype = dtype_of(stream)
            if stream.n_elements == 0:
                element = dtype[0] if isinstance(dtype, tuple) else dtype
                results[i] = np.zeros(0, dtype=(np.dtype(dtype.dtype) if isinstance(dtype, Levels) else np.uint32 if element is None
                                                else dtypes.STORAGE_DTYPES[element]))
                continue
            longest_chunk = min(stream.n_elements, stream.chunk_elements)
            shape = (stream.chunk_elements, longest_chunk.bit_length())
            value_dtype = self._values(stream.codebook, dtype).dtype
            if self._lookup(stream.table) is None or value_dtype.itemsize > 4:
                key = ("own", stream.table, stream.codebook, dtype, *shape)
            else:
                key = ("shared", value_dtype.str, *shape)
            groups.setdefault(key, []).append(i)
        for positions in groups.values():
            decoded = self._decode_group([streams[i] for i in positions], [value_keys[i] for i in positions])
            for i, array in zip(positions, decoded):
                results[i] = array
        return results

    def decode_indices(self, stream: Stream) -> np.ndarray:
        """The codebook indices of a Huffman tensor or of a pack (uint32, flat; a pack's
        members concatenated). Every index is below the codebook size by construction:
        the code-length table has one entry per codebook entry."""
        return self._decode_huffman([stream], dtype_of=lambda s: None)[0]

    def decode_tensor(self, tensor: TensorInfo) -> np.ndarray:
        """The tensor's values in their storage dtype (bf16 as uint16 bits), shaped. A raw
        tensor's array is allocated only once its stored bytes' checksum has passed, then
        filled straight from the mapping (window by window) or by inflating into it."""
        storage = dtypes.STORAGE_DTYPES[tensor.dtype]
        if tensor.encoding == C.ENCODING_RAW:
            with self.allocating(tensor.subject):
                blob = tensor.data
                if blob.codec == C.CODEC_NONE:
                    self._check_windows(blob, tensor.subject)
                    out = _aligned_empty((tensor.n_elements,), storage)
                    self._copy_windows(blob, out.view(np.uint8).reshape(-1))
                else:
                    data = self._checked(blob, tensor.subject)
                    out = _aligned_empty((tensor.n_elements,), storage)
                    self._inflate_into(data, blob, tensor.subject, memoryview(out.view(np.uint8).reshape(-1)))
                return out.reshape(tensor.dims)
        return self._decode_huffman([tensor], dtype_of=lambda t: t.dtype)[0].reshape(tensor.dims)

    @contextlib.contextmanager
    def allocating(self, subject: str) -> Iterator[None]:
        """Turn a failed allocation while decoding ``subject`` into a LimitError: the file's
        plan was within the budget, but this process could not get the memory (the budget
        is larger than what the machine has free)."""
        try:
            yield
        except MemoryError:
            raise self.out_of_memory(subject) from None
        except OSError as exc:
            if exc.errno != errno.ENOMEM:
                raise
            raise self.out_of_memory(subject) from None

    def out_of_memory(self, subject: str) -> LimitError:
        """The error for a failed allocation while decoding ``subject``."""
        return LimitError(
            f"{self.filename}: {subject}: out of memory while decoding; the file's plan ({self.budget.used} bytes) is within "
            f"the memory budget of {self.budget.limit} bytes, which is more than this process can allocate "
            f"(set a lower ReaderLimits.memory_budget or moub --memory-budget)"
        )

    def iter_tensors(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        """Decode one tensor at a time, in file order (streaming). Pack members come
        from :meth:`iter_pack_members`.

        Huffman tensors are decoded in windows of about ``batch_elements``
        elements (lanes of several tensors at once); memory holds one window.
        """
        tensors = list(self.index.tensors)
        i = 0
        while i < len(tensors):
            window, elements = [], 0
            while i < len(tensors) and (not window or elements < self.batch_elements):
                window.append(tensors[i])
                if tensors[i].encoding == C.ENCODING_HUFFMAN:
                    elements += tensors[i].n_elements
                i += 1
            huffman = [t for t in window if t.encoding == C.ENCODING_HUFFMAN]
            decoded = dict(zip((id(t) for t in huffman), self._decode_huffman(huffman, dtype_of=lambda t: t.dtype)))
            for tensor in window:
                if tensor.encoding == C.ENCODING_HUFFMAN:
                    yield tensor, decoded.pop(id(tensor)).reshape(tensor.dims)
                else:
                    yield tensor, self.decode_tensor(tensor)

    def decode_pack(self, pack: PackInfo) -> np.ndarray:
        """A pack's float32 codebook values, members concatenated (flat), before each
        member's offset and scale (:func:`scale_member` applies them)."""
        return self._decode_huffman([pack], dtype_of=lambda p: dtypes.FLOAT)[0]

    def iter_pack_members(
        self, dtype_of: Mapping[int, int] | Callable[[int], int] | None = None
    ) -> Iterator[tuple[PackMember, np.ndarray]]:
        """Decode pack members one at a time, packs in file order (streaming).

        ``dtype_of`` maps a member's site ordinal to its ONNX element type (the graph's;
        the index does not record it); None: float32 for all. Whether a member overflows its
        element type is checked with the graph, by :func:`.index.check_member_ranges` (the
        runtime's validation runs it before decoding); this method casts as told. Each member is yielded
        flat, in its storage dtype, as its own 64-byte-aligned array:
        ``cast_from_float32(float32(codebook[idx] + offset) * float32(scale), dtype)``
        (the sum is an exact integer: offsets exist only over grid codebooks).

        Packs are decoded whole, in windows of about ``batch_elements`` elements (a
        pack bigger than that is a window of its own), then split: memory holds the
        window's float32 values (4 bytes per element of its packs) until its last
        member is yielded, plus the member being yielded and the lane decoder's
        working memory. A one-member pack decodes straight to its final values
        (offset and scale folded into the per-symbol table: the same bits, no second pass).
        """
        dtype_at = _site_dtypes(dtype_of)

        for window in self._pack_windows():
            keys = [
                (dtype_at(p.sites[0]), p.scales[0], p.member_offsets[0]) if len(p.sites) == 1 else dtypes.FLOAT
                for p in window
            ]
            key_of = {id(p): key for p, key in zip(window, keys)}
            decoded = self._decode_huffman(window, dtype_of=lambda p: key_of[id(p)])
            for pack, key in zip(window, keys):
                values = decoded.pop(0)
                if isinstance(key, tuple):
                    (member,) = pack.members
                    yield member, values
                else:
                    for member in pack.members:
                        with self.allocating(member.subject):
                            scaled = scale_member(
                                values[member.start : member.start + member.count], member.scale, dtype_at(member.site), member.offset
                            )
                        yield member, scaled
                        del scaled
                del values


    def iter_pack_levels(
        self, level_of: Callable[[PackMember], tuple[str, int] | None], dtype_of: Mapping[int, int] | Callable[[int], int] | None = None
    ) -> Iterator[tuple[PackMember, np.ndarray, int | None]]:
        """:meth:`iter_pack_members`, but a member for which ``level_of`` gives (integer dtype
        string, zero point ``zp``) comes as its integer levels plus ``zp`` in that dtype (its
        values are ``float32(q - zp) * float32(scale)``), never as floats: (member, q, zp).
        Every other member comes as its values, with zp None. ``level_of`` is asked only
        about members of packs over an integer codebook (:meth:`integer_codebook`), and must give a dtype that holds
        ``level + zp`` for every level the pack's code table can produce
        (:meth:`level_range`).

        A one-member pack decodes straight to ``q`` (levels and zero point folded into the
        per-symbol table); a pack of several decodes once to the grid's integers in the
        narrowest of int16 and int32 that holds them, then each member is shifted and
        narrowed, or scaled to its values."""
        dtype_at = _site_dtypes(dtype_of)

        def key_of(pack: PackInfo, plans: list) -> ValueKey:
            if not any(plans):
                return (dtype_at(pack.sites[0]), pack.scales[0], pack.member_offsets[0]) if len(pack.sites) == 1 else dtypes.FLOAT
            if len(pack.sites) == 1:
                return Levels(plans[0][0], pack.member_offsets[0] + plans[0][1])
            low, high = self.level_range(pack)
            fits = -(1 << 15) <= low and high < (1 << 15)
            return Levels("<i2" if fits else "<i4", 0)

        for window in self._pack_windows():
            plans = {}
            for pack in window:
                integers = self.integer_codebook(pack.codebook)
                plans[id(pack)] = [level_of(member) if integers else None for member in pack.members]
            keys = {id(pack): key_of(pack, plans[id(pack)]) for pack in window}
            decoded = self._decode_huffman(window, dtype_of=lambda p: keys[id(p)])
            for pack in window:
                values, key, member_plans = decoded.pop(0), keys[id(pack)], plans[id(pack)]
                if len(pack.sites) == 1:  # decoded straight to its final values or levels
                    yield pack.members[0], values, member_plans[0][1] if member_plans[0] else None
                    del values
                    continue
                for member, plan in zip(pack.members, member_plans):
                    part = values[member.start : member.start + member.count]
                    with self.allocating(member.subject):
                        if plan is not None:
                            q = _aligned_empty((member.count,), np.dtype(plan[0]))
                            np.add(part, np.int64(member.offset + plan[1]), out=q, dtype=np.int64, casting="unsafe")
                            out, zero_point = q, plan[1]
                        else:
                            grid_values = part.astype(np.float32) if isinstance(key, Levels) else part  # integers below 2^24: exact
                            out = scale_member(grid_values, member.scale, dtype_at(member.site), member.offset)
                            zero_point = None
                    yield member, out, zero_point
                    del out
                del values

    def _pack_windows(self) -> Iterator[list[PackInfo]]:
        """The packs in index order, in windows of about ``batch_elements`` elements decoded together."""
        packs = list(self.index.packs)
        i = 0
        while i < len(packs):
            window, elements = [], 0
            while i < len(packs) and (not window or elements < self.batch_elements):
                window.append(packs[i])
                elements += packs[i].n_elements
                i += 1
            yield window

    def integer_codebook(self, codebook: int) -> bool:
        """Whether every value of a codebook is an integer: a grid, or an explicit codebook of
        integer levels (what writers store for a pack that uses few levels of a wide range)."""
        if self.index.grids and self.index.grids[codebook] is not None:
            return True
        values = self.index.codebooks[codebook]
        return bool(values.size) and bool(np.all(np.isfinite(values))) and bool(np.all(values == np.rint(values))) \
            and float(np.abs(values).max()) < C.GRID_LIMIT

    def level_range(self, pack: PackInfo) -> tuple[int, int]:
        """The least and greatest codebook integer a pack over an integer codebook can decode
        to, over the symbols its code table uses (a member's levels add its offset)."""
        used = np.flatnonzero(self.index.tables[pack.table])
        grid = self.index.grids[pack.codebook] if self.index.grids else None
        if grid is not None:
            return grid[0] + int(used[0]), grid[0] + int(used[-1])
        values = self.index.codebooks[pack.codebook][used]
        return int(values.min()), int(values.max())


def _add_offset(values: np.ndarray, offset: int, out: np.ndarray | None = None) -> np.ndarray:
    """float32(values + offset) for float32 integers ``values`` whose sums with ``offset``
    stay below 2^24 in magnitude: exact. An offset of magnitude at most 2^24 is itself
    exact in float32, so one float32 add gives the exact sum; a larger one (possible
    only when grid and levels sit near opposite ends of the range) adds in float64."""
    if abs(offset) <= C.GRID_LIMIT:
        return np.add(values, np.float32(offset), out=out, dtype=np.float32)
    exact = (values.astype(np.float64) + float(offset)).astype(np.float32)
    if out is None:
        return exact
    out[...] = exact
    return out


def _site_dtypes(dtype_of: Mapping[int, int] | Callable[[int], int] | None) -> Callable[[int], int]:
    """Site ordinal -> the ONNX dtype its values are restored to (float32 where ``dtype_of`` does not say)."""
    lookup = dtype_of.get if isinstance(dtype_of, Mapping) else dtype_of

    def dtype_at(site: int) -> int:
        dtype = lookup(site) if lookup is not None else None
        return dtypes.FLOAT if dtype is None else dtype

    return dtype_at


def scale_member(values: np.ndarray, scale: float, dtype: int, offset: int = 0) -> np.ndarray:
    """``cast_from_float32(float32(values + offset) * float32(scale), dtype)`` into a fresh
    64-byte-aligned array: a pack member's values (FORMAT.md §4.3).

    ``values`` are float32 codebook values; with a non-zero ``offset`` they are grid
    values (integers) and every ``value + offset`` is an integer of magnitude below 2^24
    (the reader checks), so the sum is exact. Then one IEEE float32 multiply per element
    (no fused operation, no wider intermediate), so every platform gives the same bits;
    the converter computes its quantized weights with this same function (levels as
    ``values`` and offset 0 give the same bits as grid values and their offset).
    """
    storage = dtypes.STORAGE_DTYPES[dtype]
    out = _aligned_empty((values.size,), storage)
    offset = int(offset)
    if dtype == dtypes.FLOAT:
        levels = _add_offset(values, offset, out=out) if offset else values
        np.multiply(levels, np.float32(scale), out=out, dtype=np.float32)
    else:
        levels = _add_offset(values, offset) if offset else values
        out[...] = dtypes.cast_from_float32(np.multiply(levels, np.float32(scale), dtype=np.float32), dtype)
    return out


def source_name(source: Source) -> str:
    """How messages name a file: its path, a file object's ``name``, or what it is."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else "<file object>"


def open_moub(path: Source, limits: C.ReaderLimits = C.DEFAULT_LIMITS) -> MoubFile:
    """Open and validate a .moub file; raises a MoubFormatError subclass if it is not valid."""
    return MoubFile(path, limits)
