"""Sample arrays that stay in their file: a DATA.npz member read a few samples at a time.

The converter runs every candidate on every sample, so it reads the data many times. Holding it
in memory makes the converter's memory grow with the data, and every worker process held a copy
of its own. A :class:`StoredArray` names where an array lives (a file, the offset of its values,
their type and shape) and which of its samples it holds in which order; reading a batch copies
those samples out of the file, so a batch is resident at a time and the operating system's page
cache serves the repeated reads. It pickles as those few numbers: a worker reads the same file.

An .npz member numpy stored uncompressed (``numpy.savez``) is read in place. A compressed member
(``numpy.savez_compressed``) is inflated once into a temporary file that lives as long as the
:class:`TemporaryFolder` holding it, which the dataset keeps. The original model's outputs on the
samples, which every candidate is scored against, are written the same way as they are produced
(:class:`RowWriter`) and read back a batch at a time.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import weakref
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import OutputError

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length
_LOCAL_SIGNATURE = b"PK\x03\x04"
_ENCRYPTED = 0x1
CHUNK_BYTES = 64 << 20  # values read per pass where a whole array is scanned (casting checks)


class TemporaryFolder:
    """A private temporary folder for arrays written by the converter (the inflated members of one
    archive, the original's outputs), removed with the last array that reads from it (or when the
    process ends)."""

    def __init__(self, prefix: str = "moub-data-") -> None:
        self.prefix = prefix
        self.path: Path | None = None  # made at the first file
        self.count = 0

    def new_file(self) -> Path:
        """The path of a file not used before in this folder (made on first use)."""
        if self.path is None:
            self.path = Path(tempfile.mkdtemp(prefix=self.prefix))
            weakref.finalize(self, shutil.rmtree, self.path, True)
        target = self.path / f"{self.count:04d}.npy"
        self.count += 1
        return target

    def inflate(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Path:
        target = self.new_file()
        with archive.open(info) as member, open(target, "wb") as out:
            shutil.copyfileobj(member, out, CHUNK_BYTES)
        return target


@dataclass(frozen=True)
class StoredArray:
    """An array in a file (C or Fortran order from ``offset``), seen through ``rows``: which
    stored samples along ``axis``, in order (None: all of them, as stored). ``cast``: the
    element type reads return (None: as stored)."""

    path: str
    offset: int
    stored_dtype: np.dtype
    stored_shape: tuple[int, ...]
    fortran: bool = False
    axis: int = 0
    rows: np.ndarray | None = field(default=None, compare=False)
    cast: np.dtype | None = None
    keep: TemporaryFolder | None = field(default=None, compare=False, repr=False)  # the folder of a written copy

    def __reduce__(self):
        """Where the values are, not the values (nor the folder: the process that made it keeps it)."""
        return (StoredArray, (self.path, self.offset, self.stored_dtype, self.stored_shape, self.fortran, self.axis,
                              self.rows, self.cast))

    @property
    def dtype(self) -> np.dtype:
        return self.cast if self.cast is not None else self.stored_dtype

    @property
    def shape(self) -> tuple[int, ...]:
        if self.rows is None:
            return self.stored_shape
        shape = list(self.stored_shape)
        shape[self.axis] = int(self.rows.size)
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.stored_shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def along(self, axis: int) -> StoredArray:
        """The same array with its samples counted along ``axis``."""
        return self if axis == self.axis else replace(self, axis=axis, rows=None)

    def astype(self, dtype: np.dtype) -> StoredArray:
        return replace(self, cast=None if np.dtype(dtype) == self.stored_dtype else np.dtype(dtype))

    def select(self, picked: np.ndarray) -> StoredArray:
        """The samples ``picked`` (positions in this array's order), still in the file."""
        picked = np.asarray(picked, np.int64)
        return replace(self, rows=picked if self.rows is None else self.rows[picked])

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Samples ``start:stop`` in memory (a C-contiguous array of ``dtype``)."""
        count = self.shape[self.axis]
        stop = count if stop is None else min(stop, count)
        wanted = np.arange(start, max(start, stop)) if self.rows is None else self.rows[start:stop]
        if self.axis == 0 and not self.fortran:
            values = self._read_rows(wanted)
        else:
            values = self._gather(wanted)
        return values if self.cast is None else values.astype(self.cast)

    def chunks(self) -> Iterator[np.ndarray]:
        """The whole array a few samples at a time (for checks that scan every value)."""
        per_sample = max(1, self.nbytes // max(1, self.shape[self.axis]))
        step = max(1, CHUNK_BYTES // per_sample)
        for start in range(0, self.shape[self.axis], step):
            yield self.read(start, start + step)

    def __getitem__(self, key):
        """Samples ``start:stop`` read into memory (any other index reads the whole array first)."""
        if isinstance(key, slice) and key.step in (None, 1) and self.axis == 0:
            start, stop, _ = key.indices(self.shape[0])
            return self.read(start, stop)
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = self.read()
        return values if dtype is None else values.astype(dtype)

    def _read_rows(self, wanted: np.ndarray) -> np.ndarray:
        """Rows of a C-order array, each one contiguous in the file: read straight into place."""
        out = np.empty((int(wanted.size),) + self.stored_shape[1:], self.stored_dtype)
        row_bytes = out.itemsize * int(np.prod(self.stored_shape[1:], dtype=np.int64))
        flat = out.reshape(-1).view(np.uint8) if out.size else out.view(np.uint8)
        with open(self.path, "rb", buffering=0) as handle:
            fd = handle.fileno()
            for i, row in enumerate(wanted.tolist()):
                view = memoryview(flat)[i * row_bytes:(i + 1) * row_bytes]
                got = os.preadv(fd, [view], self.offset + row * row_bytes)
                if got != row_bytes:
                    raise OSError(f"{self.path}: the file ended inside sample {row} (it changed while being read?)")
        return out

    def _gather(self, wanted: np.ndarray) -> np.ndarray:
        """Samples along another axis (or of a Fortran-order array): mapped only while copied."""
        mapped = np.memmap(self.path, dtype=self.stored_dtype, mode="r", offset=self.offset, shape=self.stored_shape,
                           order="F" if self.fortran else "C")
        return np.ascontiguousarray(np.take(mapped, wanted, axis=self.axis))  # the map closes with ``mapped``


class RowWriter:
    """Rows appended to a file of ``folder`` as they come, read back as one :class:`StoredArray`
    (rows-first, C order): an array that is never whole in memory."""

    def __init__(self, folder: TemporaryFolder) -> None:
        self.folder = folder
        try:
            self.path = folder.new_file()
            self.handle = open(self.path, "wb")
        except OSError as exc:
            raise _unwritable(exc) from None
        self.dtype: np.dtype | None = None
        self.row_shape: tuple[int, ...] = ()
        self.rows = 0

    def append(self, rows: np.ndarray) -> None:
        """Add ``rows`` (at least one axis; the same type and row shape every time)."""
        if self.dtype is None:
            self.dtype, self.row_shape = rows.dtype, rows.shape[1:]
        elif rows.dtype != self.dtype or rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows of {rows.dtype} {list(rows.shape[1:])} after rows of {self.dtype} "
                             f"{list(self.row_shape)}: the output changes its shape between batches")
        try:
            self.handle.write(np.ascontiguousarray(rows).data)
        except OSError as exc:
            raise _unwritable(exc) from None
        self.rows += rows.shape[0]

    def stored(self) -> StoredArray:
        """The rows written so far, as an array in the file (the writer is closed)."""
        self.handle.close()
        dtype = self.dtype if self.dtype is not None else np.dtype(np.float32)
        return StoredArray(str(self.path), 0, dtype, (self.rows,) + self.row_shape, keep=self.folder)


def _unwritable(exc: OSError) -> OutputError:
    return OutputError(f"cannot write a temporary file in {tempfile.gettempdir()} ({exc.strerror or exc}); "
                       "set TMPDIR to a folder with room")


def storable(array: np.ndarray) -> bool:
    """Whether ``array``'s rows can go to a :class:`RowWriter` (a sample axis and fixed-size values)."""
    return array.ndim > 0 and not array.dtype.hasobject


def stored_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, shape: tuple[int, ...],
                  dtype: np.dtype, fortran: bool, header_bytes: int, inflated: TemporaryFolder | None) -> StoredArray | None:
    """The member ``info`` (an .npy whose header says ``shape``, ``dtype``, ``fortran`` and
    takes ``header_bytes``) as a :class:`StoredArray`, in place where it is stored uncompressed,
    else inflated into ``inflated``'s folder; None where it cannot be read from a file (an
    encrypted member, or no folder given for a compressed one)."""
    if info.flag_bits & _ENCRYPTED:
        return None
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as handle:
            handle.seek(info.header_offset)
            signature, name_length, extra_length = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
        if signature != _LOCAL_SIGNATURE:
            return None
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        return StoredArray(str(path), start + header_bytes, dtype, shape, fortran)
    if inflated is None:
        return None
    return StoredArray(str(inflated.inflate(archive, info)), header_bytes, dtype, shape, fortran, keep=inflated)


__all__ = ["CHUNK_BYTES", "RowWriter", "StoredArray", "TemporaryFolder", "storable", "stored_member"]
