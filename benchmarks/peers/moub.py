"""moub itself, through the converter's Python API (`moub_converters.convert`), in three rows:

    moub_paper  --mode paper, the paper's method (one global equal-width codebook, NSGA-II, merge, Huffman)
    moub_best   the best mode the converter offers: the mode named by $MOUB_BENCH_BEST_MODE, else the
                converter's default when that is not "paper", else its first other mode, else paper
                (then the row repeats paper's file rather than spending the search twice)
    moub_swept  moub_best's quantizer with its step scale chosen like the peers' knobs: on the test
                split. The peers' rows are the coarsest setting of their sweep that passes there
                (NNCodec's qp, k-means' k); moub_best is the converter's own choice on the search
                split. This row keeps everything moub_best's search chose (sensitivities, gamma,
                calibration) and bisects only x, in 1/8-octave steps from 2 octaves coarser to 1
                finer than its choice, so the quantizers compare apart from how each one chooses.

The search tunes on the search split (a converter DATA.npz); the table's fidelity is the decoded
.moub (`moub_runtime.load`) run in onnxruntime on the test split, which the converter never sees.
Each conversion runs in a subprocess (moub_worker.py) with a time limit. Besides the common
columns a moub row reports the Huffman index bits per weight against the Shannon entropy of its
index streams (per Huffman table, decoded from the file), the evaluations and the search time.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from .. import config as C
from . import Candidate, Context, Unavailable

ROWS = ("moub_paper", "moub_best", "moub_swept")
SWEPT_OCTAVES = (2.0, 1.0)  # how far moub_swept looks coarser and finer than the converter's choice
LOADER_IMPORTS = ("moub_runtime",)  # imported before loadtime.py starts its clock, like the other peers' loaders
_RESULTS: dict[tuple[str, str], list[Candidate]] = {}  # (model, mode) -> candidates, for moub_best == paper


def _converter():
    try:
        import moub_converters
        from moub_converters import convert  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"unavailable: converter not yet installed (moub_converters.convert: {exc})") from None
    return moub_converters


def modes() -> list[str]:
    """The converter's modes (`moub_converters.modes.MODES`, or a `modes`/`MODES` attribute), else paper."""
    conv = _converter()
    listed = getattr(conv, "MODES", None)
    if listed is None:
        try:
            listed = importlib.import_module("moub_converters.modes").MODES
        except (ImportError, AttributeError):
            listed = getattr(conv, "modes", None)
    if callable(listed):
        listed = listed()
    if isinstance(listed, dict):
        listed = list(listed)
    if not isinstance(listed, (list, tuple)):
        return ["paper"]
    return [str(m) for m in listed] or ["paper"]


def best_mode() -> str:
    forced = os.environ.get(C.MOUB_BEST_MODE_ENV)
    if forced:
        return forced
    conv = _converter()
    default = getattr(conv, "DEFAULT_MODE", None) or getattr(conv, "default_mode", None)
    if callable(default):
        default = default()
    if default and default != "paper":
        return str(default)
    others = [m for m in modes() if m != "paper"]
    return others[0] if others else "paper"


def method_name(row: str) -> str:
    if row == "moub_paper":
        return "moub --mode paper"
    try:
        if row == "moub_swept":
            return f"moub best (--mode {best_mode()}), step swept on the test split like the peers"
        return f"moub best (--mode {best_mode()})"
    except Unavailable:
        return "moub best mode"


METHOD = "moub"


def index_stats(path: Path) -> dict:
    """Exact Huffman index bits per weight and the Shannon entropy bound of the same streams.

    The entropy is that of each Huffman table's own index histogram (all tensors coded with that
    table), weighted by its share of the weights: the floor any code using those tables' symbol
    statistics could reach.
    """
    from moub_format import MoubFile
    from moub_format import constants as FC

    per_table: dict[int, np.ndarray] = {}
    bits = weights = 0
    with MoubFile(path) as moub:
        # Huffman-coded tensors, and packs (format 1.2: several tensors in one stream).
        streams = [t for t in moub.index.tensors if t.encoding == FC.ENCODING_HUFFMAN]
        streams += list(getattr(moub.index, "packs", ()))
        for stream in streams:
            hist = np.bincount(moub.decode_indices(stream).astype(np.int64))
            prev = per_table.get(stream.table)
            per_table[stream.table] = hist if prev is None else _add(prev, hist)
            bits += sum(int(b) for b in stream.chunk_bits)
            weights += int(hist.sum())
        codebooks = len(moub.index.codebooks)
    if not weights:
        return {}
    entropy_bits = 0.0
    for hist in per_table.values():
        p = hist[hist > 0] / hist.sum()
        entropy_bits += float(hist.sum() * -(p * np.log2(p)).sum())
    return {
        "weights": weights,
        "bits/weight": bits / weights,
        "entropy": entropy_bits / weights,
        "file bits/weight": 8 * path.stat().st_size / weights,
        "codebooks": codebooks,
        "tables": len(per_table),
    }


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = max(a.size, b.size)
    return np.pad(a, (0, n - a.size)) + np.pad(b, (0, n - b.size))


def _convert(ctx: Context, mode: str, max_drop: float, limit: int) -> Candidate:
    from ..zoo.bench import is_zoo

    zoo = is_zoo(ctx.model)
    metric = None if zoo else C.MOUB_METRICS.get(ctx.model, C.MOUB_METRIC)  # None: the converter's default
    stem = f"moub_{mode}_drop{max_drop:g}"
    out = ctx.work / f"{stem}.moub"
    summary_path = ctx.work / f"{stem}.json"
    job_path = ctx.work / f"{stem}.job.json"
    for p in (out, summary_path):
        p.unlink(missing_ok=True)
    job = {
        "model": str(ctx.onnx_path), "data": str(ctx.search_npz), "out": str(out), "summary": str(summary_path),
        "mode": mode, "metric": metric, "max_drop": max_drop, "seed": C.MOUB_SEED,
        "options": C.MOUB_SMOKE_OPTIONS if ctx.smoke else C.ZOO_MOUB_OPTIONS if zoo else C.MOUB_OPTIONS,
    }
    job_path.write_text(json.dumps(job))
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.peers.moub_worker", str(job_path)],
                              cwd=C.REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"--mode {mode} --max-drop {max_drop:g} did not finish within the {limit} s left of "
                          f"the bench's moub budget for {ctx.model}") from None
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not out.is_file() or not summary_path.is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise Unavailable(f"--mode {mode} failed (exit {proc.returncode}): {lines[-1][:200] if lines else 'no output'}")
    summary = json.loads(summary_path.read_text())
    import moub_runtime

    decoded = ctx.work / f"{stem}.onnx"
    onnx.save(moub_runtime.load(out), str(decoded))
    extra = dict(index_stats(out))
    extra["evaluations"] = summary.get("evaluations")
    search_s = summary.get("converter_wall_s") or summary.get("wall_s") or wall
    extra["search s"] = search_s
    if summary.get("peak_rss_gb") is not None:
        extra["peak RSS GB"] = summary["peak_rss_gb"]
    if (summary.get("report") or {}).get("lossless"):
        extra["note"] = f"lossless: {summary['report']['lossless']['reason']}"
    extra["metric"] = f"{metric} on the search split, max drop {max_drop:g}"
    if summary.get("quality_compressed") is not None:
        extra["search quality"] = f"{summary['quality_original']:.4f} -> {summary['quality_compressed']:.4f}"
    if summary.get("ignored_options"):
        extra["note"] = f"convert() has no option {', '.join(summary['ignored_options'])}"
    (ctx.work / f"{stem}.report.json").write_text(json.dumps(summary.get("report"), indent=1))
    setting = f"--mode {mode} --metric {metric or 'default'} --max-drop {max_drop:g}"
    return Candidate(setting, out, out.stat().st_size, search_s, decoded, extra=extra)


def run(ctx: Context, row: str = "moub_paper") -> list[Candidate]:
    """Convert with each --max-drop of MOUB_MAX_DROPS (loosest first) until the test split passes.

    The search holds the drop on the search split; the test split may lose a little more, so like
    every peer's knob the tolerance is swept, and stopped at the first file that passes (or when
    the model's moub budget is spent).
    """
    _converter()
    if row == "moub_swept":
        return _swept(ctx)
    mode = "paper" if row == "moub_paper" else best_mode()
    if row == "moub_best" and (ctx.model, mode) in _RESULTS:
        same = []
        for c in _RESULTS[(ctx.model, mode)]:
            copy = Candidate(c.setting, c.file, c.nbytes, c.encode_s, c.decoded, c.fidelity, dict(c.extra))
            why = (f"set by ${C.MOUB_BEST_MODE_ENV}" if os.environ.get(C.MOUB_BEST_MODE_ENV)
                   else "the converter offers no other mode")
            copy.extra["note"] = f"--mode {mode} ({why}): the moub_paper row's file"
            same.append(copy)
        return same
    from ..zoo.bench import is_zoo

    zoo = is_zoo(ctx.model)
    drops = C.ZOO_MOUB_MAX_DROPS if zoo else C.MOUB_MAX_DROPS_BY_MODEL.get(ctx.model, C.MOUB_MAX_DROPS)
    drops = drops[:1] if ctx.smoke else drops
    budget = (C.MOUB_SMOKE_TIMEOUT_S if ctx.smoke else C.ZOO_MOUB_BUDGET_S if zoo
              else C.MOUB_BUDGET_S.get(ctx.model, 600))
    started = time.perf_counter()
    done: list[Candidate] = []
    for drop in drops:
        left = budget - (time.perf_counter() - started)
        if done and left < 0.8 * done[-1].encode_s:  # a stricter search takes about as long
            done[-1].extra["note"] = (f"sweep stopped: the next --max-drop would not fit the bench's {budget} s "
                                      f"budget for {ctx.model}")
            break
        try:
            cand = _convert(ctx, mode, drop, max(30, int(left)))
        except Unavailable:
            if not done:
                raise
            break
        cand.fidelity = ctx.evaluate(cand.decoded)
        done.append(cand)
        if ctx.passes(cand.fidelity):
            break
    _RESULTS[(ctx.model, mode)] = done
    return done


def _swept(ctx: Context) -> list[Candidate]:
    """moub_best's conversion rebuilt at other step scales x (``Replay``), bisected on the test split."""
    from moub_converters.replay import Replay
    from moub_converters.step_search import X_RESOLUTION
    from moub_format import MoubFile

    import moub_runtime

    from . import sweep

    mode = best_mode()
    # this run's conversions only: another run in the same process wrote elsewhere
    done = [c for c in _RESULTS.get((ctx.model, mode), []) if c.file.parent.parent == ctx.work.parent]
    if not done:
        raise Unavailable("needs the moub_best row of the same run (its conversion's report)")
    base = next((c for c in done if ctx.passes(c.fidelity)), done[-1])
    report = json.loads(base.file.with_suffix(".report.json").read_text())
    if report.get("settings", {}).get("mode") != "adaptive":
        raise Unavailable(f"--mode {mode} has no step scale to sweep")
    if "x" not in report.get("choice", {}).get("recipe", {}):
        raise Unavailable(f"the default wrote its lossless file ({report.get('lossless', {}).get('reason', 'no search')}): "
                          "no step scale to sweep")
    t = time.perf_counter()
    replay = Replay.from_report(onnx.load(str(ctx.onnx_path)), ctx.search_npz, report)
    calibration_s = time.perf_counter() - t
    with MoubFile(base.file) as moub:  # the converter's own provenance: only the weights differ
        metadata = dict(moub.index.metadata)
    x0, gamma = report["choice"]["recipe"]["x"], report["choice"]["recipe"]["gamma"]
    coarser, finer = (int(o * X_RESOLUTION) for o in SWEPT_OCTAVES)
    xs = [x0 + k / X_RESOLUTION for k in range(coarser, -finer - 1, -1)]  # smallest file first

    def one(x: float) -> Candidate:
        started = time.perf_counter()
        out = ctx.work / f"moub_swept_x{x:+.4f}.moub"
        out.write_bytes(replay.encode(x, gamma, metadata))
        encode_s = time.perf_counter() - started
        decoded = out.with_suffix(".onnx")
        onnx.save(moub_runtime.load(out), str(decoded))
        extra = dict(index_stats(out))
        extra["search s"] = calibration_s
        extra["note"] = (f"x {x - x0:+.3f} octaves from the converter's choice ({base.setting}), picked on the "
                         f"test split; search s: the calibration, measured again")
        return Candidate(f"x={x:+.4f} gamma={gamma:g}", out, out.stat().st_size, encode_s, decoded, extra=extra)

    return sweep(ctx, xs, one, bisect=True)


def load_session(path: Path):
    import moub_runtime

    return moub_runtime.InferenceSession(path)
