"""Run the original .onnx and the decoded .moub on the same inputs and compare."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnxruntime

from moub_format import DEFAULT_LIMITS, ReaderLimits

from .loader import InferenceSession


@dataclass
class OutputComparison:
    name: str
    max_abs_diff: float
    cosine: float
    top1_agreement: float | None


@dataclass
class ComparisonReport:
    samples: int
    outputs: list[OutputComparison]

    def lines(self) -> list[str]:
        out = [f"compared on {self.samples} samples:"]
        for o in self.outputs:
            agreement = f", top-1 agreement {o.top1_agreement:.4f}" if o.top1_agreement is not None else ""
            out.append(f"  output {o.name}: max |diff| {o.max_abs_diff:.6g}, cosine {o.cosine:.6f}{agreement}")
        return out


def load_inputs(data_path: str | os.PathLike, session: onnxruntime.InferenceSession) -> dict[str, np.ndarray]:
    """The npz arrays for the session's inputs, floats cast to the input's float type; one clear
    error if the file is not an .npz or an input is missing."""
    data = np.load(data_path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{data_path}: not an .npz of named arrays (one per model input)")
    with data:
        names = [i.name for i in session.get_inputs()]
        missing = [n for n in names if n not in data.files]
        if missing:
            raise ValueError(f"{data_path}: no array for model input {missing[0]!r} (has {sorted(data.files)})")
        floats = {i.name: _FLOAT_INPUTS[i.type] for i in session.get_inputs() if i.type in _FLOAT_INPUTS}
        return {n: data[n].astype(floats[n], copy=False) if n in floats and data[n].dtype.kind == "f" else data[n]
                for n in names}


_FLOAT_INPUTS = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def compare_outputs(model_path: str | os.PathLike, moub_path: str | os.PathLike, data_path: str | os.PathLike,
                    limits: ReaderLimits = DEFAULT_LIMITS) -> ComparisonReport:
    original = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    decoded = InferenceSession(moub_path, limits=limits)
    feeds = load_inputs(data_path, original)
    ref = original.run(None, feeds)
    got = decoded.run(None, feeds)
    outputs = []
    for meta, a, b in zip(original.get_outputs(), ref, got):
        a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        denom = np.linalg.norm(a64) * np.linalg.norm(b64)
        cosine = float(a64 @ b64 / denom) if denom else float(np.array_equal(a64, b64))
        top1 = None
        if np.ndim(a) >= 2 and np.shape(a)[-1] > 1:
            top1 = float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))
        diff = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
        outputs.append(OutputComparison(meta.name, diff, cosine, top1))
    samples = int(next(iter(feeds.values())).shape[0]) if feeds else 0
    return ComparisonReport(samples, outputs)
