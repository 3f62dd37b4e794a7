"""`make bench`: moub beside its peers on real models, measured in one run.

    python -m benchmarks.run            # every model and method -> benchmarks/RESULTS.md, results.png
    python -m benchmarks.run --smoke    # the demo model, cheap settings -> benchmarks/out/smoke/
    python -m benchmarks.run --models rec --peers nncodec,moub_best --out /tmp/b   # a slice
    MOUB_BENCH_BEST_MODE=adaptive python -m benchmarks.run ...   # choose the moub_best row's mode

For every model: the fp32 original, then each method of peers.PEERS (a sweep stops at the first
setting that keeps >= 99% fidelity). Every row's fidelity comes from running its decoded model in
onnxruntime on the test split; its load time and peak RSS from fresh subprocesses. A method that
cannot run gets a row that says why. Then the headline table (smallest passing file of each method
per model), the plot, and the runtime section (benchmarks/runtime.py, where it exists).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import importlib.util
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as C
from .models import TITLES, ModelUnavailable
from .zoo import ZOO
from .peers import PEERS, Candidate, Context, Unavailable, module


@dataclass
class Row:
    model: str
    peer: str  # "original" or a key of PEERS
    method: str
    setting: str = ""
    nbytes: int | None = None
    ratio: float | None = None
    fidelity: Any = None  # fidelity.Fidelity
    passes: bool = False
    encode_s: float | None = None
    load_s: float | None = None
    rss_mb: float | None = None
    extra: dict = field(default_factory=dict)
    error: str | None = None  # why there are no numbers


@dataclass
class ModelResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    error: str | None = None
    onnx_bytes: int | None = None
    n_test: int | None = None
    reference: Any = None
    seconds: dict[str, float] = field(default_factory=dict)  # per peer, encode + evaluate + load timing


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- measuring

def method_name(peer: str) -> str:
    if peer == "original":
        return "fp32 original (.onnx)"
    mod = module(peer)
    if peer.startswith("moub_"):
        return mod.method_name(peer)
    return mod.METHOD


def time_load(peer: str, path: Path, repeats: int) -> tuple[float | None, float | None, str | None]:
    """(best seconds, peak RSS MB of that run, error) over fresh subprocesses."""
    best: tuple[float, float] | None = None
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.loadtime", peer, str(path)],
                              cwd=C.REPO, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            return None, None, f"load failed: {lines[-1][:160] if lines else proc.returncode}"
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        if best is None or out["seconds"] < best[0]:
            best = (out["seconds"], out["peak_rss_mb"])
    assert best is not None
    return best[0], best[1], None


def bench_model(name: str, peers: list[str], smoke: bool, repeats: int, work_root: Path) -> ModelResult:
    from .fidelity import Evaluator
    from .inputs import write_npz

    from .zoo import ZooUnavailable
    from .zoo.bench import ZooEvaluator, is_zoo

    res = ModelResult(name)
    try:
        ev = ZooEvaluator(name) if is_zoo(name) else Evaluator(name, max_samples=C.SMOKE_MAX_TEST if smoke else None)
    except (ModelUnavailable, ZooUnavailable) as exc:
        res.error = f"unavailable: {exc}"
        return res
    res.onnx_bytes = ev.onnx_path.stat().st_size
    res.n_test = ev.n
    res.reference = ev.reference
    root = work_root / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    search_npz = ev.search_data(root / "data") if is_zoo(name) else write_npz(name, root / "search.npz", "search")

    t = time.perf_counter()
    load_s, rss, err = time_load("original", ev.onnx_path, repeats)
    res.rows.append(Row(name, "original", method_name("original"), "as shipped", res.onnx_bytes, 1.0,
                        ev.reference, True, None, load_s, rss, error=err))
    res.seconds["original"] = time.perf_counter() - t

    for peer in peers:
        t = time.perf_counter()
        work = root / peer
        work.mkdir()
        ctx = Context(name, ev.onnx_path, work, ev.evaluate, ev.passes, search_npz, smoke, ev.reference)
        try:
            method = method_name(peer)
        except Exception as exc:  # noqa: BLE001 - a broken peer module still gets its row
            method = peer
        try:
            mod = module(peer)
            cands: list[Candidate] = mod.run(ctx, peer) if peer.startswith("moub_") else mod.run(ctx)
        except Unavailable as exc:
            res.rows.append(Row(name, peer, method, error=str(exc)))
            log(f"  {name:7s} {peer:11s} {exc}")
            res.seconds[peer] = time.perf_counter() - t
            continue
        except Exception as exc:  # noqa: BLE001 - the reason goes into the table
            traceback.print_exc()
            msg = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            res.rows.append(Row(name, peer, method, error=msg))
            log(f"  {name:7s} {peer:11s} {msg}")
            res.seconds[peer] = time.perf_counter() - t
            continue
        rows = []
        for cand in cands:
            fid = cand.fidelity
            rows.append(Row(name, peer, method, cand.setting, cand.nbytes, res.onnx_bytes / cand.nbytes, fid,
                            bool(fid is not None and ev.passes(fid)), cand.encode_s, extra=dict(cand.extra)))
        key = _key_row(rows)
        for row, cand in zip(rows, cands):
            # Best of `repeats` processes for the row the headline quotes, one process for the rest
            # of a sweep (its load time hardly depends on the setting).
            row.load_s, row.rss_mb, row.error = time_load(peer, cand.file, repeats if row is key else 1)
            fid = row.fidelity
            res.rows.append(row)
            log(f"  {name:7s} {peer:11s} {cand.setting:28s} {row.ratio:6.2f}x  "
                f"{fid.describe() if fid else '-':44s} {'PASS' if row.passes else 'fail'}")
        res.seconds[peer] = time.perf_counter() - t
    return res


def _key_row(rows: list[Row]) -> Row | None:
    """The row a method's headline cell quotes: its smallest passing file, else its best fidelity."""
    passing = [r for r in rows if r.passes and r.nbytes]
    if passing:
        return min(passing, key=lambda r: r.nbytes)
    scored = [r for r in rows if r.fidelity is not None]
    return max(scored, key=lambda r: r.fidelity.value) if scored else None


# ----------------------------------------------------------------------------- reporting

def headline(res: ModelResult, peer: str) -> tuple[str, Row | None]:
    """The cell of the headline table: the smallest passing file of a method, or why there is none."""
    if res.error:
        return "model unavailable", None
    rows = [r for r in res.rows if r.peer == peer]
    if not rows:
        return "not run", None
    if all(r.error and r.nbytes is None for r in rows):
        return rows[0].error or "no result", None
    passing = [r for r in rows if r.passes and r.nbytes]
    if passing:
        best = min(passing, key=lambda r: r.nbytes)
        return f"**{best.ratio:.2f}** ({_pct(best.fidelity.value)}, {best.setting})", best
    scored = [r for r in rows if r.fidelity is not None]
    top = max(scored, key=lambda r: r.fidelity.value)
    return f"fails (best {_pct(top.fidelity.value)} at {top.ratio:.2f})", None


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _notes(row: Row) -> str:
    e = row.extra
    parts = []
    if "entropy" in e and row.peer.startswith("moub_"):
        parts.append(f"index {e['bits/weight']:.3f} bits/weight vs entropy {e['entropy']:.3f}")
        if "file bits/weight" in e:
            parts.append(f"file {e['file bits/weight']:.3f} bits/weight")
        if e.get("evaluations") is not None:
            parts.append(f"{e['evaluations']} evaluations")
        if e.get("search s") is not None:
            parts.append(f"search {e['search s']:.1f} s")
        if e.get("peak RSS GB") is not None:
            parts.append(f"converter peak RSS {e['peak RSS GB']:.2f} GB")
    elif "bits/weight" in e:
        b = f"{e['bits/weight']:.3f} bits/weight"
        if "entropy" in e:
            b += f" (entropy {e['entropy']:.3f})"
        parts.append(b)
    if "clusters used" in e:
        parts.append(f"{e['clusters used']} clusters used")
    if "search quality" in e:
        parts.append(f"search-split {e['search quality']}")
    if "note" in e:
        parts.append(e["note"])

    if row.error and row.nbytes is not None:
        parts.append(row.error)
    return "; ".join(parts)


def model_table(res: ModelResult) -> list[str]:
    title = TITLES.get(res.name, res.name)
    if res.error:
        return [f"## {res.name}: {title}", "", res.error, ""]
    rule = ("accuracy within 1 point of fp32" if res.name == "digits"
            else f"{res.reference.metric} ≥ {100 * C.FIDELITY_TARGET:.0f}%")
    lines = [
        f"## {res.name}: {title}",
        "",
        f"fp32 .onnx {res.onnx_bytes:,} bytes; {res.n_test} test samples; fp32 {res.reference.describe()}; "
        f"pass rule: {rule}.",
        "",
        "| method | setting | file bytes | ratio | fidelity | other | ≥99% | encode s | load s | peak RSS MB | notes |",
        "|---|---|---:|---:|---:|---|:---:|---:|---:|---:|---|",
    ]
    for r in res.rows:
        if r.nbytes is None:
            lines.append(f"| {r.method} | – | – | – | – | – | – | – | – | – | {r.error} |")
            continue
        fid = _pct(r.fidelity.value) if r.fidelity else "–"
        other = ", ".join(f"{k} {_pct(v)}" for k, v in (r.fidelity.extra.items() if r.fidelity else []))
        lines.append(
            f"| {r.method} | {r.setting} | {r.nbytes:,} | {r.ratio:.2f} | {fid} | {other} | "
            f"{'yes' if r.passes else 'no'} | {_num(r.encode_s, '.2f')} | {_num(r.load_s, '.3f')} | "
            f"{_num(r.rss_mb, '.0f')} | {_notes(r)} |")
    spent = ", ".join(f"{p} {s:.0f} s" for p, s in res.seconds.items())
    lines += ["", f"Wall time per method (encode, evaluate, time loads): {spent}.", ""]
    return lines


def headline_table(results: list[ModelResult], peers: list[str]) -> list[str]:
    names = [r.name for r in results]
    lines = [
        "| method | " + " | ".join(f"{n} ({TITLES.get(n, n)})" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for peer in peers:
        method = next((row.method for res in results for row in res.rows if row.peer == peer), peer)
        cells = [headline(res, peer)[0].replace("|", "/") for res in results]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


SHORT = {"zstd": "zstd -19", "fp16": "fp16", "int8": "ORT int8", "kmeans": "k-means+Huffman",
         "nncodec": "NNCodec", "moub_paper": "moub paper", "moub_best": "moub best", "moub_swept": "moub best, x swept"}


def readme_summary(results: list[ModelResult], peers: list[str]) -> list[str]:
    """A compact model x method table of headline ratios for the README (written to out/)."""
    lines = ["| model (fp32 .onnx) | " + " | ".join(SHORT.get(p, p) for p in peers) + " |",
             "|---|" + "---:|" * len(peers)]
    for res in results:
        label = f"{TITLES.get(res.name, res.name)} ({res.onnx_bytes / 1e6:.2f} MB)" if res.onnx_bytes else res.name
        cells = []
        for peer in peers:
            text, best = headline(res, peer)
            if best is not None:
                cells.append(f"{best.ratio:.2f}×")
            elif text.startswith("fails"):
                cells.append(text.split(" at ")[0].replace("fails (best ", "fails (") + ")")
            else:
                cells.append("n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


OTHER_PEERS = ("zstd", "fp16", "int8", "kmeans", "nncodec")


def default_over_best_peer(results: list[ModelResult]) -> list[str]:
    """Per model: moub's default row (moub_best) against the best other method at the fidelity rule,
    with the converter's wall time and peak RSS."""
    lines = ["| model | moub default | best peer | moub default ÷ best peer | converter s | converter peak RSS GB |",
             "|---|---:|---|---:|---:|---:|"]
    for res in results:
        _, mine = headline(res, "moub_best")
        best = max((row for peer in OTHER_PEERS if (row := headline(res, peer)[1]) is not None),
                   key=lambda r: r.ratio, default=None)
        conversions = [r for r in res.rows if r.peer == "moub_best" and r.nbytes]
        e = conversions[-1].extra if conversions else {}
        lines.append(f"| {res.name} | {f'{mine.ratio:.2f}' if mine else 'fails'} | "
                     f"{f'{SHORT.get(best.peer, best.peer)} {best.ratio:.2f}' if best else '–'} | "
                     f"{f'{mine.ratio / best.ratio:.2f}' if mine and best else '–'} | "
                     f"{_num(e.get('search s'), '.0f')} | {_num(e.get('peak RSS GB'), '.2f')} |")
    return lines


def moub_table(results: list[ModelResult]) -> list[str]:
    """Every moub conversion of the run: what issues 3 and 5 ask the bench to report."""
    lines = ["| model | row | setting | ratio | test fidelity | ≥99% | search-split quality | evaluations | "
             "search s | index bits/weight | entropy | file bits/weight |",
             "|---|---|---|---:|---:|:---:|---|---:|---:|---:|---:|---:|"]
    count = 0
    for res in results:
        for r in res.rows:
            if not r.peer.startswith("moub_"):
                continue
            if r.nbytes is None:
                lines.append(f"| {res.name} | {r.peer} | – | – | – | – | – | – | – | – | – | – |")
                continue
            e = r.extra
            if "the moub_paper row's file" in str(e.get("note", "")):
                continue
            count += 1
            lines.append(
                f"| {res.name} | {r.peer} | {r.setting} | {r.ratio:.2f} | {_pct(r.fidelity.value)} | "
                f"{'yes' if r.passes else 'no'} | {e.get('search quality', '–')} | {e.get('evaluations', '–')} | "
                f"{_num(e.get('search s'), '.1f')} | {_num(e.get('bits/weight'), '.3f')} | "
                f"{_num(e.get('entropy'), '.3f')} | {_num(e.get('file bits/weight'), '.3f')} |")
    return lines if count or len(lines) > 2 else []


def plot(results: list[ModelResult], peers: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    shown = [r for r in results if not r.error]
    if not shown:
        return
    cols = min(3, len(shown))
    nrows = -(-len(shown) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(max(5.2 * cols, 10), 4.2 * nrows + 0.8), squeeze=False)
    markers = dict(zip(PEERS, "osD^vP*X"))
    colours = {p: plt.get_cmap("tab10")(i) for i, p in enumerate(PEERS)}  # the same in every run
    for ax, res in zip(axes.ravel(), shown):
        for peer in peers:
            pts = sorted((r.ratio, 100 * r.fidelity.value) for r in res.rows
                         if r.peer == peer and r.nbytes and r.fidelity is not None)
            if pts:
                xs, ys = zip(*pts)
                label = next(r.method for r in res.rows if r.peer == peer)
                line, = ax.plot(xs, ys, marker=markers.get(peer, "o"), linestyle="-", label=label, alpha=0.85,
                                color=colours.get(peer))
                best = headline(res, peer)[1]
                if best is not None:  # the headline point: ringed
                    ax.plot([best.ratio], [100 * best.fidelity.value], marker="o", markersize=13,
                            markerfacecolor="none", markeredgecolor=line.get_color(), linestyle="none")
        target = (100 * (res.reference.value - (1 - C.FIDELITY_TARGET)) if res.name == "digits"
                  else 100 * C.FIDELITY_TARGET)
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:g}"[0] in "2357" else ""))
        ax.set_title(f"{TITLES.get(res.name, res.name)} ({res.onnx_bytes / 1e6:.2f} MB fp32)")
        ax.set_xlabel("compression ratio vs fp32 .onnx (log)")
        ax.set_ylabel(f"{res.reference.metric} (%)")
        lo = min([100 * r.fidelity.value for r in res.rows if r.fidelity is not None] + [target])
        # Zoom on the region that decides the headline; points far below it are clipped.
        ax.set_ylim(max(lo - 1, target - 9, 0), 100.5 if res.name != "digits" else 100 * res.reference.value + 1.5)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.ravel()[len(shown):]:
        ax.axis("off")
    handles, labels = {}, {}
    for ax in axes.ravel()[:len(shown)]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)), fontsize=8)
    fig.suptitle("Ratio against fidelity on the test split (dashed: the 99% rule; ringed: each method's headline)")
    fig.tight_layout(rect=(0, 0.1 if nrows == 1 else 0.07, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def module_section(module: str, smoke: bool, enabled: bool, flag: str) -> tuple[list[str], float]:
    """The markdown a section module (``benchmarks.runtime``, ``benchmarks.bigfile``) prints
    from its ``main([])``, with its wall time; a failure becomes the section's text."""
    t = time.perf_counter()
    if not enabled:
        return [f"Skipped ({flag})."], 0.0
    if smoke:
        return ["Skipped in --smoke (`make bench` runs it)."], 0.0
    if importlib.util.find_spec(module) is None:
        return [f"{module} does not exist yet: section skipped."], 0.0
    buf = io.StringIO()
    try:
        mod = importlib.import_module(module)
        with contextlib.redirect_stdout(buf):
            ret = mod.main([])
    except SystemExit as exc:
        ret = None
        if exc.code not in (0, None):
            return [f"{module} exited with {exc.code}:", "", "```", buf.getvalue().rstrip(), "```"], \
                time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        return [f"{module} failed: {type(exc).__name__}: {exc}", "", "```", buf.getvalue().rstrip(), "```"], \
            time.perf_counter() - t
    if isinstance(ret, int) and ret != 0:
        return [f"{module} returned {ret}:", "", "```", buf.getvalue().rstrip(), "```"], time.perf_counter() - t
    text = ret if isinstance(ret, str) else buf.getvalue()
    sys.stdout.write(buf.getvalue())
    body = text.rstrip().splitlines()
    if not any(line.lstrip().startswith("|") for line in body):
        body = ["```", *body, "```"]
    return body, time.perf_counter() - t


def environment() -> str:
    import numpy
    import onnxruntime

    try:
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load}; Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}")


RUNTIME_NOTE = (
    "First the decoder and `.moub` -> session on k = 256 equal-width files. Then normal against compact "
    "sessions (`moub_runtime.InferenceSession(path, compact=...)`: weights kept as int8 behind "
    "`DequantizeLinear`) on files whose levels fit int8, as `--ram int8` writes: resident weight bytes "
    "(of the quantized weights), peak RSS above the imports in a fresh process, load time, latency per "
    "sample (median; one thread, then onnxruntime's default threads; the sessions take turns), which "
    "weights run as 4-bit `MatMulNBits` and which `DequantizeLinear` run at every inference, and the "
    "outputs against the normal session; then the models with MatMul/Gemm weights again on files whose "
    "such weights fit 4 bits, as `--ram int4` writes. `compact` is `compact=True`, which keeps grouped "
    "Convs' and 8-bit MatMul weights float32 (docs/decisions/0052, 0061); `smallest` holds them too."
)
BIGFILE_NOTE = (
    "A FlatBuffer stops at 2 GiB, so the payload lives behind 64-bit offsets. This writes a real file past "
    "2^32 bytes: a model whose uint8 embedding table (a pass-through tensor) is 4.25 GiB, with a quantized "
    "matrix in a pack placed after it, streamed by `moub_format.writer.write`; then, in a fresh process, "
    "`moub_runtime.InferenceSession` opens it (every blob's SHA-256 checked, the pack decoded from beyond "
    "4 GiB) and onnxruntime runs it on table rows at the start, middle and end, against NumPy; in another "
    "fresh process `moub decode` (`moub_runtime.decode_to_onnx`) writes the runnable ONNX model with its "
    "data file, which onnxruntime loads and runs the same way. Peak RSS: the writer's above the table it "
    "was handed; the other processes' above their imports. The files are deleted afterwards."
)


def write_markdown(path: Path, results: list[ModelResult], peers: list[str], smoke: bool, repeats: int, started: str,
                   env_start: str, env_end: str, wall: float, runtime: list[str], runtime_s: float,
                   png: Path, bigfile: tuple[list[str], float] = ([], 0.0)) -> None:
    lines = [
        "# moub benchmark results" + (" (smoke run)" if smoke else ""),
        "",
        f"Produced by `python -m benchmarks.run{' --smoke' if smoke else ''}` "
        f"({'`make bench-smoke`' if smoke else '`make bench`'}) on {started}; every number on this page comes "
        f"from that one run, which took {wall / 60:.1f} min.",
        f"Machine at the start: {env_start}. At the end: load average {env_end}. "
        "Timings taken while other work shares the CPUs are inflated.",
        "",
        "**Fidelity** is measured by running each method's decoded model in onnxruntime (CPU) on the *test* split "
        "of real inputs, which no converter sees: accuracy against the labels for the demo digits model, top-1 "
        "agreement with the fp32 model for magika and the text-direction classifier, per-time-step argmax "
        "agreement for the recogniser (whole-string match beside it), IoU of the probability masks thresholded "
        "at 0.3 for the detector. **Ratio** = fp32 `.onnx` bytes ÷ the method's file bytes (the whole file "
        "that would be shipped). **Encode s**: the method's encoding time (for moub: the converter's whole "
        "search). **Load s**: decode the file and create the onnxruntime session in a fresh process (imports "
        f"excluded), best of {repeats} processes for the row each method's headline quotes (one process for "
        "the other points of a sweep); **peak RSS** of that process, Python and onnxruntime "
        "included (compare with the fp32 row).",
        "",
        "## Headline: smallest file with fidelity ≥ 99%",
        "",
        "Ratio of the smallest file of each method that keeps ≥ 99% fidelity on the test split (digits: accuracy "
        "within 1 point of the fp32 model), with that fidelity and the setting; a method with no passing setting "
        "shows its best fidelity.",
        "",
        *headline_table(results, peers),
        "",
        "## moub default against the best other method",
        "",
        "moub's default row (the converter's own choice) over the largest passing ratio of zstd, fp16, ORT int8, "
        "k-means and NNCodec, with the converter's wall time and peak RSS (its process or its largest worker).",
        "",
        *default_over_best_peer(results),
        "",
    ]
    if png.is_file():
        lines += [f"![ratio against fidelity]({os.path.relpath(png, path.parent)})", ""]
    moub = moub_table(results)
    if moub:
        lines += [
            "## moub conversions",
            "",
            "Each conversion of the run (search on the search split, fidelity on the test split). Search s and "
            "evaluations are the converter's own count and wall time; index bits/weight are the Huffman bits "
            "of the coded weights, entropy the Shannon entropy of the same index streams (per Huffman table), "
            "file bits/weight the whole file's bits over the coded weights.",
            "",
            *moub,
            "",
        ]
    for res in results:
        lines += model_table(res)
    lines += [f"## Runtime (`benchmarks/runtime.py`, {runtime_s:.0f} s)", "", RUNTIME_NOTE, "", *runtime, ""]
    if bigfile[0]:
        lines += [f"## A file beyond 4 GiB (`benchmarks/bigfile.py`, {bigfile[1]:.0f} s)", "",
                  BIGFILE_NOTE, "", *bigfile[0], ""]
    lines += ["## How each method was run", "", *METHOD_NOTES, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


METHOD_NOTES = [
    f"- **zstd -{C.ZSTD_LEVEL}**: the fp32 `.onnx` file compressed by the `zstandard` package (lossless; its "
    "fidelity is the fp32 model's because it decodes to the same bytes).",
    "- **fp16 weights**: every pooled weight (float32 initializer or lifted `Constant` with at least "
    f"{C.MIN_ELEMENTS} values) stored as fp16 with a `Cast` back to fp32, so every op still computes in fp32; "
    f"a tensor with values beyond ±{C.FP16_MAX:g} or non-finite values stays fp32.",
    "- **onnxruntime int8 dynamic**: `onnxruntime.quantization.quantize_dynamic`, per tensor then per channel; "
    "QInt8 where onnxruntime's kernels run it, else QUInt8.",
    "- **1-D k-means + Huffman**: Deep Compression's weight sharing without pruning or retraining: Lloyd's "
    "k-means (linear initialisation, as in Han et al.) over all pooled weights, one codebook, one Huffman "
    f"table; k swept over {', '.join(map(str, C.KMEANS_KS))} by bisection, then one k between the first "
    "pass and the failure below it.",
    f"- **NNCodec {C.NNCODEC_VERSION}**: Fraunhofer HHI's MPEG NNC reference (uniform reconstruction, dependent "
    "quantisation, DeepCABAC), its own defaults, every pooled tensor in one bitstream with one qp (1-D tensors "
    f"at its nonweight qp), qp swept over {', '.join(map(str, C.NNCODEC_QPS))} by bisection, then the qp between "
    "the first pass and the failure below it. Runs in its own virtual environment (numpy<2) with its "
    "torch/pandas/h5py front ends stubbed out.",
    "- k-means and NNCodec files hold, besides their weight stream, the rest of the model (graph and "
    "tensors outside the pool) as the ONNX protobuf compressed with zstd -19, as moub's container deflates "
    "its graph.",
    "- **moub**: `moub_converters.convert(model, data=<search split>, metric=..., max_drop=..., mode=..., "
    f"seed={C.MOUB_SEED}{''.join(f', {k}={v!r}' for k, v in C.MOUB_OPTIONS.items())})` with the converter's "
    "default settings otherwise, in a subprocess; metric "
    f"{C.MOUB_METRIC} ({', '.join(f'{k}: {v}' for k, v in C.MOUB_METRICS.items())}). The search holds "
    "--max-drop on the search split only, so the tolerance is swept like the peers' knobs: "
    f"{', '.join(f'{d:g}' for d in C.MOUB_MAX_DROPS)}"
    f"{''.join(f' ({k}: ' + ', '.join(f'{d:g}' for d in v) + ')' for k, v in C.MOUB_MAX_DROPS_BY_MODEL.items())}, stopping at the first file that passes on the test "
    "split or when the model's time budget "
    f"({', '.join(f'{k} {v} s' for k, v in C.MOUB_BUDGET_S.items())}) would be exceeded. "
    "Encode s is the converter's wall time for that file (the whole search). "
    "The table's fidelity is the decoded `.moub` (`moub_runtime.load`) on the test split. Bits/weight vs "
    "entropy: Huffman index bits per coded weight against the Shannon entropy of the same index streams "
    "(per table), decoded from the file.",
    "- **moub best, x swept** (the moub_swept row): the peers' rows are the coarsest setting of their sweep "
    "that passes on the test split, while moub best is the converter's own choice on the search split. This "
    "row rebuilds moub best's conversion (`Replay`: the same sensitivities, gamma and calibration; the "
    "converter's metadata) at other step scales x, in 1/8-octave steps from 2 octaves coarser to 1 finer than "
    "its choice, bisected on the test split like NNCodec's qp: the quantizers compared apart from how each "
    "chooses. Search s is the calibration, measured again; encode s one rebuild.",
]


# ----------------------------------------------------------------------------- entry

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the demo model only, cheap settings, output in benchmarks/out/smoke")
    ap.add_argument("--models", help=f"comma-separated subset of {','.join(C.MODELS)} and the zoo's "
                    f"{','.join(ZOO)} ('zoo': all of the zoo; default: all of them)")
    ap.add_argument("--peers", help=f"comma-separated subset of {','.join(PEERS)}")
    ap.add_argument("--out", type=Path, help="folder for RESULTS.md and results.png (default: benchmarks/, smoke: benchmarks/out/smoke)")
    ap.add_argument("--load-repeats", type=int, help=f"fresh processes per load timing (default {C.LOAD_REPEATS}; smoke 1)")
    ap.add_argument("--no-runtime", action="store_true", help="skip the runtime section")
    ap.add_argument("--no-bigfile", action="store_true", help="skip the file beyond 4 GiB (needs ~10 GB of disk)")
    args = ap.parse_args(argv)

    models = args.models.split(",") if args.models else list(C.SMOKE_MODELS if args.smoke else (*C.MODELS, *ZOO))
    models = [m for name in models for m in (ZOO if name == "zoo" else (name,))]
    for m in models:
        if m not in C.MODELS and m not in ZOO:
            ap.error(f"unknown model {m!r} (one of {', '.join((*C.MODELS, *ZOO))}, or zoo)")
    peers = args.peers.split(",") if args.peers else list(PEERS)
    for p in peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r} (one of {', '.join(PEERS)})")
    repeats = args.load_repeats or (1 if args.smoke else C.LOAD_REPEATS)
    if args.out:
        md, png, work_root = args.out / "RESULTS.md", args.out / "results.png", args.out / "work"
    elif args.smoke:
        md, png, work_root = C.OUT / "smoke" / "RESULTS.md", C.OUT / "smoke" / "results.png", C.OUT / "smoke"
    else:
        md, png, work_root = C.RESULTS_MD, C.PLOT_PNG, C.OUT / "full"

    started = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    env_start = environment()
    t0 = time.perf_counter()
    log(f"bench: models {', '.join(models)}; methods {', '.join(peers)}")
    results = []
    for name in models:
        t = time.perf_counter()
        log(f"{name}:")
        results.append(bench_model(name, peers, args.smoke, repeats, work_root))
        log(f"{name}: {time.perf_counter() - t:.0f} s")
    runtime, runtime_s = module_section("benchmarks.runtime", args.smoke, not args.no_runtime, "--no-runtime")
    bigfile = module_section("benchmarks.bigfile", args.smoke, not args.no_bigfile, "--no-bigfile")
    wall = time.perf_counter() - t0
    try:
        env_end = "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        env_end = "?"
    try:
        plot(results, peers, png)
    except Exception:  # noqa: BLE001 - the tables matter more than the picture
        traceback.print_exc()
    write_markdown(md, results, peers, args.smoke, repeats, started, env_start, env_end, wall, runtime, runtime_s, png,
                   bigfile)
    log("")
    log("Headline: ratio of the smallest file with fidelity >= 99% (digits: accuracy within 1 point)")
    for line in headline_table(results, peers):
        log(line.replace("**", ""))
    for line in default_over_best_peer(results):
        log(line)
    summary = md.parent / "README-summary.md" if (args.out or args.smoke) else C.OUT / "README-summary.md"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text("\n".join(readme_summary(results, peers)) + "\n")
    log(f"\nwrote {md}, {png} and {summary} in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
