"""Sample data for quality evaluation: load a DATA.npz and check it against the model.

``DATA.npz`` holds one array per model input name, first axis = samples, and
optionally ``labels``. Every input must be present with the model's element
type and, on every axis but the first, the model's fixed dimensions. Nothing
is cast silently: a float64 array for a float32 input is an error that says so.

The archive is read with caps: each member's declared shape and element type are read from its
.npy header and checked (against the bytes the archive holds for it, and the total against
:func:`data_byte_cap`) before any array is allocated, and a dataset has at most MAX_SAMPLES
samples, since every candidate of the search runs on every sample.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from moub_format.budget import default_memory_budget

from .errors import DataError

LABELS_KEY = "labels"
MAX_SAMPLES = 100_000  # a few hundred to a few thousand samples resolve a tolerance; millions would run for days


def data_byte_cap() -> int:
    """Bytes the arrays of a DATA.npz may declare in all: half the memory budget, since the
    loader holds them twice while it shuffles them."""
    return default_memory_budget() // 2


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]  # None: symbolic or unknown


@dataclass(frozen=True)
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    n_samples: int
    batch_size: int

    def spread(self, n: int) -> np.ndarray:
        """Indices of ``n`` samples spread evenly over the data (deterministic): runs on a few
        samples (sensitivity) should see the whole range of the data, not its first batch."""
        return np.unique(np.linspace(0, self.n_samples - 1, min(n, self.n_samples)).round().astype(np.int64))

    def take(self, picked: np.ndarray) -> Dataset:
        labels = None if self.labels is None else self.labels[picked]
        return Dataset({k: v[picked] for k, v in self.inputs.items()}, labels, int(picked.size),
                       max(1, min(self.batch_size, int(picked.size))))

    def batches(self):
        """(first sample, feeds) of ``batch_size`` samples each, in order (the last may be shorter)."""
        for start in range(0, self.n_samples, self.batch_size):
            yield start, {name: array[start : start + self.batch_size] for name, array in self.inputs.items()}


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
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def _too_many_samples(source: str, n: int) -> str:
    return (f"{source}: {n} samples; the converter runs every candidate on every sample and takes at most {MAX_SAMPLES} "
            f"(a few hundred to a few thousand resolve the tolerance: pass a subset)")


def _npy_header(member) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header bytes) of one .npy stream, read without its data."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    return tuple(shape), np.dtype(dtype), member.tell()


def check_declared_sizes(path: Path, cap: int | None = None) -> None:
    """Read each member's .npy header and refuse, before any array is allocated: a header
    whose shape and element type need other than the bytes the archive holds for it (a
    header claiming 4 TiB in a few hundred bytes), and arrays whose declared sizes add up to
    more than ``cap`` (default :func:`data_byte_cap`; a few MB of zeros can inflate to GBs)."""
    cap = data_byte_cap() if cap is None else cap
    total = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            with archive.open(info) as member:
                try:
                    shape, dtype, header_bytes = _npy_header(member)
                except ValueError as exc:
                    raise DataError(f"{path}: array {name!r}: not NumPy data ({' '.join(str(exc).split())})") from None
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
            total += declared
            if total > cap:
                raise DataError(
                    f"{path}: its arrays declare {total} bytes or more (array {name!r}: shape {list(shape)} of {dtype}); "
                    f"the converter reads at most {cap} bytes of data (half its memory budget)"
                )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DataError(f"{path}: a single array; --data wants an .npz with one array per model input")
            check_declared_sizes(path)
            return {key: archive[key] for key in archive.files}
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
            shape, dtype, header_bytes = _npy_header(handle)
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


def load_dataset(
    data: str | os.PathLike | Mapping[str, np.ndarray],
    model: onnx.ModelProto,
    labels=None,
    batch_size: int | None = None,
) -> Dataset:
    """Load and validate sample data for ``model``; raise DataError naming what is wrong."""
    source = str(data) if isinstance(data, (str, os.PathLike)) else "data"
    arrays = _read_npz(Path(data)) if isinstance(data, (str, os.PathLike)) else {k: np.asarray(v) for k, v in data.items()}
    specs = model_inputs(model)
    if not specs:
        raise DataError("the model has no inputs to feed")
    wanted = {s.name for s in specs}
    unknown = sorted(set(arrays) - wanted - {LABELS_KEY})
    if unknown:
        raise DataError(f"{source}: array {unknown[0]!r} is not a model input (inputs: {', '.join(sorted(wanted))})")
    n_samples: int | None = None
    fixed_batch: int | None = None
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in arrays:
            raise DataError(f"{source}: missing model input {spec.name!r} (inputs: {', '.join(s.name for s in specs)})")
        array = arrays[spec.name]
        if array.dtype != spec.dtype:
            raise DataError(f"{source}: input {spec.name!r} has dtype {array.dtype}, the model wants {spec.dtype}")
        if not spec.dims:
            raise DataError(f"{source}: model input {spec.name!r} is a scalar; samples cannot be stacked on a first axis")
        if array.ndim != len(spec.dims):
            raise DataError(
                f"{source}: input {spec.name!r} has shape {list(array.shape)}, the model wants rank {len(spec.dims)} "
                f"({_dims_text(spec.dims)}) with samples on the first axis"
            )
        for axis, (got, want) in enumerate(zip(array.shape[1:], spec.dims[1:]), start=1):
            if want is not None and got != want:
                raise DataError(f"{source}: input {spec.name!r} has shape {list(array.shape)}, the model wants {_dims_text(spec.dims)} (axis {axis})")
        if n_samples is None:
            n_samples = int(array.shape[0])
        elif array.shape[0] != n_samples:
            raise DataError(f"{source}: input {spec.name!r} has {array.shape[0]} samples, other inputs have {n_samples}")
        if spec.dims[0] is not None:
            fixed_batch = spec.dims[0]
        inputs[spec.name] = np.ascontiguousarray(array)
    assert n_samples is not None
    if n_samples == 0:
        raise DataError(f"{source}: no samples (first axis has length 0)")
    if n_samples > MAX_SAMPLES:
        raise DataError(_too_many_samples(source, n_samples))
    if labels is not None:
        label_source = str(labels) if isinstance(labels, (str, os.PathLike)) else "labels"
        label_array = _check_labels(_read_labels(labels), n_samples, label_source)
    elif LABELS_KEY in arrays:
        label_array = _check_labels(arrays[LABELS_KEY], n_samples, f"{source}: {LABELS_KEY!r}")
    else:
        label_array = None
    if fixed_batch is not None:
        if batch_size is not None and batch_size != fixed_batch:
            raise DataError(f"the model's batch dimension is fixed at {fixed_batch}; --batch-size {batch_size} cannot be used")
        if n_samples % fixed_batch:
            raise DataError(f"{source}: {n_samples} samples do not fill batches of the model's fixed batch size {fixed_batch}")
        batch_size = fixed_batch
    # One fixed shuffle (independent of --seed), so that the first batches represent the
    # whole set: an evaluation may stop early once its final quality is bounded (evaluate.py).
    order = np.random.default_rng(SHUFFLE_SEED).permutation(n_samples)
    inputs = {name: np.ascontiguousarray(array[order]) for name, array in inputs.items()}
    if label_array is not None:
        label_array = np.ascontiguousarray(label_array[order])
    return Dataset(inputs, label_array, n_samples, batch_size or DEFAULT_BATCH_SIZE)


# Samples per onnxruntime run. Small batches are faster with one thread (the activations stay in
# cache) and let a failing candidate stop sooner; from 2 samples up the outputs are the same bits
# as with larger batches, while one sample can take other kernels (docs/decisions/0021).
DEFAULT_BATCH_SIZE = 2
SHUFFLE_SEED = 0


def _dims_text(dims: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(dims)) + "]"
