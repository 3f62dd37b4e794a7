"""Real, seeded, cached inputs for the benchmark models.

magika: real files of the host's system folders (config.MAGIKA_ROOTS), turned into model inputs
by magika's own feature extraction.
cls / rec / det: text lines and pages of real text (the host's licenses and Python sources,
config.TEXT_SOURCES) rendered with Pillow and a DejaVu font, preprocessed by rapidocr's own
resize/normalise code.
digits: the demo's committed test set (converters/data/digits_test.npz).

Every model's samples are split once, with the seed, into a "search" split (what a converter may
tune on) and a "test" split (what the table's fidelity is measured on; no converter sees it).

Public API (other tools use it; keep it stable):
    load_model_and_inputs(name, split="all") -> (onnx_path, {input_name: array})
    load_labels(name, split="all") -> labels array or None (digits only)
    write_npz(name, path, split="search") -> path   # a DATA.npz for `moub convert --data`
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np

from . import config as C
from .models import DIGITS_DATA, ModelUnavailable, model_path

SPLITS = ("all", "search", "test")
_CACHE_VERSION = 3


# ----------------------------------------------------------------------------- public API

def load_model_and_inputs(name: str, split: str = "all") -> tuple[Path, dict[str, np.ndarray]]:
    """The fp32 model path and its inputs for one split; first axis = samples."""
    onnx_path = model_path(name)
    arrays = _load_all(name)
    mask = _split_mask(arrays["__split__"], split)
    inputs = {k: v[mask] for k, v in arrays.items() if not k.startswith("__")}
    return onnx_path, inputs


def load_labels(name: str, split: str = "all") -> np.ndarray | None:
    """Ground-truth labels where the data set has them (the demo's digits), else None."""
    arrays = _load_all(name)
    if "__labels__" not in arrays:
        return None
    return arrays["__labels__"][_split_mask(arrays["__split__"], split)]


def load_texts(name: str, split: str = "all") -> list[str] | None:
    """The rendered strings (rec only): lets a report state the fp32 model's own accuracy."""
    arrays = _load_all(name)
    if "__texts__" not in arrays:
        return None
    return [str(t) for t in arrays["__texts__"][_split_mask(arrays["__split__"], split)]]


def write_npz(name: str, path: str | os.PathLike, split: str = "search") -> Path:
    """Write the inputs (and `labels`, where known) of one split as a converter DATA.npz."""
    _, inputs = load_model_and_inputs(name, split)
    labels = load_labels(name, split)
    if labels is not None:
        inputs = {**inputs, "labels": labels}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **inputs)
    return path


# ----------------------------------------------------------------------------- cache

def _split_mask(split_codes: np.ndarray, split: str) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if split == "all":
        return np.ones(len(split_codes), dtype=bool)
    return split_codes == (1 if split == "test" else 0)


def _split_codes(n: int, seed: int) -> np.ndarray:
    """0 = search, 1 = test; a seeded permutation so both splits span every kind of sample."""
    codes = np.zeros(n, dtype=np.int8)
    n_search = int(round(n * C.SEARCH_FRACTION))
    codes[np.random.default_rng(seed).permutation(n)[n_search:]] = 1
    return codes


def _cache_key(name: str) -> str:
    settings = {
        "v": _CACHE_VERSION, "name": name, "seed": C.SEED, "n": C.N_SAMPLES.get(name),
        "split": C.SEARCH_FRACTION, "fonts": C.FONTS, "heights": C.LINE_HEIGHT_PX,
        "page": C.PAGE_SIZE, "roots": C.MAGIKA_ROOTS, "sources": C.TEXT_SOURCES,
    }
    if name == "digits" and DIGITS_DATA.is_file():
        settings["data_sha256"] = hashlib.sha256(DIGITS_DATA.read_bytes()).hexdigest()
    # The preprocessing is the wheels' own code: another version may build other inputs.
    package = {"magika": "magika", "cls": "rapidocr-onnxruntime", "rec": "rapidocr-onnxruntime",
               "det": "rapidocr-onnxruntime"}.get(name)
    if package:
        try:
            settings["package"] = f"{package}=={importlib.metadata.version(package)}"
        except importlib.metadata.PackageNotFoundError:
            pass
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


_MEMO: dict[str, dict[str, np.ndarray]] = {}


def _load_all(name: str) -> dict[str, np.ndarray]:
    """Build (once) and cache every sample of a model with its split codes."""
    if name in _MEMO:
        return _MEMO[name]
    path = C.CACHE / "inputs" / f"{name}-{_cache_key(name)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        arrays = _BUILDERS[name]()
        if "__split__" not in arrays:
            n = len(next(iter(v for k, v in arrays.items() if not k.startswith("__"))))
            arrays["__split__"] = _split_codes(n, C.SEED)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    _MEMO[name] = arrays
    return arrays


# ----------------------------------------------------------------------------- digits

def _digits() -> dict[str, np.ndarray]:
    if not DIGITS_DATA.is_file():
        raise ModelUnavailable(f"{DIGITS_DATA}: demo test data not found")
    with np.load(DIGITS_DATA, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    out = {k: v for k, v in arrays.items() if k != "labels"}
    if "labels" in arrays:
        out["__labels__"] = arrays["labels"]
    return out


# ----------------------------------------------------------------------------- magika

def _walk_files(roots: tuple[str, ...], limit: int) -> list[Path]:
    """Regular, readable files under the roots, in a stable order (symlinks not followed)."""
    seen: set[str] = set()
    files: list[Path] = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                real = os.path.realpath(p)
                if real in seen or p.is_symlink() or not p.is_file() or not os.access(p, os.R_OK):
                    continue
                seen.add(real)
                files.append(p)
                if len(files) >= limit:
                    return files
    return files


def _round_robin_by_suffix(files: list[Path], rng: np.random.Generator) -> Iterator[Path]:
    """Files in a seeded order that takes one of each file suffix in turn.

    /usr/share/doc is mostly .gz: plain random sampling would make half the set one file type.
    """
    groups: dict[str, list[Path]] = {}
    for p in files:
        groups.setdefault(p.suffix.lower(), []).append(p)
    queues = [groups[k] for k in sorted(groups)]
    for q in queues:
        rng.shuffle(q)
    rng.shuffle(queues)
    depth = 0
    while True:
        alive = [q for q in queues if depth < len(q)]
        if not alive:
            return
        for q in alive:
            yield q[depth]
        depth += 1


def _magika() -> dict[str, np.ndarray]:
    """Features of real files by magika's own code path (the same one `magika FILE` takes)."""
    from magika import Magika

    m = Magika()
    cfg = m._model_config
    candidates = _walk_files(C.MAGIKA_ROOTS, C.MAGIKA_MAX_FILES_SCANNED)
    rows: list[list[int]] = []
    paths: list[str] = []
    for path in _round_robin_by_suffix(candidates, np.random.default_rng(C.SEED)):
        _, features = m._get_result_or_features_from_path(path)
        if features is None:  # empty, tiny or whitespace-only: magika answers without the model
            continue
        # The model input is beg + mid + end, exactly as Magika._get_raw_predictions builds it.
        sample = list(features.beg[: cfg.beg_size])
        if cfg.mid_size > 0:
            sample.extend(features.mid[: cfg.mid_size])
        if cfg.end_size > 0:
            sample.extend(features.end[-cfg.end_size:])
        rows.append(sample)
        paths.append(str(path))
        if len(rows) >= C.N_SAMPLES["magika"]:
            break
    input_name = m._onnx_session.get_inputs()[0].name
    return {input_name: np.asarray(rows, dtype=np.int32), "__paths__": np.asarray(paths)}


# ----------------------------------------------------------------------------- text rendering

_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def _text_lines(n: int, seed: int) -> list[str]:
    """Distinct lines of real text from the host's licenses and Python sources (config.TEXT_SOURCES)."""
    lines: set[str] = set()
    for root in C.TEXT_SOURCES:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                if not (fn.endswith(".py") or root.endswith("licenses")):
                    continue
                try:
                    text = (Path(dirpath) / fn).read_text(encoding="utf-8", errors="ignore")
                except OSError:
                    continue
                for raw in text.splitlines():
                    line = " ".join(_PRINTABLE.sub("", raw).split())
                    if 6 <= len(line) <= 48 and sum(ch.isalpha() for ch in line) >= len(line) // 2:
                        lines.add(line)
            if len(lines) > 40 * n:
                break
    pool = sorted(lines)
    pick = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[i] for i in pick]


def _font(rng: np.random.Generator, size: int):
    from PIL import ImageFont

    name = C.FONTS[int(rng.integers(len(C.FONTS)))]
    path = C.FONT_DIR / name
    if not path.is_file():
        raise ModelUnavailable(f"{path}: font not found (apt-get install -y fonts-dejavu-core)")
    return ImageFont.truetype(str(path), size)


def _render_line(text: str, rng: np.random.Generator, max_wh_ratio: float | None) -> tuple[np.ndarray, str]:
    """A tight crop of one text line, BGR uint8 like cv2.imread gives rapidocr; text may be cut to fit."""
    from PIL import Image, ImageDraw

    height = int(rng.integers(*C.LINE_HEIGHT_PX))
    font = _font(rng, max(8, int(height * 0.7)))
    pad = max(2, height // 8)
    while True:
        left, top, right, bottom = font.getbbox(text)
        w, h = right - left + 2 * pad, max(bottom - top, 1) + 2 * pad
        if max_wh_ratio is None or w <= max_wh_ratio * h or len(text) <= 3:
            break
        text = text[:-1].rstrip()
    bg = tuple(int(v) for v in rng.integers(200, 256, size=3))
    fg = tuple(int(v) for v in rng.integers(0, 80, size=3))
    img = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=fg)
    rgb = np.asarray(img)
    noise = rng.normal(0.0, 4.0, size=rgb.shape)
    rgb = np.clip(rgb.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1]), text


def _render_page(lines: Iterator[str], rng: np.random.Generator) -> np.ndarray:
    """A page of text lines at several sizes, some in two columns, BGR uint8."""
    from PIL import Image, ImageDraw

    page_h, page_w = C.PAGE_SIZE
    bg = tuple(int(v) for v in rng.integers(225, 256, size=3))
    img = Image.new("RGB", (page_w, page_h), bg)
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(10, 40))
    while y < page_h - 40:
        size = int(rng.integers(14, 40))
        font = _font(rng, size)
        fg = tuple(int(v) for v in rng.integers(0, 90, size=3))
        columns = 2 if rng.random() < 0.3 else 1
        col_w = page_w // columns
        for c in range(columns):
            x = c * col_w + int(rng.integers(10, 60))
            text = next(lines)
            while text and draw.textlength(text, font=font) > col_w - (x - c * col_w) - 10:
                text = text[:-1]
            draw.text((x, y), text, font=font, fill=fg)
        y += int(size * rng.uniform(1.3, 2.2))
    rgb = np.asarray(img).astype(np.float32) + rng.normal(0.0, 3.0, size=(page_h, page_w, 3))
    return np.ascontiguousarray(np.clip(rgb, 0, 255).astype(np.uint8)[:, :, ::-1])


def _rapidocr_config() -> dict:
    from rapidocr_onnxruntime.utils import read_yaml

    import rapidocr_onnxruntime

    return read_yaml(Path(rapidocr_onnxruntime.__file__).parent / "config.yaml")


def _input_name(name: str) -> str:
    import onnx

    model = onnx.load(str(model_path(name)), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits][0]


def _cls() -> dict[str, np.ndarray]:
    """Text lines, half of them upside down (the classifier's two classes), as TextClassifier sees them."""
    from rapidocr_onnxruntime.ch_ppocr_cls.text_cls import TextClassifier

    cfg = _rapidocr_config()["Cls"]
    this = SimpleNamespace(cls_image_shape=cfg["cls_image_shape"])
    rng = np.random.default_rng(C.SEED + 1)
    texts = _text_lines(C.N_SAMPLES["cls"], C.SEED + 1)
    batch, flipped = [], []
    for text in texts:
        img, _ = _render_line(text, rng, None)
        flip = bool(rng.random() < 0.5)
        if flip:
            img = np.ascontiguousarray(img[::-1, ::-1])
        batch.append(TextClassifier.resize_norm_img(this, img))
        flipped.append(flip)
    return {_input_name("cls"): np.stack(batch).astype(np.float32), "__flipped__": np.asarray(flipped)}


def _rec() -> dict[str, np.ndarray]:
    """Text lines no wider than rapidocr's default 320x48 box, as TextRecognizer sees them."""
    from rapidocr_onnxruntime.ch_ppocr_rec.text_recognize import TextRecognizer

    cfg = _rapidocr_config()["Rec"]
    shape = cfg["rec_img_shape"]
    this = SimpleNamespace(rec_image_shape=shape)
    max_wh_ratio = shape[2] / shape[1]
    rng = np.random.default_rng(C.SEED + 2)
    batch, shown = [], []
    for text in _text_lines(C.N_SAMPLES["rec"], C.SEED + 2):
        img, text = _render_line(text, rng, float(rng.uniform(0.4, 1.0)) * max_wh_ratio)
        batch.append(TextRecognizer.resize_norm_img(this, img, max_wh_ratio))
        shown.append(text)
    return {_input_name("rec"): np.stack(batch).astype(np.float32), "__texts__": np.asarray(shown)}


def _det() -> dict[str, np.ndarray]:
    """Pages of text, through rapidocr's DetPreProcess with its default settings."""
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

    cfg = _rapidocr_config()["Det"]
    pre = DetPreProcess(cfg["limit_side_len"], cfg["limit_type"], cfg["mean"], cfg["std"])
    rng = np.random.default_rng(C.SEED + 3)
    n = C.N_SAMPLES["det"]
    lines = iter(_text_lines(n * 80, C.SEED + 3) * 4)
    pages = [pre(_render_page(lines, rng))[0] for _ in range(n)]
    if len({p.shape for p in pages}) != 1:
        raise RuntimeError(f"det pages differ in shape: {sorted({p.shape for p in pages})}")
    return {_input_name("det"): np.stack(pages).astype(np.float32)}


_BUILDERS = {"digits": _digits, "magika": _magika, "cls": _cls, "rec": _rec, "det": _det}


def main() -> None:
    """Build every cache and print a one-line summary per model (python -m benchmarks.inputs)."""
    import sys
    import time

    for name in sys.argv[1:] or C.MODELS:
        t = time.perf_counter()
        try:
            path, inputs = load_model_and_inputs(name)
        except ModelUnavailable as exc:
            print(f"{name}: unavailable: {exc}")
            continue
        shapes = {k: (v.shape, str(v.dtype)) for k, v in inputs.items()}
        print(f"{name}: {path.name} {shapes} in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
