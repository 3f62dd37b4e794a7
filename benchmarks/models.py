"""Where each benchmark model lives: the demo model in the repository, the rest inside PyPI wheels."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .config import REPO

DIGITS_MODEL = REPO / "converters" / "data" / "digits_cnn.onnx"
DIGITS_DATA = REPO / "converters" / "data" / "digits_test.npz"

_RAPIDOCR_FILES = {
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "det": "ch_PP-OCRv4_det_infer.onnx",
}

TITLES = {
    "digits": "demo digits CNN",
    "magika": "magika",
    "cls": "rapidocr cls",
    "rec": "PP-OCRv4 rec",
    "det": "PP-OCRv4 det",
}


class ModelUnavailable(RuntimeError):
    """A model's wheel or file is missing; the harness turns this into a row that says so."""


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelUnavailable(f"package {package} is not installed (pip install '.[bench]')")
    return Path(spec.origin).parent


def model_path(name: str) -> Path:
    """Path of the fp32 .onnx for a benchmark model name."""
    if name == "digits":
        path = DIGITS_MODEL
    elif name == "magika":
        path = package_dir("magika") / "models" / "standard_v3_3" / "model.onnx"
    elif name in _RAPIDOCR_FILES:
        path = package_dir("rapidocr_onnxruntime") / "models" / _RAPIDOCR_FILES[name]
    else:
        raise KeyError(f"unknown benchmark model {name!r}")
    if not path.is_file():
        raise ModelUnavailable(f"{path}: model file not found")
    return path
