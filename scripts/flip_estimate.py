"""How many top-1 flips a step scale really costs: counted flips beside a smooth estimate.

Run after ``make bench`` (it reads the bench's moub_best report and search split):
    .venv/bin/python scripts/flip_estimate.py magika [cls ...]

For each step scale ``x`` on the 1/8-octave grid from half an octave finer to two octaves
coarser than the converter's choice (its gamma kept), the conversion is rebuilt
(``Replay``) and run on the search split and on the test split. Printed per x: the flips
counted on the search split (and on the halves the converter searches and confirms on), the flips counted on the test split, and
the flips *expected* on 500 unseen samples, estimated from the search split.

Why: the converter and the bench judge a file by how many samples change their top-1, and
near the 99% bar that is 2 or 3 samples of 250. Counting is unbiased but noisy: on magika
the test split's count does not even fall monotonically with the step. The estimate uses
every sample instead of the few that flip. Each sample's margin m_i (top-1 minus runner-up
log-score of the original) is set against the change d_j the quantized weights make to that
margin across all samples j: expected flip rate = mean over i of P(d >= m_i), with P taken
from the d_j (``pairs``) or from a normal law of their RMS (``normal``). It assumes the
change does not depend on the margin, so it is a yardstick, not a rule the converter uses.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from scipy.stats import norm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.inputs import load_model_and_inputs  # noqa: E402
from moub_converters.data import Dataset, load_dataset  # noqa: E402
from moub_converters.evaluate import Evaluator, original_arrays  # noqa: E402
from moub_converters.modes.adaptive import X_RESOLUTION, Replay  # noqa: E402
from moub_converters.uniform import site_arrays  # noqa: E402

PER = 500  # expected flips are quoted per this many units (the size of the bench's test split)


def log_scores(evaluator: Evaluator, arrays: dict) -> np.ndarray:
    """The first output as [units, classes]; probabilities become log-probabilities."""
    y = evaluator.outputs(arrays)[0].astype(np.float64)
    y = y.reshape(-1, y.shape[-1])
    if (y >= 0).all() and np.allclose(y.sum(-1), 1.0, atol=1e-3):
        return np.log(np.maximum(y, 1e-30))
    return y


def expected_flips(original: np.ndarray, quantized: np.ndarray) -> tuple[float, float]:
    """(pairs, normal) estimates of the flip rate on unseen samples; see the module docstring."""
    rows = np.arange(original.shape[0])
    order = np.argsort(original, axis=-1)
    top, runner = order[:, -1], order[:, -2]
    margin = original[rows, top] - original[rows, runner]
    change = (quantized[rows, runner] - quantized[rows, top]) - (original[rows, runner] - original[rows, top])
    at_least = change.size - np.searchsorted(np.sort(change), margin, side="left")  # j with d_j >= m_i
    pairs = float(np.mean(at_least / change.size))
    rms = float(np.sqrt(np.mean(change ** 2)))
    normal = float(norm.sf(margin / rms).mean()) if rms > 0 else 0.0
    return pairs, normal


def main(models: list[str]) -> None:
    for name in models:
        work = REPO / "benchmarks" / "out" / "full" / name
        report_path = next(iter(sorted((work / "moub_best").glob("*.report.json"))), None)
        if report_path is None:
            raise SystemExit(f"{work / 'moub_best'}: no report; run make bench first")
        report = json.loads(report_path.read_text())
        model_path, test_inputs = load_model_and_inputs(name, "test")
        model = onnx.load(str(model_path))
        replay = Replay.from_report(model, work / "search.npz", report)
        datasets = {"search": load_dataset(work / "search.npz", model, batch_size=8),  # the converter's order
                    "test": Dataset(test_inputs, None, len(next(iter(test_inputs.values()))), 8)}
        evaluators = {split: Evaluator(model, replay.pool, ds) for split, ds in datasets.items()}
        originals = {split: log_scores(ev, original_arrays(model, replay.pool)) for split, ev in evaluators.items()}
        x0, gamma = report["choice"]["recipe"]["x"], report["choice"]["recipe"]["gamma"]
        print(f"{name}: the converter chose x={x0:+.4f} gamma={gamma:g} ({report_path.name}); "
              f"{len(originals['search'])} search units, {len(originals['test'])} test units")
        for k in range(-X_RESOLUTION // 2, 2 * X_RESOLUTION + 1):
            x = x0 + k / X_RESOLUTION
            lay = replay.layout(x, gamma)
            arrays = site_arrays(replay.pool, lay.levels, lay.steps)
            got = {split: log_scores(ev, arrays) for split, ev in evaluators.items()}
            flips = {split: got[split].argmax(-1) != originals[split].argmax(-1) for split in got}
            pairs, normal = expected_flips(originals["search"], got["search"])
            bits = lay.bits / replay.pool.n_weights
            per_sample = flips["search"].reshape(datasets["search"].n_samples, -1)  # rec: a row of time steps
            print(f"  x={x:+.4f} {bits:5.2f} bits/weight  search flips {int(flips['search'].sum()):3d} "
                  f"(halves {int(per_sample[0::2].sum())}, {int(per_sample[1::2].sum())})  "
                  f"expected per {PER} units: pairs {PER * pairs:5.1f} normal {PER * normal:5.1f}  "
                  f"test flips {int(flips['test'].sum()):3d} of {flips['test'].size}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["magika"])
