"""Cold start: process start to a ready session, ``.moub`` against the plain ``.onnx``.

Each run is a fresh interpreter that imports what it needs and creates one session; the clock
runs from just before the process is spawned to the moment the session exists (the child
prints ``time.time()`` then), so it covers the interpreter, every import and the load. What a
device does at boot, where the imports are not amortised over anything.

    .venv/bin/python -m benchmarks.coldstart [--models magika,cls] [--repeats 7]

Bytecode is cached (PYCACHE), as an installed wheel has it. Rows: plain onnxruntime (``import onnxruntime``; ``onnxruntime.InferenceSession(model.onnx)``),
moub (``import moub_runtime``; ``moub_runtime.InferenceSession(model.moub)``) and moub compact
(``compact=True``); best and median of ``--repeats`` runs, interleaved, and whether ``onnx`` was
imported on the way. Target: moub at most 1.5x plain onnxruntime. The files are those of
:mod:`benchmarks.runtime` (``prepare_adaptive``: a grid per tensor, as the adaptive mode writes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TARGET_RATIO = 1.5
# Bytecode of the checkout's modules, kept between runs: an installed wheel has its .pyc files
# (pip compiles them at install), as onnxruntime and numpy do here; compiling moub's sources at
# every start (PYTHONDONTWRITEBYTECODE) would cost more than their import does.
PYCACHE = ROOT / ".cache" / "pycache"

_CHILD = r"""
import sys, time
kind, path = sys.argv[1], sys.argv[2]
if kind == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
else:
    import moub_runtime
    session = moub_runtime.InferenceSession(path, **({"compact": True} if kind == "compact" else {}))
ready = time.time()
print(ready, "onnx" in sys.modules)
"""

KINDS = ("onnx", "moub", "compact")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(kind: str, path: Path, python: str = sys.executable, root: Path = ROOT.parent) -> tuple[float, float, bool]:
    """Wall seconds from spawning a fresh interpreter to its ready session, the CPU seconds of
    the whole process (all threads, to its exit: what other load on the machine does not
    inflate), and whether it imported onnx. ``python``/``root``: the interpreter and checkout
    to run (another checkout's, for a before/after)."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONPYCACHEPREFIX=str(PYCACHE))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    cpu = _children_cpu()
    start = time.time()
    result = subprocess.run([python, "-c", _CHILD, kind, str(path)], capture_output=True, text=True, env=env, check=True, cwd=root)
    ready, onnx_imported = result.stdout.split()
    return float(ready) - start, _children_cpu() - cpu, onnx_imported == "True"


def measure(name: str, repeats: int, kinds: Sequence[str] = KINDS) -> dict:
    from .runtime import prepare_adaptive

    onnx_path, moub_path = prepare_adaptive(name)
    paths = {"onnx": onnx_path, "moub": moub_path, "compact": moub_path}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    cpus: dict[str, list[float]] = {kind: [] for kind in kinds}
    imported: dict[str, bool] = {}
    for kind in kinds:  # writes the bytecode; not timed
        one_run(kind, paths[kind])
    for _ in range(repeats):
        for kind in kinds:
            seconds, cpu, onnx_imported = one_run(kind, paths[kind])
            times[kind].append(seconds)
            cpus[kind].append(cpu)
            imported[kind] = onnx_imported
    row: dict = {"model": name}
    for kind in kinds:
        row[kind] = {"best_s": min(times[kind]), "median_s": statistics.median(times[kind]), "best_cpu_s": min(cpus[kind]),
                     "imports_onnx": imported[kind]}
    for kind in [k for k in kinds if k != "onnx"]:
        row[f"{kind}_ratio_best"] = row[kind]["best_s"] / row["onnx"]["best_s"]
        row[f"{kind}_ratio_median"] = row[kind]["median_s"] / row["onnx"]["median_s"]
        row[f"{kind}_ratio_cpu"] = row[kind]["best_cpu_s"] / row["onnx"]["best_cpu_s"]
    return row


def format_table(rows: list[dict]) -> list[str]:
    lines = [f"{'model':8} {'kind':8} {'best ms':>8} {'median ms':>10} {'CPU ms':>7} {'x onnx (best/median/CPU)':>25} {'imports onnx':>13}"]
    for r in rows:
        for kind in [k for k in KINDS if k in r]:
            ratio = "" if kind == "onnx" else (f"{r[f'{kind}_ratio_best']:.2f} / {r[f'{kind}_ratio_median']:.2f} / "
                                               f"{r[f'{kind}_ratio_cpu']:.2f}")
            lines.append(f"{r['model']:8} {kind:8} {r[kind]['best_s'] * 1e3:8.0f} {r[kind]['median_s'] * 1e3:10.0f} "
                         f"{r[kind]['best_cpu_s'] * 1e3:7.0f} {ratio:>25} {str(r[kind]['imports_onnx']):>13}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.coldstart", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="magika,cls")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--out", default=str(ROOT / "out" / "coldstart.json"))
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if "onnx" not in kinds:
        parser.error("--kinds must include onnx (the reference)")
    rows = [measure(name, args.repeats, kinds) for name in args.models.split(",") if name]
    for line in format_table(rows):
        print(line)
    print(f"target: moub at most {TARGET_RATIO}x plain onnxruntime, process start to a ready session")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "load_average": os.getloadavg(), "cpus": os.cpu_count()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
