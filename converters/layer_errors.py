"""Which tensors the written file's error comes from, measured by onnxruntime.

The output error of the chosen point is the relative squared error of the float outputs
against the original's (``sensitivity.relative_error``), on a few samples spread over the
data. Errors of different tensors do not add: restoring one tensor alone to its original
values, or quantizing it alone, gives shares that sum to far from the whole on real models
(PP-OCR cls, paper mode: -58% and +389%; docs/decisions/0045), because quantization errors of
different layers partly cancel. So a tensor's share is its Shapley value estimated on two
orders: the tensors are restored one after another, in file order and in reverse order, and
each is credited with the error that goes away when its turn comes, averaged over the two
orders. The shares then sum to the whole error exactly (less what is left with everything
restored: nothing), and a negative share says the tensor's error cancels others'.

A weight whose bias absorbs its quantization shift (bias correction) is restored together
with that bias: restoring the weight alone would leave a bias corrected for a shift that no
longer happens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .evaluate import reference_rows
from .intake import Pool
from .sensitivity import relative_error
from .session import ConversionSession


def groups_of(pool: Pool, rules: Sequence) -> list[list[int]]:
    """Pool sites restored together: each weight with the biases it corrects; every other site alone."""
    biases_of: dict[int, list[int]] = {}
    for rule in rules:
        biases_of.setdefault(rule.weight, []).append(rule.bias)
    grouped = {b for bs in biases_of.values() for b in bs}
    return [[i, *sorted(biases_of.get(i, []))] for i in range(len(pool.sites)) if i not in grouped]


def default_samples(session: ConversionSession) -> int:
    """As many samples as the sensitivity runs take (``sensitivity.sample_count``): the same work per run."""
    from .sensitivity import sample_count

    dataset = session.dataset
    per_sample = sum(int(np.prod(a.shape[1:], dtype=np.int64)) for a in dataset.inputs.values())
    return sample_count(dataset.n_samples, per_sample, session.pool.n_weights, len(session.pool.sites))


def layer_table(session: ConversionSession, file_rows: Sequence, quantized: Mapping[str, np.ndarray], rules: Sequence,
                facts: Mapping, progress: Callable[[dict], None] = lambda event: None,
                shares: bool = True) -> tuple[list[dict], dict | None]:
    """The report's per-layer rows: what the file holds of each quantized tensor (``file_rows``,
    ``moub_runtime.layers``), its measured sensitivity (adaptive mode: the relative output error
    with it alone quantized at its test step) and its share of the chosen point's output error."""
    summary, by_site = None, {}
    if shares:
        samples = int(facts.get("sensitivity_samples") or default_samples(session))
        summary, by_site = error_shares(session, quantized, rules, samples, progress)
    number = {site.path: i for i, site in enumerate(session.pool.sites)}
    measured = facts.get("relative_distortion")
    rows = []
    for row in file_rows:
        i = number.get(row.path)
        shares = by_site.get(i, {"error_drop": None, "error_share": None, "restored_with": []})
        rows.append({"tensor": row.path, "weights": row.weights, "step": row.step, "codebook": row.codebook,
                     "levels": row.levels, "bits_per_weight": row.bits_per_weight,
                     "sensitivity": None if measured is None or i is None else measured[i], **shares})
    return rows, summary


def distortion(session: ConversionSession, arrays: Mapping[str, np.ndarray], samples: int) -> float:
    """Relative squared output error with the pool's ``arrays``, on ``samples`` samples."""
    dataset, reference = session.sample_subset(samples)
    err = energy = 0.0
    rows = [0] * len(reference)
    for _, outputs in session.scorer.evaluator.iter_outputs(arrays, dataset):
        e, en = relative_error(outputs, reference_rows(reference, outputs, rows))
        err, energy = err + e, energy + en
    return err / energy if energy > 0 else err


def error_shares(session: ConversionSession, quantized: Mapping[str, np.ndarray], rules: Sequence, samples: int,
                 progress: Callable[[dict], None] = lambda event: None) -> tuple[dict, dict[int, dict]]:
    """(summary, site number -> its group's figures): the whole error at the chosen point and, per
    group of sites restored together, its share (see the module docstring)."""
    pool, originals = session.pool, session.originals
    groups = groups_of(pool, rules)
    progress({"phase": "layers", "total": 2 * len(groups) + 1})
    total = distortion(session, quantized, samples)
    progress({"done": 1})
    drops = np.zeros(len(groups))
    left = []
    for order in (range(len(groups)), range(len(groups) - 1, -1, -1)):
        arrays, before = dict(quantized), total
        for g in order:
            for i in groups[g]:
                arrays[pool.sites[i].path] = originals[pool.sites[i].path]
            after = distortion(session, arrays, samples)
            progress({"done": 1})
            drops[g] += 0.5 * (before - after)
            before = after
        left.append(before)
    by_site: dict[int, dict] = {}
    for group, drop in zip(groups, drops):
        share = float(drop / total) if total > 0 else 0.0
        by_site[group[0]] = {"error_drop": float(f"{drop:.6g}"), "error_share": round(share, 6),
                             "restored_with": [pool.sites[i].path for i in group[1:]]}
        for i in group[1:]:
            by_site[i] = {"error_drop": None, "error_share": None, "restored_with": [pool.sites[group[0]].path]}
    summary = {"measure": "relative squared error of the float outputs; shares: Shapley values on two orders",
               "samples": int(samples), "distortion": float(f"{total:.6g}"), "sum_of_drops": float(f"{drops.sum():.6g}"),
               "left_restored": float(f"{max(left):.6g}"), "groups": len(groups)}
    return summary, by_site


WORST_SHOWN = 5  # layers in the closing table (the report and ``moub inspect --layers`` list all)


def closing_lines(report: Mapping, worst: int = WORST_SHOWN) -> list[str]:
    """The closing table's per-layer lines: the whole error and the layers with the largest shares."""
    rows, summary = report.get("layers"), report.get("layer_error")
    if not rows or not summary:
        return []
    ranked = sorted((r for r in rows if r["error_share"] is not None), key=lambda r: -r["error_share"])[:worst]
    whole = summary["distortion"]
    summed = summary["sum_of_drops"] / whole if whole > 0 else 0.0
    lines = [f"{'output error':16}{whole:.3g} relative on {summary['samples']} samples; the layers' shares sum to "
             f"{100 * summed:.0f}%",
             f"{'worst layers':16}{'share':>6} {'bits/w':>6} {'step':>9}  tensor"]
    for r in ranked:
        step = f"{r['step']:9.3g}" if r["step"] is not None else f"{'cb ' + str(r['codebook']):>9}"
        name = r["tensor"] + (" +bias" if r["restored_with"] else "")
        name = name if len(name) <= 40 else "..." + name[-37:]
        lines.append(f"{'':16}{100 * r['error_share']:5.1f}% {r['bits_per_weight']:6.2f} {step}  {name}")
    return lines
