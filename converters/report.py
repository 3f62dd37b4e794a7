"""The JSON report and the closing table (the plots: ``plots.py``; progress: ``progress.py``).

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
from collections.abc import Sequence

from .metrics import METRICS
from .candidates import Candidate, Stage
from .layer_errors import closing_lines as layer_lines
from .passed_over import summary_lines as passed_over_lines
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


def _some_tensors(entry: dict, noun: str) -> str:
    """"3 tensors: a, b, c, ..." for a report entry with ``count`` and ``tensors``."""
    names = ", ".join(entry["tensors"][:3]) + (", ..." if entry["count"] > 3 else "")
    return f"{entry['count']} {noun}{'s' if entry['count'] != 1 else ''}: {names}"


def _human(n: int) -> str:
    return f"{n:,} B" if n < 10_000 else f"{n / 1000:,.1f} KB" if n < 10_000_000 else f"{n / 1e6:,.1f} MB"


def closing_table(report: dict, wall_seconds: float, evaluations: int) -> str:
    """The short before/after table printed at the end of a run."""
    f = report["file"]
    lines = [
        f"{'':16}{'original':>16}{'.moub':>16}",
        f"{'size':16}{_human(report['source']['bytes']):>16}{_human(f['bytes']):>16}   ratio {f['ratio']:.2f}x",
    ]
    resident = f.get("resident_weight_bytes")
    if resident:
        smallest = resident.get("smallest", resident["compact"])
        also = f"; {_human(smallest)} with compact=\"smallest\"" if smallest != resident["compact"] else ""
        lines.append(f"{'weights in RAM':16}{_human(resident['normal']):>16}{_human(resident['compact']):>16}   "
                     f"in a compact session (moub_runtime, compact=True){also}")
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
        coded = " (integer weights Huffman-coded)" if "lossless integer" in (report.get("coding") or {}).get("kinds", {}) else ""
        lines.append(f"{'lossless':16}every tensor stored exactly{coded}, because {report['lossless']['reason']}")
    kept = report.get("kept_exact")
    if kept:
        lines.append(f"{'kept exact':16}{_some_tensors(kept, 'tensor')} ({100 * kept['share']:.1f}% of the weights) stored "
                     f"exactly and the rest searched, because {kept['reason']}; the lossless file takes "
                     f"{_human(kept['lossless_bytes'])}")
    wide = report.get("widened_to_int8")
    if wide:
        lines.append(f"{'int8 window':16}{_some_tensors(wide, 'MatMul/Gemm weight')} ({100 * wide['share_of_four_bit']:.0f}% "
                     f"of those --ram int4 limits to 16 levels) given 256 levels (a byte each in a compact session), "
                     f"because {wide['reason']}")
    sixteen = report.get("widened_to_int16")
    if sixteen:
        lines.append(f"{'int16 window':16}{_some_tensors(sixteen, 'tensor')} ({100 * sixteen['share']:.1f}% of the weights) "
                     f"given 65536 levels (two bytes each in a compact session), because {sixteen['reason']}")
    target = report.get("target")
    if target:
        verdict = "within" if target["within_max_drop"] else "OUTSIDE"
        lines.append(f"{'target':16}{_human(target['bytes']):>16}{_human(target['file_bytes']):>16}   least loss that "
                     f"fits: {verdict} max drop")
    lines += passed_over_lines(report.get("passed_over", []))
    lines += layer_lines(report)
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
