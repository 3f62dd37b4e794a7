"""Flips on both halves of the search data and on the bench's test split, for fixed (x, gamma).

Run (after ``make bench``, which writes the search split and the adaptive report):
    .venv/bin/python experiments/sweep_steps.py [--no-error-feedback] cls 0.5,1.0 -- -3.0,-2.75,-2.5

For each gamma and x of the adaptive mode's grid (the report's measured sensitivities,
the same calibration the converter uses) it prints the index bits/weight and the samples
whose top-1 changes on the search half, the confirm half and the test split. Why: on
rapidocr cls the flips are not monotone in the step (at 5.3-6.6 bits/weight the 300
test samples lose 1 to 7), so which candidate passes the 99% bar there is mostly chance
(docs/decisions/0013-confirm-gap-fill.md, 0016-wide-kernel-error-feedback.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.inputs import load_model_and_inputs  # noqa: E402
from benchmarks.models import model_path  # noqa: E402
from moub_converters.data import load_dataset  # noqa: E402
from moub_converters.evaluate import Evaluator, Scorer, reference_outputs  # noqa: E402
from moub_converters.intake import load_source, pool_weights  # noqa: E402
from moub_converters.options import ConvertOptions  # noqa: E402
from moub_converters.session import ConversionSession  # noqa: E402
from moub_converters.step_layout import layout  # noqa: E402
from moub_converters.uniform import site_arrays  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "out" / "full"


def top1_flips(outputs: np.ndarray, reference: np.ndarray) -> int:
    flat = lambda a: a.reshape(-1, a.shape[-1]).argmax(-1)  # noqa: E731
    return int((flat(outputs) != flat(reference)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("gammas")
    ap.add_argument("xs")
    ap.add_argument("--no-error-feedback", action="store_true")
    args = ap.parse_args()
    feedback = not args.no_error_feedback
    report = json.loads(next((OUT / args.model / "moub_best").glob("*.report.json")).read_text())
    log2_opt = np.array(report["search"]["log2_optimal_step"])
    options = ConvertOptions(metric="agreement", min_elements=16, error_feedback=feedback).validated()
    source = load_source(str(model_path(args.model)), None)
    pool = pool_weights(source.model, 16)
    data = load_dataset(OUT / args.model / "search.npz", source.model)
    evaluator = Evaluator(source.model, pool, data)
    reference = reference_outputs(evaluator, source.model, args.model)
    session = ConversionSession(source.model, pool, data, "agreement", reference, 1.0, options, evaluator.strategy)
    session.use_scorer(Scorer(evaluator, "agreement", reference, None, 1.0))
    test_data = load_dataset(load_model_and_inputs(args.model, "test")[1], source.model)
    test_evaluator = Evaluator(source.model, pool, test_data)
    test_reference = reference_outputs(test_evaluator, source.model, args.model)
    calib, stats = session.calibration, session.site_stats
    for gamma in (float(g) for g in args.gammas.split(",")):
        for x in (float(v) for v in args.xs.split(",")):
            lay = layout(pool, stats, log2_opt, x, gamma, calib, feedback=feedback)
            arrays = site_arrays(pool, lay.levels, lay.steps)
            row = {"x": x, "gamma": gamma, "bits_per_weight": round(lay.bits / pool.n_weights, 3)}
            for split in ("search", "confirm"):
                scorer = session.half(split)
                row[split] = round(scorer.score(arrays).loss * scorer.total_units)
            row["test"] = top1_flips(test_evaluator.outputs(arrays)[0], test_reference[0])
            row["test_samples"] = int(np.prod(test_reference[0].shape[:-1]))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
