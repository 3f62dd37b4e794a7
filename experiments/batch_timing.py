"""Seconds per search-half evaluation at several batch sizes, and whether the outputs differ.

Run after ``make bench`` (it reads the bench's search split):
    .venv/bin/python experiments/batch_timing.py rec magika cls det

Why: ``converters/data.DEFAULT_BATCH_SIZE`` (2) rests on these figures. With one onnxruntime
thread small batches keep the activations in cache. The outputs should be the same bits, or the
batch size changes what the search sees: they are from 64 down to 2 samples on the bench's
models; one sample takes other kernels on magika (outputs within 3.6e-3, no top-1 changed).
The figures: docs/decisions/0021-batch-size.md.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.models import model_path  # noqa: E402
from moub_converters.data import Dataset  # noqa: E402
from moub_converters.evaluate import Evaluator, original_arrays  # noqa: E402
from moub_converters.intake import pool_weights  # noqa: E402

SIZES = (64, 16, 4, 2, 1)
REPEATS = 5


def main(models: list[str]) -> None:
    for name in models:
        model = onnx.load(str(model_path(name)))
        pool = pool_weights(model, 16)
        with np.load(REPO / "benchmarks" / "out" / "full" / name / "search.npz") as npz:
            inputs = {k: npz[k][0::2] for k in npz.files if k != "labels"}  # one half, as the search runs
        n = len(next(iter(inputs.values())))
        arrays = original_arrays(model, pool)
        evaluators = {size: Evaluator(model, pool, Dataset(inputs, None, n, size)) for size in SIZES}
        outputs = {size: ev.outputs(arrays) for size, ev in evaluators.items()}  # also warms each session path
        differ = {size: max(float(np.max(np.abs(a.astype(np.float64) - b))) if a.shape == b.shape else float("inf")
                            for a, b in zip(outputs[size], outputs[SIZES[0]])) for size in SIZES[1:]}
        best = {size: float("inf") for size in SIZES}
        for _ in range(REPEATS):
            for size, ev in evaluators.items():
                started = time.perf_counter()
                ev.outputs(arrays)
                best[size] = min(best[size], time.perf_counter() - started)
        times = " / ".join(f"{best[s]:.2f}" for s in SIZES)
        diffs = ", ".join(f"{size}: {'same bits' if d == 0 else f'max |diff| {d:.2g}'}" for size, d in differ.items())
        print(f"{name}: {n} samples, seconds at batch {' / '.join(map(str, SIZES))}: {times}; "
              f"outputs against batch {SIZES[0]}: {diffs}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["cls"])
