"""Why the choice is not one of the smaller candidates that showed no loss beyond --max-drop.

The plot shows candidates left of the choice within the tolerance; each was rejected by one
of the guards against picking a candidate that was merely lucky on the search samples
(``selection.py``, ``split.py``). This module reads the report and names the guard, so the
closing table and the report can say it without the reader digging through the JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

KINDS = {  # kind -> what the closing table says of it (fits 80 columns after a count)
    "confirm": "failed the confirm half (samples the search never saw)",
    "written": "missed --max-drop once written, measured on all the data",
    "coarsen": "failed the flip-rate estimate on both halves",
    "tolerance": "lost more samples than the search half tolerates",
    "monotone": "a larger candidate of their family lost more",
    "below_failure": "smaller than one that failed the confirm half",
    "ladder": "not reached by the confirm bisection",
}


def passed_over(report: dict) -> list[dict]:
    """The complete candidates smaller than the choice with loss within --max-drop on the search
    data, smallest first, each with the guard that rejected it (``kind``, see KINDS)."""
    choice = report.get("choice") or {}
    if "name" not in choice:
        return []
    max_drop = report["settings"]["max_drop"]
    facts = report.get("search") or {}
    chosen = next((c for c in report.get("candidates", []) if c["name"] == choice["name"]), None)
    size = chosen["bits_per_weight"] if chosen else choice["bits_per_weight"]
    limit = (facts.get("tolerance") or {}).get("search", max_drop)
    confirm_failed = {t["name"]: t for t in facts.get("confirm", []) if not t["passed"]}
    coarsen_failed = {t["name"] for t in (facts.get("coarsen") or []) if not t["passed"]}
    written = {m["name"]: m for m in report.get("written_misses", [])}
    sizes = {c["name"]: c["bits_per_weight"] for c in report.get("candidates", [])}
    rows, seen = [], set()
    for c in sorted(report.get("candidates", []), key=lambda c: (c["bits_per_weight"], c["name"])):
        if (c["name"] in seen or c["name"] == choice["name"] or not c["complete"] or c["loss"] > max_drop + 1e-12
                or c["bits_per_weight"] >= size):
            continue
        seen.add(c["name"])
        kind, detail = _reason(c, limit, confirm_failed, coarsen_failed, written, sizes)
        rows.append({"name": c["name"], "bits_per_weight": c["bits_per_weight"], "loss": c["loss"], "kind": kind,
                     "reason": detail})
    return rows


def _reason(c: dict, limit: float, confirm_failed: dict, coarsen_failed: set, written: dict,
            sizes: dict) -> tuple[str, str]:
    if c["name"] in written:
        return "written", f"loss {written[c['name']]['loss']:.4f} on all the data"
    if c["name"] in confirm_failed:
        t = confirm_failed[c["name"]]
        return "confirm", f"loss {'>=' if not t['complete'] else ''}{t['loss']:.4f} there"
    if c["name"] in coarsen_failed:
        return "coarsen", "expected flip rate over --max-drop"
    if c["loss"] > limit + 1e-12:
        return "tolerance", f"loss {c['loss']:.4f} over the search half's {limit:.4f}"
    if c.get("fitted_loss") is not None and c["fitted_loss"] > limit + 1e-12:
        return "monotone", f"fitted loss {c['fitted_loss']:.4f}"
    larger = [n for n in confirm_failed if sizes.get(n, -1.0) >= c["bits_per_weight"]]
    if larger:
        return "below_failure", f"below {min(larger, key=lambda n: sizes[n])}"
    return "ladder", "the bisection settled on a larger one first"


def summary_lines(rows: Sequence[dict], label: str = "passed over") -> list[str]:
    """Closing-table lines: how many smaller candidates, then one line per guard with its smallest case."""
    if not rows:
        return []
    lines = [f"{label:16}{len(rows)} smaller candidates within --max-drop on the search data:"]
    for kind, text in KINDS.items():
        of_kind = [r for r in rows if r["kind"] == kind]
        if of_kind:
            first = of_kind[0]
            lines.append(f"{'':16}{len(of_kind):>3} {text}")
            lines.append(f"{'':18}{first['name']}, {first['bits_per_weight']:.3f} bits: {first['reason']}")
    return lines
