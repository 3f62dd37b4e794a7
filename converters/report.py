"""The JSON report, the Pareto plot, the closing table and the live progress bar.

The report is deterministic (same model, data and seed give the same bytes):
it holds no timestamps and no wall times. Wall time lives on the result
(``ConvertResult.wall_seconds``) and in the closing table only.

Stage rows are tied to the real file: the ``+Huffman`` row's bits per weight
are the container's Huffman streams plus codebook and table, counted as
``moub inspect`` counts them, and its ``file_bytes`` is the file's length. The
earlier rows replace those bits with the stage's own (fixed-length indices, no
table) on top of the same non-weight bytes (graph, pass-through tensors, index).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence

from .metrics import METRICS
from .candidates import Candidate, Stage
from .resolution import summary_lines
from .search import pareto_front

REPORT_VERSION = 1


def _r(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def stage_rows(stages: Sequence[Stage], weight_bytes_real: int, file_bytes: int, original_bytes: int, n_weights: int) -> list[dict]:
    """Per-stage rows; the last (entropy-coded) row uses the file's real weight bytes."""
    other_bytes = file_bytes - weight_bytes_real
    rows = []
    for i, stage in enumerate(stages):
        real = i == len(stages) - 1 and stage.coding == "huffman"
        weight_bytes = weight_bytes_real if real else math.ceil(stage.size.total_bits / 8)
        bits = 8 * weight_bytes / n_weights if real else stage.size.bits_per_weight
        stage_file = other_bytes + weight_bytes
        rows.append({
            "stage": stage.name,
            "bins": stage.bins,
            "coding": stage.coding,
            "bits_per_weight": _r(bits),
            "weights_ratio": _r(32 / bits if bits else None, 4),
            "file_bytes": stage_file,
            "file_ratio": _r(original_bytes / stage_file, 4),
            "quality": _r(stage.quality),
            "measured": real,
        })
    return rows


def front_of(candidates: Sequence[Candidate], quality_original: float) -> list[Candidate]:
    complete = [c for c in candidates if c.complete]
    return [complete[i] for i in pareto_front([(c.loss, c.bits_per_weight) for c in complete])]


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n"


def plot(report: dict, path) -> None:
    """Pareto plot of the two objectives: loss vs bits per weight, every candidate, the front,
    the original (no loss at 32 bits/weight), the tolerance and the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report["settings"]
    max_drop = settings["max_drop"]
    cap = max(4 * max_drop, 0.02)
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=120)
    cands = report["candidates"]

    def scatter(rows, **kw):
        if rows:
            ax.scatter([c["bits_per_weight"] for c in rows], [min(c["loss"], 1.25 * cap) for c in rows], **kw)

    searched = "k equal-width bins" if settings["mode"] == "paper" else "per-tensor steps (x, gamma)"
    scatter([c for c in cands if c["stage"] == "search" and c["complete"]], s=18, c="0.55", label=f"search: {searched}")
    scatter([c for c in cands if c["stage"] == "search" and not c["complete"]], s=18, marker="^", facecolors="none",
            edgecolors="0.55", label="search, stopped early (loss at least)")
    scatter([c for c in cands if c["stage"] == "merge"], s=22, c="tab:blue", label="after merging neighbouring bins")
    front = sorted(report["front"], key=lambda c: c["bits_per_weight"])
    if front:
        ax.step([c["bits_per_weight"] for c in front], [min(c["loss"], 1.25 * cap) for c in front], where="post",
                c="tab:orange", lw=1.2, label="Pareto front")
    ax.axhline(max_drop, c="tab:red", ls=":", lw=1, label=f"tolerance (max drop {max_drop})")
    ax.scatter([32], [0], s=60, marker="s", c="tab:green", label="original (32 bits/weight)")
    choice = report.get("choice")
    if choice and choice.get("loss_search") is not None:
        ax.scatter([choice["bits_per_weight"]], [choice["loss_search"]], s=180, marker="*", c="tab:red", zorder=5,
                   label=f"choice: {choice['name']} ({choice['bits_per_weight_file']:.2f} bits/weight in the file)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05 * cap, 1.3 * cap)
    ax.set_xlabel("encoded bits per weight (indices + codebook + Huffman table), log scale")
    ax.set_ylabel(f"loss ({report['metric']}) on the search data")
    ax.set_title(f"moub --mode {settings['mode']}: {report['source']['name']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def _human(n: int) -> str:
    return f"{n:,} B" if n < 10_000 else f"{n / 1000:,.1f} KB" if n < 10_000_000 else f"{n / 1e6:,.1f} MB"


def closing_table(report: dict, wall_seconds: float, evaluations: int) -> str:
    """The short before/after table printed at the end of a run."""
    f = report["file"]
    lines = [
        f"{'':16}{'original':>16}{'.moub':>16}",
        f"{'size':16}{_human(report['source']['bytes']):>16}{_human(f['bytes']):>16}   ratio {f['ratio']:.2f}x",
    ]
    if report.get("quality_original") is not None:
        q0, q1 = report["quality_original"], report["quality_compressed"]
        loss = "" if METRICS[report["metric"]].loss_is_drop else f", loss {report['loss']:.4f}"
        lines.append(f"{report['metric']:16}{q0:>16.4f}{q1:>16.4f}   drop {q0 - q1:+.4f}{loss} (max {report['settings']['max_drop']})")
        lines += summary_lines(report.get("resolution"), report["metric"], report["settings"]["max_drop"])
    choice = report.get("choice") or {}
    if choice:
        lines.append(f"{'weights':16}{'32 bits':>16}{choice['bits_per_weight_file']:>11.3f} bits   {choice['bins']} bins ({choice['name']})")
    for note in report.get("guards") or ():
        lines.append(f"{'guard':16}{note}")
    if report.get("lossless"):
        lines.append(f"{'lossless':16}every tensor stored exactly, because {report['lossless']['reason']}")
    stopped = report.get("evaluations_stopped_early", 0) + report.get("evaluations_dominated", 0)
    lines.append(f"{'evaluations':16}{evaluations:>16}" + (f"   ({stopped} stopped early)" if stopped else ""))
    lines.append(f"{'wall time':16}{wall_seconds:>15.1f}s")
    test = report.get("test")
    if test:
        verdict = "within" if test["within_max_drop"] else "OUTSIDE"
        lines.append(f"{'test':16}{test['quality_original']:>16.4f}{test['quality_compressed']:>16.4f}   loss "
                     f"{test['loss']:.4f} on {test['samples']} held-out samples ({test['metric']}): {verdict} max drop "
                     f"{report['settings']['max_drop']}")
    reason = report.get("metric_reason")
    if reason and reason != "chosen with --metric":
        lines.append(f"{'metric':16}{report['metric']}: {reason}")
    for note in (report.get("data") or {}).get("notes", []):
        lines.append(f"{'data':16}{note}")
    return "\n".join(lines)


class RichProgress:
    """Live bar on stderr: evaluations done and the best feasible candidate so far.

    Transient, and only on a terminal: when stderr is a file or a pipe it stays
    silent, so that an error is still the only line there."""

    def __init__(self, quality_original: float, max_drop: float) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.q0, self.max_drop = quality_original, max_drop
        self.evaluations = 0
        self.best: dict | None = None
        self.phase = "search"
        console = Console(file=sys.stderr)
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                  console=console, transient=True, disable=not console.is_terminal)
        self._task = self._progress.add_task(self._text(), total=None)
        self._progress.start()

    def _text(self) -> str:
        best = "none within tolerance yet"
        if self.best:
            b = self.best
            best = f"{b['name']}: {b['bits_per_weight']:.3f} bits/weight, loss {b['loss']:.4f}"
        return f"{self.phase:6} evaluations {self.evaluations:4}  best {best}"

    def __call__(self, event: dict) -> None:
        if "phase" in event:
            self.phase = event["phase"]
        if "result" in event:
            r = event["result"]
            self.evaluations += 1
            # sensitivity runs report a distortion, not a loss: they count, but are no candidate
            if r.get("complete") and r.get("loss", math.inf) <= self.max_drop + 1e-12:
                if self.best is None or r["bits_per_weight"] < self.best["bits_per_weight"]:
                    self.best = r
        self._progress.update(self._task, description=self._text())

    def close(self) -> None:
        self._progress.stop()
