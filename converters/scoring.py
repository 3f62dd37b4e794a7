"""A written .moub scored against its original on sample data, loaded exactly as a device loads it.

Three callers need the same measurement: the search's confirm of the file it writes, the
held-out check of ``--test``, and ``moub verify --model --data`` (through the ``moub.scoring``
entry point, so the runtime never imports the converter). Each judges with the metric that fits
each output head (:mod:`.heads`), or the one the user names, with or without labels.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from moub_format import dtypes
from moub_format.constants import DEFAULT_LIMITS, ReaderLimits

from . import heads, metrics
from .data import Dataset, DataSource, load_dataset, parse_batch_axes
from .errors import OptionError
from .evaluate import Evaluator, OutputLayout, Scorer, reference_outputs, session_options
from .intake import Pool, SourceModel, load_source, pool_weights


@dataclass
class Measured:
    quality: float | None
    loss: float | None     # as judged (with the guards where the baseline has a tolerance)
    weight_bytes: int      # Huffman streams + codebooks + tables, as ``moub inspect`` counts them
    file_bytes: int
    resident: dict | None = None   # the quantized weights' bytes in memory: normal and compact session
    coding: dict | None = None   # how the file stores each tensor (:func:`coding_of`)
    point_loss: float | None = None  # as measured, before the guards


def resident_weights(summary) -> dict | None:
    """Bytes the quantized weights take in memory: float32 in a normal session; in a compact one
    (``compact=True``, and ``compact="smallest"``) the integers it holds plus 4 per weight it keeps
    float (``moub inspect``'s compact counts)."""
    compact = summary.compact
    if compact is None:
        return None
    kept = sum(v["weights"] for v in compact["kept_float"].values())
    return {"normal": 4 * summary.quantized_weights, "compact": compact["held_weight_bytes"] + 4 * kept,
            "smallest": compact["smallest_resident_bytes"]}


def coding_of(summary) -> dict:
    """Which tensors the file stores how: 'lossless integer' (an integer Huffman tensor),
    'searched float' (quantized: a float Huffman tensor or a pack member), 'kept raw' (bytes as
    they were, maybe zlib/xz-packed); tensors left inside the graph are not listed. Per kind:
    tensors, elements and stored bytes; and the kind of every tensor by path."""
    kinds: dict[str, dict] = {}
    by_path: dict[str, str] = {}

    def add(kind: str, path: str | None, elements: int, stored: int) -> None:
        row = kinds.setdefault(kind, {"tensors": 0, "elements": 0, "stored_bytes": 0})
        row["tensors"] += 1
        row["elements"] += elements
        row["stored_bytes"] += stored
        if path is not None:
            by_path[path] = kind

    for t in summary.tensors:
        if t.encoding.startswith("raw"):
            kind = "kept raw"
        else:
            kind = "lossless integer" if t.dtype in dtypes.INTEGER_RANGES else "searched float"
        add(kind, t.path, t.elements, t.stored_bytes)
    for p in summary.packs:
        for m in p.members:
            add("searched float", m["path"], m["elements"], round(p.stored_bytes * m["elements"] / max(p.elements, 1)))
    return {"kinds": dict(sorted(kinds.items())), "tensors": dict(sorted(by_path.items(), key=lambda kv: str(kv[0])))}


@dataclass
class Baseline:
    dataset: Dataset
    metric: str
    reference: list
    quality: float
    layout: OutputLayout
    output_names: list[str]
    heads: metrics.Heads = ()
    max_drop: float | None = None  # the tolerance the file is checked against (guards on); None: a plain score

    def scorer(self) -> Scorer:
        return Scorer(None, self.metric, self.reference, self.dataset.labels, self.quality, self.dataset.n_samples,
                      heads=self.heads, max_drop=self.max_drop)


# The converter's own file, checked as it is written, is not hostile input: its decode is bounded by
# the model, not by a budget derived from the address space left at that moment (under an
# address-space limit, a worker pool's threads reserve much of it without using it).
OWN_FILE_LIMITS = replace(DEFAULT_LIMITS, memory_budget=DEFAULT_LIMITS.max_decoded_bytes)


def measure_path(path: str | os.PathLike, baseline: Baseline | None, limits: ReaderLimits = DEFAULT_LIMITS) -> Measured:
    """Load the file with moub_runtime exactly as a device would; measure quality and sizes."""
    import moub_runtime
    from moub_runtime.inspect import summarize

    summary = summarize(path, limits)
    if baseline is None:
        return Measured(None, None, summary.quantized_bytes, summary.file_bytes, resident_weights(summary),
                        coding_of(summary))
    session = moub_runtime.InferenceSession(path, sess_options=session_options(), limits=limits)
    names = baseline.output_names
    score = baseline.scorer().accumulate((start, baseline.layout(session.run(names, feeds)))
                                          for start, feeds in baseline.dataset.batches())
    del session
    return Measured(score.quality, score.loss, summary.quantized_bytes, summary.file_bytes, resident_weights(summary),
                    coding_of(summary), score.point_loss)


def measure(moub_bytes: bytes, baseline: Baseline | None) -> Measured:
    """:func:`measure_path` of bytes not yet written where the user asked."""
    with tempfile.TemporaryDirectory(prefix="moub-verify-") as folder:
        path = Path(folder) / "candidate.moub"
        path.write_bytes(moub_bytes)
        return measure_path(path, baseline, OWN_FILE_LIMITS)


@dataclass(frozen=True)
class HeldOut:
    """A file's quality against its original on data it was not chosen on."""

    samples: int
    metric: str
    reason: str
    quality_original: float
    quality_compressed: float
    loss: float

    def within(self, max_drop: float) -> bool:
        return self.loss <= max_drop + 1e-12

    def as_report(self, max_drop: float) -> dict:
        return {"samples": self.samples, "metric": self.metric, "quality_original": round(self.quality_original, 6),
                "quality_compressed": round(self.quality_compressed, 6), "loss": round(self.loss, 6),
                "within_max_drop": self.within(max_drop)}


def _baseline(source: SourceModel, pool: Pool, dataset: Dataset, metric: str | None, judged: metrics.Heads,
              outputs: tuple[str, ...] = (), reason: str = "chosen with --metric") -> tuple[Baseline, str]:
    """The original's outputs on ``dataset`` and the metric to judge by (``None``: the default per head)."""
    evaluator = Evaluator(source.model, pool, dataset, "serialize", outputs=outputs)
    reference = reference_outputs(evaluator, source.model, source.label)
    if metric is None:
        metric, reason, judged = heads.default_metric(source.model, reference, dataset.n_samples, dataset.labels,
                                                      evaluator.output_names)
    if metrics.METRICS[metric].needs_labels and dataset.labels is None:
        metric = metrics.METRICS[metric].confirm  # no labels: judge by agreement with the original
        reason = "no labels: agreement with the original"
    if dataset.labels is None:
        judged = metrics.confirm_heads(judged)
    metrics.check_metric(metric, dataset.labels, reference, judged)
    q0 = metrics.quality(metric, reference, reference, dataset.labels, judged)
    return Baseline(dataset, metric, reference, q0, evaluator.layout, evaluator.output_names, judged), reason


def held_out(source: SourceModel, pool: Pool, moub_bytes: bytes, data: DataSource, labels,
             batch_axes: Mapping[str, int | None] | None, metric: str, judged: metrics.Heads, options) -> HeldOut:
    """The written file scored on data the search never saw (``--test``), read like the search data."""
    dataset = load_dataset(data, source.model, labels=labels, batch_size=options.batch_size, batch_axes=batch_axes)
    baseline, reason = _baseline(source, pool, dataset, metric, judged, options.outputs, "the search's metric")
    measured = measure(moub_bytes, baseline)
    return HeldOut(dataset.n_samples, baseline.metric, reason, baseline.quality, measured.quality, measured.loss)


def _recorded(metadata: Mapping[str, str]) -> tuple[str | None, float | None]:
    """The metric and ``max_drop`` the file was converted with, where it says (and they are still known)."""
    metric = metadata.get("moub.metric")
    if metric not in metrics.user_metrics():
        metric = None  # the composite per-head metric is chosen again from the outputs, as the converter did
    try:
        max_drop = float(json.loads(metadata.get("moub.settings", "{}")).get("max_drop"))
    except (TypeError, ValueError, AttributeError):
        max_drop = None
    return metric, max_drop if max_drop is not None and math.isfinite(max_drop) else None


def score_file(model: str | os.PathLike, moub_path: str | os.PathLike, data: DataSource, labels=None,
               metric: str | None = None, batch_axes: Mapping[str, int | None] | None = None,
               max_drop: float | None = None) -> tuple[HeldOut, float | None]:
    """``moub_path`` against ``model`` on ``data``: the score and the tolerance it is judged by.

    Unless named, the metric and the tolerance are the ones the file records it was converted
    with; a file converted with the default per-head metric is judged per head again."""
    from moub_runtime.inspect import summarize

    recorded_metric, recorded_drop = _recorded(summarize(moub_path).metadata)
    if metric is not None and metric not in metrics.user_metrics():
        raise OptionError(f"--metric {metric!r} is not one of {', '.join(metrics.user_metrics())}")
    source = load_source(model)
    pool = pool_weights(source.model)
    dataset = load_dataset(data, source.model, labels=labels, batch_axes=batch_axes)
    named = "chosen with --metric" if metric else "the metric the file was converted with"
    baseline, reason = _baseline(source, pool, dataset, metric or recorded_metric, (), reason=named)
    measured = measure_path(moub_path, baseline)
    score = HeldOut(dataset.n_samples, baseline.metric, reason, baseline.quality, measured.quality, measured.loss)
    return score, max_drop if max_drop is not None else recorded_drop


def verify_lines(model: str, moub_path: str, data: str, labels: str | None = None, metric: str | None = None,
                 batch_axis: list[str] | tuple[str, ...] = (), shared: list[str] | tuple[str, ...] = (),
                 max_drop: float | None = None) -> list[str]:
    """What ``moub verify --model --data`` prints about the file's quality (the ``moub.scoring`` entry point).

    Raises a ``ValueError`` (a :class:`~.errors.ConvertError`) for bad input, which the runtime's
    command reports as one line and exit 2."""
    score, tolerance = score_file(model, moub_path, data, labels, metric, parse_batch_axes(batch_axis, shared),
                                  max_drop)
    lines = [f"scored on {score.samples} samples by {score.metric} ({score.reason}):",
             f"  original {score.quality_original:.4f}, file {score.quality_compressed:.4f}, "
             f"loss {score.loss:.4f}"]
    if tolerance is not None:
        verdict = "within" if score.within(tolerance) else "OUTSIDE"
        lines[-1] += f": {verdict} --max-drop {tolerance:g}"
    return lines
