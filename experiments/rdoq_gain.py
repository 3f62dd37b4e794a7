"""What rate-distortion-optimised rounding (NNCodec's RDOQ idea) would save on one tensor.

Run: .venv/bin/python experiments/rdoq_gain.py [magika|cls|rec|det] [TENSOR-NAME-SUFFIX]

For a grid of uniform steps it rounds the tensor to the nearest level (what moub does) and
with RDOQ: each weight takes the lower or upper neighbouring level, whichever costs less
in ``(w - level * step)^2 / step^2 + lambda * codelength``, the code lengths being the
ideal ones (-log2 p) of the levels' own histogram, iterated 4 times. It prints each
point's entropy and weight MSE, and how many bits nearest rounding needs for the same MSE
(interpolated in log MSE between its own points). Why: on magika's Conv_0 (84% of its
weights, at 4.5 to 6.5 bits/weight) it saves at most 0.007 bits/weight at equal MSE:
entropy-coded uniform rounding is already close to the best scalar quantizer at these rates
(docs/decisions/0017-rdoq.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.models import model_path  # noqa: E402

LAMBDAS = (0.02, 0.05, 0.1, 0.2)
ROUNDS = 4


def entropy(levels: np.ndarray) -> float:
    _, counts = np.unique(levels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def rdoq(w: np.ndarray, step: float, lam: float) -> np.ndarray:
    levels = np.rint(w / step)
    lower = np.floor(w / step)
    for _ in range(ROUNDS):
        values, counts = np.unique(levels, return_counts=True)
        lengths = -np.log2(counts / counts.sum())

        def cost(candidate: np.ndarray) -> np.ndarray:
            at = np.clip(np.searchsorted(values, candidate), 0, values.size - 1)
            length = np.where(values[at] == candidate, lengths[at], 32.0)  # a level not yet used: a long code
            return (w - candidate * step) ** 2 / step**2 + lam * length

        levels = np.where(cost(lower) <= cost(lower + 1), lower, lower + 1)
    return levels


def main(argv: list[str]) -> None:
    name = argv[0] if argv else "magika"
    suffix = argv[1] if len(argv) > 1 else "Conv_0/transpose_3:0"
    model = onnx.load(str(model_path(name)))
    tensor = next(t for t in model.graph.initializer if t.name.endswith(suffix))
    w = numpy_helper.to_array(tensor).astype(np.float64).ravel()
    rows, nearest = [], []
    for step in np.exp2(np.linspace(-7.5, -5.5, 9)) * w.std() / 0.12:
        q = np.rint(w / step)
        nearest.append((entropy(q), float(((w - q * step) ** 2).mean())))
        rows.append(("nearest", step, *nearest[-1]))
        for lam in LAMBDAS:
            q = rdoq(w, step, lam)
            rows.append((f"rdoq {lam:g}", step, entropy(q), float(((w - q * step) ** 2).mean())))
    bits, mse = (np.array(v) for v in zip(*sorted(nearest)))
    print(f"{name} {tensor.name}: {w.size} weights")
    for label, step, h, d in rows:
        needed = float(np.interp(np.log(d), np.log(mse[::-1]), bits[::-1]))
        print(f"{label:10} step {step:.5f}  entropy {h:.3f}  mse {d:.3e}  nearest needs {needed:.3f}  saving {needed - h:+.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
