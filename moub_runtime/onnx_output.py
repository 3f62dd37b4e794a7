"""Writing a decoded model as ONNX: one file, or a model and its data file replaced as a pair.

A model whose protobuf would reach 2 GiB (protobuf's hard limit) is written with external
data: every tensor of at least EXTERNAL_MIN_BYTES goes to a data file beside ``OUT`` at a
page-aligned offset (onnx's relative-location convention). The data file is named
``OUT.TOKEN.data``, TOKEN naming its content (a digest of the .moub it was decoded from, or of
the bytes written), so a new pair never overwrites the data file the old ``OUT`` refers to:
the data file goes into place under its new name first, then ``OUT`` is replaced (one rename),
then the data files of earlier versions of ``OUT`` are removed. A crash at any point leaves a
consistent pair: the old one, or the new one (plus an orphan that the next write removes).
Writers of one folder take turns for that last part (:func:`moub_format.atomic.folder_lock`),
so concurrent decodes to one path end with the last one's pair, complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moub_format import DEFAULT_LIMITS, ReaderLimits
from moub_format import dtypes
from moub_format.atomic import AtomicFile, folder_lock, folder_of, write_atomic

from .onnx_proto import DATA_LOCATION_EXTERNAL
from .payload import clear_payload, element_count, fill_payload
from .sites import iter_tensor_sites
from .validation import open_checked

if TYPE_CHECKING:
    import onnx

EXTERNAL_MIN_BYTES = 1024     # tensors at least this big go to the data file of a large model
EXTERNAL_ALIGNMENT = 4096     # offsets in the data file: page-aligned, so onnxruntime can map them
EXTERNAL_THRESHOLD = 2**31 - 2**26  # a model this big gets a data file (protobuf's hard limit is 2 GiB)
DATA_LAYOUT = b"moub data file 1"   # part of the token: a change of layout gives other names
TOKEN_HEX = 16


def data_file_pattern(out: Path) -> re.Pattern:
    """The names of ``out``'s data files: ``OUT.TOKEN.data``."""
    return re.compile(rf"{re.escape(out.name)}\.[0-9a-f]{{{TOKEN_HEX}}}\.data")


def _is_same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def remove_old_data_files(out: Path, keep: str | None, source: Path | None) -> None:
    """Remove the data files of earlier versions of ``out`` (all but ``keep``; never ``source``,
    the file being decoded)."""
    folder = folder_of(out)
    pattern = data_file_pattern(out)
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name != keep and pattern.fullmatch(name):
                path = folder / name
                if source is None or not _is_same_file(path, source):
                    with contextlib.suppress(OSError):
                        path.unlink()


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for site in iter_tensor_sites(model):
        yield site.tensor


def fits_inline(model: onnx.ModelProto, external_threshold: int) -> bool:
    """Whether ``model`` serializes below ``external_threshold`` bytes (a protobuf near or
    past 2 GiB cannot even be measured: its ByteSize raises, which means no)."""
    try:
        return model.ByteSize() < external_threshold
    except Exception:  # google.protobuf.message.EncodeError: "Failed to serialize proto"
        return False


class _DataFile:
    """The data file of a large model: tensors go in one after the other at page-aligned
    offsets, under a temporary name, and become external-data references; :meth:`commit`
    names it ``OUT.TOKEN.data`` and writes ``OUT`` beside it. ``token``: the content's name
    when the caller knows it; else a digest of the bytes as they are written."""

    def __init__(self, out: Path, token: str | None = None) -> None:
        self.out = out
        self.token = token
        self.hasher = None if token else hashlib.blake2b(digest_size=TOKEN_HEX // 2)
        self.file = AtomicFile(folder_of(out) / f"{out.name}.data")
        self.position = 0
        self.locations: list = []   # the ``location`` entries, named at commit

    def put(self, tensor: onnx.TensorProto, data) -> None:
        """Write ``data`` (bytes or an array) and point ``tensor`` at it."""
        if isinstance(data, np.ndarray):
            view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        else:
            view = memoryview(data).cast("B")
        start = -(-self.position // EXTERNAL_ALIGNMENT) * EXTERNAL_ALIGNMENT
        if self.hasher is not None:
            self.hasher.update(bytes(start - self.position))  # the gap reads as zeros
            self.hasher.update(view)
        self.file.seek(start)
        self.file.write(view)
        clear_payload(tensor)
        tensor.data_location = DATA_LOCATION_EXTERNAL
        for key, value in (("location", ""), ("offset", str(start)), ("length", str(view.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.locations.append(tensor.external_data[len(tensor.external_data) - 3])
        self.position = start + view.nbytes

    def move_inline_tensors(self, model: onnx.ModelProto) -> None:
        """Move every inline tensor of at least EXTERNAL_MIN_BYTES to the file, one at a time."""
        for tensor in _all_tensors(model):
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                self.put(tensor, tensor.raw_data)

    def commit(self, model: onnx.ModelProto, source: Path | None = None) -> None:
        """Name the data file, write ``OUT`` referring to it, and remove the data files of
        earlier versions of ``OUT`` (in that order: see the module docstring)."""
        token = self.token if self.token is not None else self.hasher.hexdigest()
        name = f"{self.out.name}.{token}.data"
        for entry in self.locations:
            entry.value = name
        model_bytes = model.SerializeToString()
        with folder_lock(folder_of(self.out)):
            self.file.commit(folder_of(self.out) / name)
            write_atomic(self.out, model_bytes)
            remove_old_data_files(self.out, keep=name, source=source)

    def discard(self) -> None:
        self.file.discard()


def _write_inline(model: onnx.ModelProto, out: Path, source: Path | None = None) -> None:
    model_bytes = model.SerializeToString()
    with folder_lock(folder_of(out)):
        write_atomic(out, model_bytes)
        remove_old_data_files(out, keep=None, source=source)


def _save(model: onnx.ModelProto, out: Path, external_threshold: int, source: Path | None = None,
          token: str | None = None) -> None:
    if fits_inline(model, external_threshold):
        _write_inline(model, out, source)
        return
    data = _DataFile(out, token)
    try:
        data.move_inline_tensors(model)
        data.commit(model, source)
    except BaseException:
        data.discard()
        raise


def save_onnx(model: onnx.ModelProto, out_path: str | os.PathLike, external_threshold: int = EXTERNAL_THRESHOLD) -> None:
    """Save ``model`` atomically as ONNX: one file, or (from ``external_threshold`` bytes on)
    ``OUT`` and its data file ``OUT.TOKEN.data`` (TOKEN: a digest of its bytes), replaced as a
    pair (see the module docstring); ``model`` is left referring to that file."""
    _save(model, Path(out_path), external_threshold)


def decode_to_onnx(path: str | os.PathLike, out_path: str | os.PathLike, limits: ReaderLimits = DEFAULT_LIMITS,
                   external_threshold: int = EXTERNAL_THRESHOLD, compact: bool | str = False) -> None:
    """``moub decode``: write the runnable ONNX model of a .moub, atomically; never onto the
    .moub itself.

    A model whose decoded tensors and graph reach ``external_threshold`` bytes is written as
    :func:`save_onnx` writes a large model (its data file named after the .moub's content),
    but each stored tensor goes to the data file as soon as it is decoded: memory holds one
    decoded tensor (or one window of packs) at a time, never the model, and no protobuf near
    2 GiB is built (:func:`load` then :func:`save_onnx` would hold the model twice).
    """
    source, out = Path(path), Path(out_path)
    if _is_same_file(source, out):
        raise ValueError(f"{out}: is the file being decoded; write the ONNX model to another path")
    from .conv_layout import compact_mode_here

    mode = compact_mode_here(compact)
    if mode:
        _decode_compact(source, out, limits, external_threshold, mode)
        return
    with open_checked(source, limits) as checked:
        model = checked.model
        token = hashlib.sha256(DATA_LAYOUT + checked.moub.identity()).hexdigest()[:TOKEN_HEX]
        decoded = sum(element_count(s.tensor) * dtypes.STORAGE_DTYPES[s.tensor.data_type].itemsize for s in checked.sites)
        if decoded < external_threshold and fits_inline(model, external_threshold - decoded):
            with checked.moub.allocating("the decoded model"):
                for site, _, array in checked.decoded():
                    fill_payload(site.tensor, array)
            _save(model, out, external_threshold, source, token)
            return
        data = _DataFile(out, token)
        try:
            with checked.moub.allocating("the decoded model"):
                for site, _, array in checked.decoded():
                    if array.nbytes >= EXTERNAL_MIN_BYTES:
                        data.put(site.tensor, array)
                    else:
                        fill_payload(site.tensor, array)
                    del array
            data.move_inline_tensors(model)
            data.commit(model, source)
        except BaseException:
            data.discard()
            raise


def _decode_compact(source: Path, out: Path, limits: ReaderLimits, external_threshold: int, mode: str) -> None:
    """``moub decode --compact``: the model with its integer weights and DequantizeLinear nodes
    (:mod:`.compact`, ``mode`` one of its modes), built whole in memory (about a byte or two per weight) and saved as
    :func:`save_onnx` saves, its data file (if any) named after the .moub's content."""
    from .compact import CompactGraph, compact_decoded, plan_compact
    from .loader import consumed_names

    with open_checked(source, limits) as checked:
        model = checked.model
        token = hashlib.sha256(DATA_LAYOUT + b"compact " + mode.encode() + checked.moub.identity()).hexdigest()[:TOKEN_HEX]
        graph = CompactGraph(model)
        with checked.moub.allocating("the decoded model"):
            for site, _, array, stub in compact_decoded(checked, plan_compact(checked, consumed_names(model), mode), graph):
                fill_payload(stub if stub is not None else site.tensor, array)
                del array
        graph.finish()
        _save(model, out, external_threshold, source, token)
