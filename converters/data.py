"""Sample data for quality evaluation: load a DATA.npz and check it against the model.

``DATA.npz`` holds one array per model input name, first axis = samples, and
optionally ``labels``. Every input must be present with the model's element
type and, on every axis but the first, the model's fixed dimensions. Nothing
is cast silently: a float64 array for a float32 input is an error that says so.

The archive is read with caps: each member's declared shape and element type are read from its
.npy header and checked (against the bytes the archive holds for it, and the total against
:func:`data_byte_cap`) before any array is allocated, and a dataset has at most MAX_SAMPLES
samples, since every candidate of the search runs on every sample. A stacked archive's arrays stay
in the file and are read a batch at a time (``stored.py``), so the data never all sits in memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
from onnx import helper

from moub_format.budget import default_memory_budget

from .errors import DataError, OptionError
from .stored import StoredArray, TemporaryFolder, stored_member

LABELS_KEY = "labels"
MAX_SAMPLES = 100_000  # a few hundred to a few thousand samples resolve a tolerance; millions would run for days


def data_byte_cap() -> int:
    """Bytes the arrays of a DATA.npz read into memory may declare in all: half the memory budget
    (the converter's own statistics, sessions and outputs need the rest)."""
    return default_memory_budget() // 2


def inflate_byte_cap() -> int:
    """Bytes the compressed arrays of a DATA.npz may inflate to on disk (they are read from a
    temporary copy): half the free space of the temporary folder."""
    return shutil.disk_usage(tempfile.gettempdir()).free // 2


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]  # None: symbolic or unknown
    params: tuple[str | None, ...] = ()  # the symbolic name of each dim, where it has one


Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Dataset:
    """The user's samples: what one onnxruntime run takes is a feed, and a sample is either a slice
    of stacked arrays along each input's sample axis (``axes``: absent means 0, None means the
    array is fed whole to every sample) or one feed of its own (``feeds``: data that cannot be
    stacked, such as sequences of different lengths)."""

    inputs: dict[str, np.ndarray | StoredArray]  # StoredArray: read from its file a batch at a time
    labels: np.ndarray | None
    n_samples: int
    batch_size: int
    axes: Mapping[str, int | None] = field(default_factory=dict)
    feeds: tuple[Feed, ...] | None = None
    notes: tuple[str, ...] = ()  # what the loader did that the user should hear of, said once

    def axis(self, name: str) -> int | None:
        return self.axes.get(name, 0)

    def spread(self, n: int) -> np.ndarray:
        """Indices of ``n`` samples spread evenly over the data (deterministic): runs on a few
        samples (sensitivity) should see the whole range of the data, not its first batch."""
        return np.unique(np.linspace(0, self.n_samples - 1, min(n, self.n_samples)).round().astype(np.int64))

    def take(self, picked: np.ndarray) -> Dataset:
        labels = None if self.labels is None else self.labels[picked]
        if self.feeds is not None:
            return replace(self, labels=labels, n_samples=int(picked.size), feeds=tuple(self.feeds[i] for i in picked))
        inputs = {k: _take(v, picked, self.axis(k)) for k, v in self.inputs.items()}
        return replace(self, inputs=inputs, labels=labels, n_samples=int(picked.size),
                       batch_size=max(1, min(self.batch_size, int(picked.size))))

    def batches(self):
        """(first sample, feeds) of ``batch_size`` samples each, in order (the last may be shorter)."""
        if self.feeds is not None:
            yield from enumerate(self.feeds)
            return
        for start in range(0, self.n_samples, self.batch_size):
            stop = start + self.batch_size
            yield start, {name: _slice(array, start, stop, self.axis(name)) for name, array in self.inputs.items()}

    def values_per_sample(self) -> int:
        """Input values one sample feeds (its share of shared inputs included)."""
        if self.feeds is not None:
            return max(1, sum(sum(int(a.size) for a in feed.values()) for feed in self.feeds) // max(1, self.n_samples))
        return sum(int(a.size) // (self.n_samples if self.axis(k) is not None else 1) for k, a in self.inputs.items())


def _take(array: np.ndarray, picked: np.ndarray, axis: int | None) -> np.ndarray:
    """The samples ``picked`` along ``axis``: a view where they are evenly spaced (the search and
    confirm halves, every other sample), so the halves of the data cost no copy of it."""
    if axis is None:
        return array
    if isinstance(array, StoredArray):
        return array.select(picked)
    step = _even_step(picked)
    if step is not None:
        index = [slice(None)] * array.ndim
        index[axis] = slice(int(picked[0]), int(picked[-1]) + 1, step)
        return array[tuple(index)]
    return array[picked] if axis == 0 else np.take(array, picked, axis=axis)


def _even_step(picked: np.ndarray) -> int | None:
    """The step of ``picked`` if it is an increasing arithmetic progression, else None."""
    if picked.size < 2:
        return 1 if picked.size == 1 else None
    steps = np.diff(picked)
    return int(steps[0]) if steps[0] > 0 and bool((steps == steps[0]).all()) else None


def _slice(array: np.ndarray | StoredArray, start: int, stop: int, axis: int | None) -> np.ndarray:
    if axis is None:
        return array
    if isinstance(array, StoredArray):
        return array.read(start, stop)
    if axis == 0:
        return array[start:stop]
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs a caller must feed (initializer-backed inputs excluded)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise DataError(f"model input {value.name!r} is not a tensor; only tensor inputs can be fed from DATA.npz")
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except Exception:
            raise DataError(f"model input {value.name!r} has element type {tensor_type.elem_type}, which numpy cannot hold") from None
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim)
        params = tuple(d.dim_param or None for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, dims, params))
    return specs


def _too_many_samples(source: str, n: int) -> str:
    return (f"{source}: {n} samples; the converter runs every candidate on every sample and takes at most {MAX_SAMPLES} "
            f"(a few hundred to a few thousand resolve the tolerance: pass a subset)")


@dataclass(frozen=True)
class NpyHeader:
    """What one .npy stream's header declares, read without its data."""

    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    header_bytes: int


def _npy_header(member) -> NpyHeader:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
    return NpyHeader(tuple(shape), bool(fortran), np.dtype(dtype), member.tell())


def check_declared_sizes(path: Path, cap: int | None = None, in_file: bool = False) -> dict[str, NpyHeader]:
    """Read each member's .npy header and refuse, before any array is allocated: a header
    whose shape and element type need other than the bytes the archive holds for it (a
    header claiming 4 TiB in a few hundred bytes), and arrays whose declared sizes add up to
    more than ``cap`` (a few MB of zeros can inflate to GBs). ``in_file``: the arrays are read
    from the file a batch at a time, so only compressed members count, against
    :func:`inflate_byte_cap` by default; otherwise every member counts, against
    :func:`data_byte_cap`. Returns each member's header, by member name."""
    where = "of disk for a temporary copy (half the free space)" if in_file else "of data (half its memory budget)"
    if cap is None:
        cap = inflate_byte_cap() if in_file else data_byte_cap()
    total = 0
    headers: dict[str, NpyHeader] = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            with archive.open(info) as member:
                try:
                    header = _npy_header(member)
                except ValueError as exc:
                    raise DataError(f"{path}: array {name!r}: not NumPy data ({' '.join(str(exc).split())})") from None
            shape, dtype, header_bytes = header.shape, header.dtype, header.header_bytes
            headers[info.filename] = header
            if dtype.hasobject:
                raise DataError(f"{path}: array {name!r} holds Python objects; --data wants numeric arrays")
            declared = dtype.itemsize
            for dim in shape:
                declared *= dim
            if header_bytes + declared != info.file_size:
                raise DataError(
                    f"{path}: array {name!r}: its header declares shape {list(shape)} of {dtype} ({declared} bytes), "
                    f"the archive holds {info.file_size - header_bytes} bytes of data for it"
                )
            if shape and shape[0] > MAX_SAMPLES:
                raise DataError(_too_many_samples(f"{path}: array {name!r}", shape[0]))
            if in_file and info.compress_type == zipfile.ZIP_STORED:
                continue  # read in place
            total += declared
            if total > cap:
                raise DataError(
                    f"{path}: its arrays declare {total} bytes or more (array {name!r}: shape {list(shape)} of {dtype}); "
                    f"the converter takes at most {cap} bytes {where}"
                )
    return headers


def _read_npz(path: Path, in_file: bool = False) -> dict[str, np.ndarray | StoredArray]:
    """The arrays of one .npz; with ``in_file``, each as a :class:`StoredArray` read a batch at a
    time from the file (a compressed member from a temporary copy), so the data is never all in memory."""
    try:
        archive = np.load(path, allow_pickle=False, mmap_mode="r")
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single array of shape {list(archive.shape)}; --data wants an .npz with one array "
                            "per model input, e.g. numpy.savez('data.npz', input=array)")
        headers = check_declared_sizes(path, in_file=in_file)
        with archive:
            if not in_file:
                return {key: archive[key] for key in archive.files}
            inflated = TemporaryFolder()
            arrays: dict[str, np.ndarray | StoredArray] = {}
            for info in archive.zip.infolist():
                key = info.filename.removesuffix(".npy")
                header = headers[info.filename]
                stored = stored_member(Path(path), archive.zip, info, header.shape, header.dtype, header.fortran,
                                       header.header_bytes, inflated)
                arrays[key] = archive[key] if stored is None or not header.shape else stored
            return arrays
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an .npz file") from None
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # numpy's last guess for bytes that are neither .npz nor .npy
            raise DataError(f"{path}: not an .npz file (neither a zip archive of arrays nor NumPy data)") from None
        raise DataError(f"{path}: not a readable .npz file ({' '.join(str(exc).split())})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({' '.join(str(exc).split())})") from None


def _check_npy_size(path: Path) -> None:
    """A .npy file's header must declare the bytes the file holds (before numpy allocates them)."""
    with open(path, "rb") as handle:
        if handle.read(6) != b"\x93NUMPY":
            return  # not .npy (an .npz is refused by the caller; anything else by np.load)
        handle.seek(0)
        try:
            header = _npy_header(handle)
            shape, dtype, header_bytes = header.shape, header.dtype, header.header_bytes
        except ValueError as exc:
            raise DataError(f"{path}: not a readable .npy file ({' '.join(str(exc).split())})") from None
        declared = dtype.itemsize
        for dim in shape:
            declared *= dim
        size = os.fstat(handle.fileno()).st_size
    if header_bytes + declared != size:
        raise DataError(f"{path}: its header declares shape {list(shape)} of {dtype} ({declared} bytes), the file holds "
                        f"{size - header_bytes} bytes of data")
    if shape and shape[0] > MAX_SAMPLES:
        raise DataError(_too_many_samples(str(path), shape[0]))


def _read_labels(labels) -> np.ndarray:
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        try:
            _check_npy_size(path)
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{path}: no such file") from None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path}: not a readable .npy file ({' '.join(str(exc).split())})") from None
        if isinstance(array, np.lib.npyio.NpzFile):
            array.close()
            raise DataError(f"{path}: an .npz archive; --labels wants one .npy array")
        return array
    return np.asarray(labels)


def _check_labels(labels: np.ndarray, n: int, source: str) -> np.ndarray:
    if labels.ndim == 0:
        raise DataError(f"{source}: labels are a scalar; want one label per sample ({n})")
    if labels.shape[0] != n:
        raise DataError(f"{source}: {labels.shape[0]} labels for {n} samples")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise DataError(f"{source}: labels must be class numbers (integers), got non-integer floats")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{source}: labels must be class numbers (integers), not dtype {labels.dtype}")
    return labels.astype(np.int64)


DataSource = Union[str, os.PathLike, Mapping[str, np.ndarray], Iterable[Feed], Any]


def load_dataset(
    data: DataSource,
    model: onnx.ModelProto,
    labels=None,
    batch_size: int | None = None,
    batch_axes: Mapping[str, int | None] | None = None,
) -> Dataset:
    """Load and validate sample data for ``model``; raise DataError naming what is wrong.

    ``data``: a DATA.npz of stacked arrays, a folder of .npz files (one feed each), a mapping of
    stacked arrays, or any iterable of feed dicts (an onnxruntime ``CalibrationDataReader``
    too). ``batch_axes``: an input's sample axis, or None for an array fed whole to every
    sample (a scalar, an initial state, a shared mask), where the model's dims do not say it."""
    specs = model_inputs(model)
    if not specs:
        raise DataError("the model has no inputs to feed")
    batch_axes = dict(batch_axes or {})
    unknown_axes = sorted(set(batch_axes) - {s.name for s in specs})
    if unknown_axes:
        raise DataError(f"--batch-axis/--shared {unknown_axes[0]!r} is not a model input "
                        f"(inputs: {', '.join(s.name for s in specs)})")
    if isinstance(data, (str, os.PathLike)) and Path(data).is_dir():
        source = str(data)
        paths = sorted(Path(data).glob("*.npz"))
        if len(paths) > MAX_SAMPLES:
            raise DataError(_too_many_samples(source, len(paths)))
        feeds = [_read_npz(path) for path in paths]
        if not feeds:
            raise DataError(f"{source}: a folder with no .npz files; want one .npz per sample (one array per model input)")
        return _feed_dataset(feeds, specs, labels, source, model)
    if isinstance(data, (str, os.PathLike)):
        return _stacked_dataset(_read_npz(Path(data), in_file=True), specs, labels, batch_size, batch_axes, str(data))
    if isinstance(data, Mapping):
        return _stacked_dataset({k: np.asarray(v) for k, v in data.items()}, specs, labels, batch_size, batch_axes, "data")
    if hasattr(data, "get_next"):  # onnxruntime.quantization.CalibrationDataReader
        data = iter(data.get_next, None)
    try:
        feeds = []
        for feed in data:
            feeds.append(dict(feed))
            if len(feeds) > MAX_SAMPLES:
                raise DataError(_too_many_samples("data", len(feeds)))
    except TypeError:
        raise DataError(f"data: a {type(data).__name__}; want a DATA.npz path, a folder of .npz feeds, a mapping of "
                        "arrays or an iterable of feed dicts") from None
    if not feeds:
        raise DataError("data: no feeds")
    return _feed_dataset(feeds, specs, labels, "data", model)


def _cast(array: np.ndarray, spec: InputSpec, source: str, notes: list[str]) -> np.ndarray:
    """``array`` in the input's element type where that loses nothing that matters: float data for
    a float input (the model computes in its own type), integers that fit for an integer input."""
    if not isinstance(array, StoredArray):
        array = np.asarray(array)
    if array.dtype == spec.dtype:
        return array
    want = spec.dtype
    safe = (array.dtype.kind == "f" and want.kind == "f") or (
        array.dtype.kind in "iu" and want.kind in "iu" and (array.size == 0 or (
            np.iinfo(want).min <= _extreme(array, np.min) and _extreme(array, np.max) <= np.iinfo(want).max)))
    if not safe:
        raise DataError(f"{source}: input {spec.name!r} has dtype {array.dtype}, the model wants {want}")
    note = f"input {spec.name!r}: {array.dtype} data cast to the model's {want}"
    if note not in notes:
        notes.append(note)
    return array.astype(want)


def _extreme(array: np.ndarray | StoredArray, reduce) -> int:
    """``reduce`` (np.min or np.max) of every value, a few samples at a time where they are in a file."""
    if isinstance(array, StoredArray):
        return int(reduce([reduce(chunk) for chunk in array.chunks()]))
    return int(reduce(array))


def _fits(shape: tuple[int, ...], spec: InputSpec, skip: int | None) -> bool:
    return len(shape) == len(spec.dims) and all(
        want is None or got == want for axis, (got, want) in enumerate(zip(shape, spec.dims)) if axis != skip)


def _sample_axis(array: np.ndarray, spec: InputSpec, source: str) -> int | None | str:
    """The axis that holds ``spec``'s samples in ``array``, None for an array fed whole (a shape the
    model takes as it is, with no dim left to stack on), or "fixed" for an array that fits the
    model's fixed shape exactly (shared, or the one batch of a fixed-batch model)."""
    if not spec.dims:
        if array.ndim == 0:
            return None
        raise DataError(f"{source}: model input {spec.name!r} is a scalar; give one value, fed to every sample, "
                        f"not shape {list(array.shape)}")
    if array.ndim != len(spec.dims):
        raise DataError(f"{source}: input {spec.name!r} has shape {list(array.shape)}, the model wants rank "
                        f"{len(spec.dims)} ({_dims_text(spec)})")
    dynamic = [axis for axis, d in enumerate(spec.dims) if d is None]
    if dynamic and _fits(array.shape, spec, None):
        return 0 if 0 in dynamic else dynamic[0]
    if not dynamic and _fits(array.shape, spec, None):
        return "fixed"
    if spec.dims[0] is not None and _fits(array.shape, spec, 0):
        return 0  # samples of a model whose batch dimension is fixed
    bad = next(a for a, (got, want) in enumerate(zip(array.shape, spec.dims)) if want is not None and got != want)
    raise DataError(f"{source}: input {spec.name!r} has shape {list(array.shape)}, the model wants {_dims_text(spec)} "
                    f"(axis {bad})")


def _stacked_dataset(arrays: dict[str, np.ndarray], specs: list[InputSpec], labels, batch_size: int | None,
                     batch_axes: dict[str, int | None], source: str) -> Dataset:
    notes: list[str] = []
    wanted = {s.name for s in specs}
    extra = sorted(set(arrays) - wanted - {LABELS_KEY})
    if extra:
        notes.append(f"{source}: ignored array{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} "
                     f"(not model inputs: {', '.join(sorted(wanted))})")
    axes: dict[str, int | None | str] = {}
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in arrays:
            held = ", ".join(map(repr, sorted(arrays))) or "no arrays"
            raise DataError(f"{source}: missing model input {spec.name!r} (inputs: {', '.join(s.name for s in specs)}; "
                            f"the data has {held})")
        array = _cast(arrays[spec.name], spec, source, notes)
        if spec.name in batch_axes:
            axis = batch_axes[spec.name]
            if axis is not None and not 0 <= axis < array.ndim:
                raise DataError(f"--batch-axis {spec.name}={axis}: its array has {array.ndim} axes")
            if axis is not None and not _fits(array.shape, spec, axis):
                raise DataError(f"{source}: input {spec.name!r} has shape {list(array.shape)}, the model wants "
                                f"{_dims_text(spec)} (samples on axis {axis})")
        else:
            axis = _sample_axis(array, spec, source)
        axes[spec.name] = axis
        if isinstance(array, StoredArray):  # samples read from the file a batch at a time; an array fed whole, once
            array = array.along(axis) if isinstance(axis, int) else _in_memory(array, source, spec.name)
        inputs[spec.name] = array
    counts = {name: inputs[name].shape[axis] for name, axis in axes.items() if isinstance(axis, int)}
    if not counts:  # every array fits the model as it is: one batch of the model's fixed size
        counts = {name: inputs[name].shape[0] for name, axis in axes.items() if axis == "fixed" and inputs[name].ndim}
        axes.update({name: 0 for name in counts})
    axes = {name: (None if axis == "fixed" else axis) for name, axis in axes.items()}
    if not counts:
        raise DataError(f"{source}: no input has a sample axis; every array is fed whole (give samples stacked on an axis)")
    n_samples = next(iter(counts.values()))
    for name, count in counts.items():
        if count != n_samples:
            first = next(iter(counts))
            raise DataError(f"{source}: input {name!r} has {count} samples on axis {axes[name]}, input {first!r} has "
                            f"{n_samples} on axis {axes[first]}; say which axis holds the samples with --batch-axis "
                            f"NAME=AXIS, or --shared NAME for an array fed whole to every sample")
    if n_samples == 0:
        raise DataError(f"{source}: no samples (the sample axis has length 0)")
    if n_samples > MAX_SAMPLES:
        raise DataError(_too_many_samples(source, n_samples))
    shared = sorted(name for name, axis in axes.items() if axis is None and name not in batch_axes)
    if shared:
        notes.append(f"fed whole to every sample: {', '.join(map(repr, shared))}")
    moved = sorted(f"{name!r} on axis {axis}" for name, axis in axes.items() if axis and name not in batch_axes)
    if moved:
        notes.append(f"samples taken from {', '.join(moved)} (the model's batch dimension)")
    fixed_batch = None
    for spec in specs:
        axis = axes[spec.name]
        if axis is not None and spec.dims[axis] is not None:
            fixed_batch = spec.dims[axis]
    label_array = _labels(labels, arrays, n_samples, source)
    if fixed_batch is not None:
        if batch_size is not None and batch_size != fixed_batch:
            raise DataError(f"the model's batch dimension is fixed at {fixed_batch}; --batch-size {batch_size} cannot be used")
        if n_samples % fixed_batch:
            raise DataError(f"{source}: {n_samples} samples do not fill batches of the model's fixed batch size {fixed_batch}")
        batch_size = fixed_batch
    # One fixed shuffle (independent of --seed), so that the first batches represent the
    # whole set: an evaluation may stop early once its final quality is bounded (evaluate.py).
    order = np.random.default_rng(SHUFFLE_SEED).permutation(n_samples)
    inputs = {name: _shuffled(array, order, axes[name]) for name, array in inputs.items()}
    if label_array is not None:
        label_array = np.ascontiguousarray(label_array[order])
    stored_axes = {name: axis for name, axis in axes.items() if axis != 0}
    return Dataset(inputs, label_array, n_samples, batch_size or default_batch_size(inputs, axes), stored_axes, None,
                   tuple(notes))


def sample_bytes(inputs: dict[str, np.ndarray | StoredArray], axes: dict[str, int | None]) -> int:
    """Bytes one sample's inputs take (arrays fed whole to every sample not counted)."""
    total = 0
    for name, array in inputs.items():
        axis = axes.get(name)
        if axis is not None and array.shape[axis]:
            total += int(np.prod(array.shape, dtype=np.int64)) // array.shape[axis] * np.dtype(array.dtype).itemsize
    return total


def default_batch_size(inputs: dict[str, np.ndarray | StoredArray], axes: dict[str, int | None]) -> int:
    """:data:`DEFAULT_BATCH_SIZE`, or one sample per run where a sample's inputs take at least
    :data:`LARGE_SAMPLE_BYTES`: a run's activations grow with its samples, and for page-sized
    images they, not the model, set the converter's peak memory."""
    return 1 if sample_bytes(inputs, axes) >= LARGE_SAMPLE_BYTES else DEFAULT_BATCH_SIZE


def _in_memory(array: StoredArray, source: str, name: str) -> np.ndarray:
    """An array fed whole to every sample, read into memory once (within :func:`data_byte_cap`)."""
    if array.nbytes > data_byte_cap():
        raise DataError(f"{source}: input {name!r} is fed whole to every sample and takes {array.nbytes} bytes; the "
                        f"converter holds at most {data_byte_cap()} bytes of it in memory (half its memory budget)")
    return np.asarray(array)


def _shuffled(array: np.ndarray | StoredArray, order: np.ndarray, axis: int | None) -> np.ndarray | StoredArray:
    """``array``'s samples in ``order``: a copy in memory, or the same file read in that order."""
    if isinstance(array, StoredArray) and axis is not None:
        return array.select(order)
    return np.ascontiguousarray(_take(array, order, axis))


def _feed_dataset(feeds: list[dict[str, np.ndarray]], specs: list[InputSpec], labels, source: str,
                  model: onnx.ModelProto) -> Dataset:
    """One feed per sample, each checked against the model's inputs as onnxruntime will take it."""
    notes: list[str] = []
    wanted = {s.name for s in specs}
    checked = []
    extra: set[str] = set()
    for number, feed in enumerate(feeds):
        where = f"{source}: feed {number}"
        extra |= set(feed) - wanted - {LABELS_KEY}
        one = {}
        for spec in specs:
            if spec.name not in feed:
                raise DataError(f"{where}: missing model input {spec.name!r} (inputs: {', '.join(s.name for s in specs)})")
            array = _cast(feed[spec.name], spec, source, notes)
            if not _fits(array.shape, spec, None):
                raise DataError(f"{where}: input {spec.name!r} has shape {list(array.shape)}, the model takes "
                                f"{_dims_text(spec)}")
            one[spec.name] = np.ascontiguousarray(array)
        checked.append(one)
    if extra:
        notes.append(f"{source}: ignored arrays {', '.join(map(repr, sorted(extra)))} (not model inputs)")
    n_samples = len(checked)
    from_feeds = {LABELS_KEY: np.stack([np.asarray(f[LABELS_KEY]) for f in feeds])} if all(LABELS_KEY in f for f in feeds) else {}
    label_array = _labels(labels, from_feeds, n_samples, source)
    order = np.random.default_rng(SHUFFLE_SEED).permutation(n_samples)
    if label_array is not None:
        label_array = np.ascontiguousarray(label_array[order])
    notes.append(f"{n_samples} samples of one feed each")
    return Dataset({}, label_array, n_samples, 1, {}, tuple(checked[i] for i in order), tuple(notes))


def _labels(labels, arrays: Mapping[str, np.ndarray], n_samples: int, source: str) -> np.ndarray | None:
    if labels is not None:
        label_source = str(labels) if isinstance(labels, (str, os.PathLike)) else "labels"
        return _check_labels(_read_labels(labels), n_samples, label_source)
    if LABELS_KEY in arrays:
        return _check_labels(np.asarray(arrays[LABELS_KEY]), n_samples, f"{source}: {LABELS_KEY!r}")
    return None


def parse_batch_axes(batch_axis: Sequence[str] = (), shared: Sequence[str] = ()) -> dict[str, int | None]:
    """``--batch-axis NAME=AXIS`` and ``--shared NAME`` as one mapping (None: fed whole)."""
    axes: dict[str, int | None] = {}
    for text in batch_axis:
        name, _, axis = text.rpartition("=")
        if not name or not axis.strip().lstrip("-").isdigit():
            raise OptionError(f"--batch-axis {text!r}: want NAME=AXIS, for example state=1")
        axes[name] = int(axis)
    for name in shared:
        axes[name] = None
    return axes


# Samples per onnxruntime run. Small batches are faster with one thread (the activations stay in
# cache) and let a failing candidate stop sooner; from 2 samples up the outputs are the same bits
# as with larger batches, while one sample can take other kernels (docs/decisions/0021).
DEFAULT_BATCH_SIZE = 2
# A sample at least this large (a page-sized image: 3 x 736 x 960 float32 is 8.5 MB) runs alone:
# PP-OCR det's conversion peaked at 1.22 GB with two pages per run, 0.79 GB with one (docs/decisions/0063).
LARGE_SAMPLE_BYTES = 1 << 22
SHUFFLE_SEED = 0


def _dims_text(spec: InputSpec) -> str:
    params = spec.params or (None,) * len(spec.dims)
    return "[" + ", ".join(str(d) if d is not None else (p or "?") for d, p in zip(spec.dims, params)) + "]"
