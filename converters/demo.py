"""``moub demo``: the bundled example end to end.

A small CNN trained on scikit-learn's handwritten digits (``tools/train_demo_model.py``)
is converted with the search on its validation split, written as a .moub, loaded back
with ``moub_runtime`` and scored on the held-back test split that the search never saw.
Writes ``digits.moub``, ``report.json`` and ``pareto.png`` to ``moub-demo/`` (or ``-o DIR``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from . import options
from .errors import OutputError
from .modes import MODES

DATA = Path(__file__).resolve().parent / "data"
MODEL = DATA / "digits_cnn.onnx"
SEARCH_DATA = DATA / "digits_val.npz"
TEST_DATA = DATA / "digits_test.npz"
MAX_DROP = 0.005


def build_demo_parser(parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(prog="moub demo", description="Convert the bundled digits CNN, load it back and test it on held-back data.")
    p.add_argument("-o", "--output-dir", default="moub-demo", help="folder for digits.moub, report.json, pareto.png (default moub-demo)")
    options.add_arguments(p, names=("mode", "seed", "workers"), choices={"mode": sorted(MODES)})
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def test_accuracy(session, inputs: np.ndarray, labels: np.ndarray) -> float:
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: inputs})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def run_demo(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    import moub_runtime

    from .api import convert

    started = time.perf_counter()
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    moub_path, report_path, plot_path = out / "digits.moub", out / "report.json", out / "pareto.png"
    print(f"moub demo: {MODEL.name} ({MODEL.stat().st_size:,} bytes), search on {SEARCH_DATA.name}, test on {TEST_DATA.name}")
    result = convert(MODEL, data=SEARCH_DATA, max_drop=MAX_DROP, mode=args.mode, seed=args.seed,
                     workers=args.workers, quiet=args.quiet)
    result.write(moub_path)
    # the paper's method on the same data, for comparison (a second search of about a second)
    paper = None if args.mode == "paper" else convert(MODEL, data=SEARCH_DATA, max_drop=MAX_DROP, mode="paper",
                                                      seed=args.seed, workers=args.workers, quiet=True)

    with np.load(TEST_DATA, allow_pickle=False) as z:
        x_test, y_test = z["input"], z["labels"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    original = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
    compressed = moub_runtime.InferenceSession(moub_path)  # the file as a device loads it
    acc_original = test_accuracy(original, x_test, y_test)
    acc_compressed = test_accuracy(compressed, x_test, y_test)
    result.report["demo_test"] = {
        "mode": args.mode,
        "samples": int(y_test.size),
        "accuracy_original": round(acc_original, 6),
        "accuracy_compressed": round(acc_compressed, 6),
        "drop": round(acc_original - acc_compressed, 6),
        "within_max_drop": bool(acc_original - acc_compressed <= MAX_DROP + 1e-12),
    }
    result.write_report(report_path)
    result.write_plot(plot_path, [paper.report] if paper is not None else [])

    print()
    print(result.closing_table())
    print()
    print(f"held-back test split ({y_test.size} digits the search never saw), model loaded from {moub_path} by moub_runtime:")
    print(f"  accuracy original {acc_original:.4f}   .moub {acc_compressed:.4f}   drop {acc_original - acc_compressed:+.4f} "
          f"({'within' if acc_original - acc_compressed <= MAX_DROP + 1e-12 else 'OUTSIDE'} max drop {MAX_DROP})")
    print()
    width = max(len("stage"), *(len(row["stage"]) for row in result.report["stages"]))
    print(f"{'stage':{width}} {'bins':>6} {'bits/weight':>12} {'file bytes':>11} {'ratio':>7} {'search accuracy':>16}")
    for row in result.report["stages"]:
        quality = "" if row["quality"] is None else f"{row['quality']:.4f}"
        print(f"{row['stage']:{width}} {row['bins']:>6} {row['bits_per_weight']:>12.3f} {row['file_bytes']:>11,} "
              f"{row['file_ratio']:>6.2f}x {quality:>16}")
    if paper is not None:
        print(f"--mode paper (the paper's method) on the same data: {paper.report['file']['bytes']:,} bytes, "
              f"ratio {paper.ratio:.2f}x, val accuracy {paper.quality_compressed:.4f}")
    print()
    print(f"wrote {moub_path}, {report_path}, {plot_path} in {time.perf_counter() - started:.1f} s")
    return 0
