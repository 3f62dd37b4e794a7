"""The plots of a conversion's report: the Pareto front beside bits per tensor against sensitivity.

Left, the two objectives: loss on the search data against file size (bits per weight on the
top axis), on linear axes framed on the front and the choice (the candidates far to the right,
and the original, are named at the frame's edge: a log axis to 32 bits per weight crams the
front into a tenth of the width). The tolerance, the choice, and other runs on the same model
(``compare``: e.g. the paper mode's report) are marked. Right, per quantized tensor: the bits its codes take against its measured sensitivity
(the relative output error with it alone quantized at its test step; without one, its share
of the output error), the dot's area its weights, its colour its share of the chosen file's
error (``layer_errors.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

FRAME_MARGIN = 0.08  # of the frame's width, either side


class _Sizes:
    """A candidate's file size from its bits per weight: the chosen file's other bytes (graph,
    pass-through tensors, index) plus its weights. File size, not bits per weight, is the x axis:
    modes pool different tensors (the paper's only those of 1024 weights or more), so their bits
    per weight do not compare, their files do."""

    def __init__(self, report: dict) -> None:
        self.n = report["pool"]["pooled_weights"]
        self.other = report["file"]["bytes"] - report["file"]["weight_bytes"]

    def kb(self, bits):
        return (self.other + bits * self.n / 8) / 1000

    def bits(self, kb):
        return (kb * 1000 - self.other) * 8 / self.n


def _cap(report: dict) -> float:
    return max(4 * report["settings"]["max_drop"], 0.02)


def _frame(report: dict, compare: Sequence[dict], sizes: _Sizes) -> tuple[float, float]:
    """x limits (KB): the front's points within the plotted loss range, the choice and the compared files."""
    cap = _cap(report)
    xs = [sizes.kb(c["bits_per_weight"]) for c in report["front"] if c["loss"] <= 1.25 * cap] or \
         [sizes.kb(c["bits_per_weight"]) for c in report["front"]]
    xs.append(report["file"]["bytes"] / 1000)
    xs += [other["file"]["bytes"] / 1000 for other in compare]
    lo, hi = min(xs), max(xs)
    width = max(hi - lo, 0.1 * hi)
    return max(0.0, lo - FRAME_MARGIN * width), hi + FRAME_MARGIN * width


def pareto_axes(ax, report: dict, compare: Sequence[dict] = ()) -> None:
    settings = report["settings"]
    max_drop, cap = settings["max_drop"], _cap(report)
    top = 1.25 * cap
    sizes = _Sizes(report)
    x0, x1 = _frame(report, compare, sizes)
    cands = report["candidates"]

    def scatter(rows, **kw):
        inside = [c for c in rows if sizes.kb(c["bits_per_weight"]) <= x1]
        if inside:
            ax.scatter([max(sizes.kb(c["bits_per_weight"]), x0) for c in inside], [min(c["loss"], top) for c in inside],
                       **kw)

    searched = "k equal-width bins" if settings["mode"] == "paper" else "per-tensor steps (x, gamma)"
    scatter([c for c in cands if c["complete"] and c["stage"] != "merge"], s=16, c="0.6", label=f"evaluated: {searched}")
    scatter([c for c in cands if not c["complete"]], s=16, marker="^", facecolors="none", edgecolors="0.6",
            label="stopped early (loss at least)")
    scatter([c for c in cands if c["stage"] == "merge"], s=20, c="tab:blue", label="after merging neighbouring bins")
    front = sorted(report["front"], key=lambda c: c["bits_per_weight"])
    if front:
        ax.step([sizes.kb(c["bits_per_weight"]) for c in front] + [x1],
                [min(c["loss"], top) for c in front] + [min(front[-1]["loss"], top)],
                where="post", c="tab:orange", lw=1.3, label="Pareto front")
    ax.axhline(max_drop, c="tab:red", ls=":", lw=1.2, label=f"tolerance: max drop {max_drop}")
    beyond = [c for c in cands if sizes.kb(c["bits_per_weight"]) > x1]
    if beyond:
        ax.annotate(f"{len(beyond)} more up to {max(sizes.kb(c['bits_per_weight']) for c in beyond):,.0f} KB ->",
                    (0.99, 0.55), xycoords="axes fraction", ha="right", fontsize=8, color="0.35")
    ax.annotate(f"original: {report['source']['bytes'] / 1000:,.0f} KB, loss 0 ->", (0.99, 0.09),
                xycoords="axes fraction", ha="right", fontsize=8, color="tab:green")
    for other, marker, colour in zip(compare, "Dps", ("tab:purple", "tab:brown", "tab:cyan")):
        c = other["choice"]
        loss = c["loss_search"] if c.get("loss_search") is not None else c["loss"]
        ax.scatter([other["file"]["bytes"] / 1000], [min(loss, top)], s=90, marker=marker, c=colour, zorder=5,
                   label=f"--mode {other['settings']['mode']}: {c['name']} ({other['file']['bytes']:,} B)")
    choice = report.get("choice")
    if choice and choice.get("loss_search") is not None:
        ax.scatter([report["file"]["bytes"] / 1000], [min(choice["loss_search"], top)], s=200, marker="*",
                   c="tab:red", zorder=6, label=f"choice: {choice['name']} ({report['file']['bytes']:,} B)")
    ax.set_xlim(x0, x1)
    ax.set_ylim(-0.05 * cap, 1.3 * cap)
    ax.set_xlabel("file size (KB; candidates: the chosen file's other bytes + their weights)")
    ax.set_ylabel(f"loss ({report['metric']}) on the search data; above {top:.3g}: drawn at the top")
    ax.grid(alpha=0.3)
    ax.secondary_xaxis("top", functions=(sizes.bits, sizes.kb)).set_xlabel(
        f"bits per weight of this run's {sizes.n:,} quantized weights", fontsize=8)
    ax.legend(fontsize=7, loc="upper right")


def layers_axes(ax, report: dict) -> None:
    from matplotlib.colors import TwoSlopeNorm

    rows = [r for r in report.get("layers") or [] if r["weights"]]
    if not rows:
        ax.text(0.5, 0.5, "no per-layer table in the report", ha="center", transform=ax.transAxes)
        return
    by_sensitivity = all(r["sensitivity"] is not None and r["sensitivity"] > 0 for r in rows)
    xs = [r["sensitivity"] if by_sensitivity else (r["error_share"] or 0.0) for r in rows]
    shares = [r["error_share"] if r["error_share"] is not None else 0.0 for r in rows]
    sizes = [12 + 18 * math.log10(r["weights"]) ** 1.5 for r in rows]
    own = [i for i, r in enumerate(rows) if r["error_share"] is not None]
    grouped = [i for i, r in enumerate(rows) if r["error_share"] is None]
    bits = [r["bits_per_weight"] for r in rows]
    points = ax.scatter([xs[i] for i in own], [bits[i] for i in own], s=[sizes[i] for i in own],
                        c=[shares[i] for i in own], cmap="coolwarm",
                        norm=TwoSlopeNorm(0.0, min(-1e-9, min(shares)), max(1e-9, max(shares))),
                        edgecolors="0.3", linewidths=0.4)
    if grouped:
        ax.scatter([xs[i] for i in grouped], [bits[i] for i in grouped], s=[sizes[i] for i in grouped],
                   facecolors="none", edgecolors="0.4", linewidths=0.8, label="bias: its share is its weight's")
        ax.legend(fontsize=7, loc="upper right")
    ax.figure.colorbar(points, ax=ax, label="share of the chosen file's output error (below 0: cancels others')")
    for r, x in sorted(zip(rows, xs), key=lambda rx: -(rx[0]["error_share"] or 0.0))[:3]:
        name = r["tensor"].split(":", 1)[-1]
        ax.annotate(name if len(name) <= 28 else "..." + name[-25:], (x, r["bits_per_weight"]), fontsize=7,
                    xytext=(-10, 10), textcoords="offset points", ha="right", arrowprops={"arrowstyle": "-", "color": "0.3"},
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.6", "alpha": 0.9})
    if by_sensitivity:
        ax.set_xscale("log")
    ax.set_xlabel("sensitivity: output error with the tensor alone quantized at its test step" if by_sensitivity
                  else "share of the output error (this mode measures no sensitivity)")
    ax.set_ylabel("bits per weight of the tensor's codes in the file")
    ax.set_title(f"{len(rows)} quantized tensors (dot area: weights)", fontsize=9)
    ax.grid(alpha=0.3, which="both")


def plot(report: dict, path: str | os.PathLike, compare: Sequence[dict] = ()) -> None:
    """The two plots side by side in one PNG (deterministic: no timestamp in its metadata)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.4), dpi=110, width_ratios=(1.25, 1))
    pareto_axes(left, report, compare)
    layers_axes(right, report)
    settings = report["settings"]
    fig.suptitle(f"moub --mode {settings['mode']}: {report['source']['name']}, {report['file']['ratio']:.2f}x, "
                 f"loss {report['loss']} ({report['metric']}, max drop {settings['max_drop']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
