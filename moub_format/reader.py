"""Read .moub files from untrusted storage.

Order of operations: size check before mmap, full index verification and
semantic validation (:mod:`.index`), zero padding between payload ranges, then
per tensor: checksum of the stored bytes, decode bounded by declared counts,
index range check, codebook lookup. Memory: one decoded tensor at a time plus
its indices; nothing is allocated from a size that was not checked first.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import constants as C
from . import dtypes
from .errors import ChecksumError, CodebookError, LayoutError, LimitError, StructureError, TruncatedFileError
from .huffman import CanonicalDecoder
from .index import BlobInfo, Index, TensorInfo, parse_index


def _digest(algorithm: int, data) -> bytes:
    name = C.CHECKSUMS[algorithm][0]
    return hashlib.new(name, data).digest()


class MoubFile:
    """An open, validated .moub file. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, limits: C.ReaderLimits = C.DEFAULT_LIMITS) -> None:
        self.path = Path(path)
        self.filename = str(path)
        self.limits = limits
        self._mmap: mmap.mmap | None = None
        with open(self.path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < C.PREAMBLE_SIZE:
                raise TruncatedFileError(
                    f"{self.filename}: {size} bytes is shorter than the {C.PREAMBLE_SIZE}-byte preamble"
                )
            if size > limits.max_file_bytes:
                raise LimitError(f"{self.filename}: file size {size} exceeds the limit {limits.max_file_bytes}")
            self._mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._view = memoryview(self._mmap)
        try:
            self.index: Index = parse_index(self._view, size, self.filename, limits)
            self._check_padding()
        except BaseException:
            self.close()
            raise
        self._decoders: dict[int, CanonicalDecoder] = {}

    # lifecycle -------------------------------------------------------------
    def close(self) -> None:
        if self._mmap is not None:
            mapping, self._mmap = self._mmap, None
            try:
                self._view.release()
                mapping.close()
            except BufferError:
                pass  # slices still referenced (e.g. by a traceback): unmapped when they go

    def __enter__(self) -> MoubFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # raw access ------------------------------------------------------------
    def _check_padding(self) -> None:
        base = self.index.payload_offset
        blobs = sorted([self.index.graph] + [t.data for t in self.index.tensors], key=lambda b: b.offset)
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

    def _unpack(self, blob: BlobInfo, subject: str) -> bytes:
        data = self._checked(blob, subject)
        if blob.codec == C.CODEC_NONE:
            return bytes(data)
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(data, blob.decoded_length + 1)
        except zlib.error as exc:
            raise StructureError(f"{self.filename}: {subject}: zlib stream is corrupt ({exc})") from None
        if len(out) != blob.decoded_length or not inflater.eof or inflater.unused_data:
            raise StructureError(
                f"{self.filename}: {subject}: zlib stream does not inflate to exactly {blob.decoded_length} bytes"
            )
        return out

    def graph_bytes(self) -> bytes:
        """The serialized ONNX ModelProto (payloads of stored tensors removed)."""
        return self._unpack(self.index.graph, "graph")

    def verify_payload_digest(self) -> None:
        start = self.index.payload_offset
        digest = _digest(self.index.payload_digest_algorithm, self._view[start:])
        if digest != self.index.payload_digest:
            raise ChecksumError(f"{self.filename}: whole-payload digest mismatch")

    # decoding --------------------------------------------------------------
    def _decoder(self, table: int) -> CanonicalDecoder:
        if table not in self._decoders:
            self._decoders[table] = CanonicalDecoder(self.index.tables[table])
        return self._decoders[table]

    def decode_indices(self, tensor: TensorInfo) -> np.ndarray:
        """The codebook indices of a Huffman tensor, checked against its codebook."""
        subject = f"tensor {tensor.path!r}"
        data = self._checked(tensor.data, subject)
        decoder = self._decoder(tensor.table)
        n = tensor.n_elements
        out = np.empty(n, dtype=np.uint32)
        byte_pos = 0
        for c, bits in enumerate(tensor.chunk_bits):
            start = c * tensor.chunk_elements
            count = min(tensor.chunk_elements, n - start)
            length = (bits + 7) // 8
            out[start : start + count] = decoder.decode(
                data[byte_pos : byte_pos + length], bits, count, f"{self.filename}: {subject} chunk {c}"
            )
            byte_pos += length
        size = self.index.codebooks[tensor.codebook].size
        if n and int(out.max()) >= size:
            raise CodebookError(f"{self.filename}: {subject}: index {int(out.max())} outside codebook of {size} entries")
        return out

    def decode_tensor(self, tensor: TensorInfo) -> np.ndarray:
        """The tensor's values in their storage dtype (bf16 as uint16 bits), shaped."""
        storage = dtypes.STORAGE_DTYPES[tensor.dtype]
        if tensor.encoding == C.ENCODING_RAW:
            raw = self._unpack(tensor.data, f"tensor {tensor.path!r}")
            return np.frombuffer(raw, dtype=storage).reshape(tensor.dims)
        indices = self.decode_indices(tensor)
        values = self.index.codebooks[tensor.codebook][indices]
        return dtypes.cast_from_float32(values, tensor.dtype).reshape(tensor.dims)

    def iter_tensors(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        """Decode one tensor at a time, in file order (streaming)."""
        for tensor in self.index.tensors:
            yield tensor, self.decode_tensor(tensor)


def open_moub(path: str | os.PathLike, limits: C.ReaderLimits = C.DEFAULT_LIMITS) -> MoubFile:
    """Open and validate a .moub file; raises a MoubFormatError subclass if it is not valid."""
    return MoubFile(path, limits)
