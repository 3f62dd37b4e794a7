"""``convert()``: the library entry point; the CLI is a thin layer over it.

load and pool -> data, metric and the original's quality (once) -> the mode's
search -> the smallest feasible candidate written as a .moub -> decoded again
by ``moub_runtime`` and its quality measured through a plain onnxruntime
session (what the report states) -> report.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from moub_format import writer
from moub_format.writer import PRODUCER
from moub_runtime.output import unwritable_reason

from . import heads, metrics
from .data import Dataset, load_dataset
from .encode import encode_model
from .errors import ConvertError, DataError, ModelError, OutputError, ToleranceError
from .evaluate import Evaluator, OutputLayout, Scorer, reference_outputs, session_options
from .intake import Pool, SourceModel, load_source, pool_weights
from .modes import get_mode
from .candidates import Candidate, Stage
from .modes.base import ModeContext
from .modes.paper import fixed_bins
from .options import ConvertOptions, describe, keyword_parameters
from .report import REPORT_VERSION, RichProgress, closing_table, dumps, front_of, stage_rows
from .resolution import resolution
from .scoring import Baseline, Measured, held_out, measure
from .session import ConversionSession
from .solution import Quantization
from .workers import candidate_map

VERIFY_CANDIDATES = 3  # if the written file misses the tolerance (float noise), try the next ones


@dataclass
class ConvertResult:
    moub_bytes: bytes
    report: dict
    front: list[dict]
    quality_original: float | None
    quality_compressed: float | None
    evaluations: int
    wall_seconds: float
    metric: str | None

    @property
    def ratio(self) -> float:
        return self.report["file"]["ratio"]

    def write(self, path: str | os.PathLike) -> int:
        """Write the .moub atomically (temp file in the target folder, fsync, rename); return bytes."""
        check_writable(path)
        try:
            writer.write_atomic(path, self.moub_bytes)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        return len(self.moub_bytes)

    def report_json(self) -> str:
        return dumps(self.report)

    def write_report(self, path: str | os.PathLike) -> None:
        check_writable(path)
        try:
            writer.write_atomic(path, self.report_json().encode())
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None

    def write_plot(self, path: str | os.PathLike) -> None:
        from .report import plot

        check_writable(path)
        if not self.report.get("candidates"):
            raise OutputError(f"{path}: no search ran (fixed --bins), nothing to plot")
        tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
        try:
            plot(self.report, tmp)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None

    def closing_table(self) -> str:
        return closing_table(self.report, self.wall_seconds, self.evaluations)


def check_writable(path: str | os.PathLike) -> None:
    """Fail before any work if ``path`` cannot be written (folder missing or read-only, a directory)."""
    reason = unwritable_reason(path)
    if reason:
        raise OutputError(reason)


def _metadata(source: SourceModel, options: ConvertOptions, metric: str | None, q0: float | None,
              q1: float | None, front: list[dict]) -> dict[str, str]:
    meta = {
        "moub.source_sha256": source.sha256,
        "moub.settings": json.dumps(options.settings(), sort_keys=True, separators=(",", ":")),
        "moub.front": json.dumps(front, sort_keys=True, separators=(",", ":")),
    }
    if metric is not None:
        meta["moub.metric"] = metric
    if q0 is not None:
        meta["moub.quality_original"] = f"{q0:.6f}"
    if q1 is not None:
        meta["moub.quality_compressed"] = f"{q1:.6f}"
    return meta


def _front_rows(front: list[Candidate], q0: float) -> list[dict]:
    return [{"name": c.name, "bins": c.bins, "quality": round(c.quality, 6), "drop": round(q0 - c.quality, 6),
             "loss": round(c.loss, 6), "bits_per_weight": round(c.bits_per_weight, 4)} for c in front]


class _Counter:
    """Counts evaluations (candidates scored) and the onnxruntime work they took."""

    def __init__(self, progress: Callable[[dict], None] | None) -> None:
        self.progress = progress
        self.evaluations = 0
        self.stopped_early = 0   # loss provably beyond the limit
        self.dominated = 0       # loss provably no better than a smaller known candidate
        self.units = 0           # samples (or time steps) run, over all evaluations

    def __call__(self, event: dict) -> None:
        if "result" in event:
            r = event["result"]
            self.evaluations += 1
            self.stopped_early += r.get("stopped") == "tolerance"
            self.dominated += r.get("stopped") == "dominated"
            self.units += r.get("units", 0)
        if self.progress:
            self.progress(event)


def convert(
    model_or_path: str | os.PathLike | onnx.ModelProto,
    data: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    labels=None,
    *,
    batch_axes: Mapping[str, int | None] | None = None,
    test=None,
    test_labels=None,
    quiet: bool = True,
    progress: Callable[[dict], None] | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
    **option_keywords,
) -> ConvertResult:
    """Compress an ONNX model into .moub bytes; ``docs/method.md`` describes the method.

    ``model_or_path`` may be a TorchScript file (``.pt``) with ``input_shapes=[(1, 3, 32, 32)]``.
    ``quiet``: no progress bar; ``progress``: a function that sees every progress event instead.
    The options are keywords, one per field of :class:`~.options.ConvertOptions` (the CLI's flags
    are the same options):

{options}
    """
    started = time.perf_counter()
    options = ConvertOptions.from_keywords(option_keywords)
    mode_impl = get_mode(options.mode)
    source = load_source(model_or_path, input_shapes)
    pool = pool_weights(source.model, options.min_elements)
    if pool.n_weights == 0:
        raise ModelError(f"{source.label}: no float weights with at least {options.min_elements} elements to compress")
    if data is None:
        if options.bins is None:
            raise DataError("no sample data: pass data (--data DATA.npz), or --bins K to encode without a search")
        return _fixed(source, pool, options, started)

    dataset = load_dataset(data, source.model, labels=labels, batch_size=options.batch_size, batch_axes=batch_axes)
    evaluator = Evaluator(source.model, pool, dataset, options.strategy, outputs=options.outputs)
    try:
        reference = reference_outputs(evaluator, source.model, source.label)
    except ModelError:
        if evaluator.strategy == "serialize":
            raise
        # the plain model, in case handing weights over is what onnxruntime refused
        evaluator = Evaluator(source.model, pool, dataset, "serialize", outputs=options.outputs)
        reference = reference_outputs(evaluator, source.model, source.label)
    if options.metric:
        chosen_metric, metric_reason, judged = options.metric, "chosen with --metric", ()
    else:
        chosen_metric, metric_reason, judged = heads.default_metric(source.model, reference, dataset.n_samples,
                                                                    dataset.labels, evaluator.output_names)
    metrics.check_metric(chosen_metric, dataset.labels, reference, judged)
    q0 = metrics.quality(chosen_metric, reference, reference, dataset.labels, judged)
    baseline = Baseline(dataset, chosen_metric, reference, q0, evaluator.layout, evaluator.output_names, judged)
    if options.bins is not None:
        return _fixed(source, pool, options, started, baseline)

    session = ConversionSession(source.model, pool, dataset, chosen_metric, reference, q0, options, evaluator.strategy,
                                judged)
    session.use_scorer(Scorer(evaluator, chosen_metric, reference, dataset.labels, q0, heads=judged))
    bar = RichProgress(q0, options.max_drop) if progress is None and not quiet else None
    counter = _Counter(progress or bar)
    try:
        with candidate_map(session, options.workers, on_result=lambda r: counter({"result": r})) as mapper:
            result = mode_impl.run(ModeContext(pool, session, options, mapper, counter))
    finally:
        if bar:
            bar.close()
    result.facts["evaluation_strategy"] = evaluator.strategy
    if not result.feasible:
        best = min((c for c in result.candidates if c.complete), key=lambda c: c.loss, default=None)
        hint = f"; best found: {best.name} with loss {best.loss:.4f}" if best else ""
        raise ToleranceError(f"no candidate stays within --max-drop {options.max_drop} on {chosen_metric}{hint}; "
                             f"raise --max-bins or --max-drop")

    front = front_of(result.candidates, q0)
    front_rows = _front_rows(front, q0)
    for candidate in result.feasible[:VERIFY_CANDIDATES]:
        quant, stages = mode_impl.materialize(pool, candidate, options, result.candidates)
        trial = _encode(source, quant, pool, _metadata(source, options, chosen_metric, q0, None, front_rows))
        measured = measure(trial, baseline)
        if measured.loss <= options.max_drop + 1e-12:
            break
    else:
        raise ToleranceError(f"the written file misses --max-drop {options.max_drop} when decoded by moub_runtime "
                             f"(loss {measured.loss:.4f}); raise --max-drop or give more data")
    moub_bytes = _encode(source, quant, pool, _metadata(source, options, chosen_metric, q0, measured.quality, front_rows))
    final = measure(moub_bytes, None)
    report = _report(source, pool, options, chosen_metric, q0, measured, dataset, stages, final,
                     len(moub_bytes), result.candidates, front, candidate, result.facts, counter, quant, reference)
    report["metric_reason"] = metric_reason
    if judged:
        report["heads"] = [{"output": evaluator.output_names[i], "metric": m} for i, m in judged]
    if test is not None:
        report["test"] = held_out(source, pool, moub_bytes, test, test_labels, batch_axes, chosen_metric, judged,
                                  options).as_report(options.max_drop)
    return ConvertResult(moub_bytes, report, report["front"], q0, measured.quality, counter.evaluations,
                         time.perf_counter() - started, chosen_metric)


if convert.__doc__:  # None under python -OO
    convert.__doc__ = convert.__doc__.format(options=describe())
convert.__signature__ = inspect.signature(convert).replace(parameters=[  # the options as keywords, from their declaration
    *(p for p in inspect.signature(convert).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD),
    *keyword_parameters()])


def _encode(source: SourceModel, quant, pool: Pool, metadata: dict[str, str]) -> bytes:
    """The .moub bytes of a mode's quantization (codebook assignments and, format 1.2, packs)."""
    return encode_model(source.model, quant.codebooks, quant.assignments(pool), metadata,
                        packs=getattr(quant, "packs", ()), **getattr(quant, "build_options", {}))


def _fixed(source: SourceModel, pool: Pool, options: ConvertOptions, started: float,
           baseline: Baseline | None = None) -> ConvertResult:
    """``bins=K``: equal-width binning with K bins, no search; quality measured only with data."""
    metric = baseline.metric if baseline else None
    q0 = baseline.quality if baseline else None
    quant, stages = fixed_bins(pool, options.bins, options.representative)
    trial = encode_model(source.model, quant.codebooks, quant.assignments(pool), _metadata(source, options, metric, q0, None, []))
    measured = measure(trial, baseline)
    del trial  # not beside the final file
    for stage in stages:
        stage.quality = measured.quality
    moub_bytes = encode_model(source.model, quant.codebooks, quant.assignments(pool),
                              _metadata(source, options, metric, q0, measured.quality, []))
    final = measure(moub_bytes, None)
    known = measured.quality is not None
    chosen = Candidate(f"k={options.bins}", "fixed", measured.quality if known else 0.0, measured.loss if known else 0.0,
                       known, stages[-1].size.bits_per_weight, quant.bins_used(), {"k": options.bins, "merges": []})
    report = _report(source, pool, options, metric, q0, measured, baseline.dataset if baseline else None, stages, final,
                     len(moub_bytes), [], [], chosen, {"method": "fixed bins"}, _Counter(None), quant,
                     baseline.reference if baseline else None)
    return ConvertResult(moub_bytes, report, [], q0, measured.quality, 0, time.perf_counter() - started, metric)


def _report(source: SourceModel, pool: Pool, options: ConvertOptions, metric, q0, measured: Measured, dataset: Dataset | None,
            stages: list[Stage], final: Measured, file_bytes: int, candidates: list[Candidate],
            front: list[Candidate], chosen: Candidate, facts: dict, counter: _Counter, quant: Quantization,
            reference: list[np.ndarray] | None = None) -> dict:
    q1 = measured.quality
    rows = stage_rows(stages, final.weight_bytes, file_bytes, source.original_bytes, pool.n_weights)
    bits_file = rows[-1]["bits_per_weight"]
    choice = {
        "name": chosen.name,
        "stage": chosen.stage,
        "bins": quant.bins_used(),
        "quality_search": None if q0 is None or not chosen.complete else round(chosen.quality, 6),
        "loss_search": None if q0 is None or not chosen.complete else round(chosen.loss, 6),
        "quality": None if q1 is None else round(q1, 6),
        "loss": None if measured.loss is None else round(measured.loss, 6),
        "bits_per_weight": round(chosen.bits_per_weight, 6),
        "bits_per_weight_file": bits_file,
        "recipe": chosen.recipe,
    }
    q_ref = q0 if q0 is not None else 0.0
    return {
        "report_version": REPORT_VERSION,
        "producer": PRODUCER,
        "source": {"name": Path(source.label).name, "sha256": source.sha256, "bytes": source.original_bytes},
        "settings": options.settings(),
        "metric": metric,
        "quality_original": None if q0 is None else round(q0, 6),
        "quality_compressed": None if q1 is None else round(q1, 6),
        "loss": None if measured.loss is None else round(measured.loss, 6),
        "loss_measure": None if metric is None else metrics.METRICS[metric].loss_measure,
        # a count of broken samples needs one row per sample (not a time step or a frame of a feed)
        "resolution": None if reference is None or dataset is None or not reference[0].ndim
        or reference[0].shape[0] != dataset.n_samples else resolution(metric, reference, measured.loss, options.max_drop),
        "data": None if dataset is None else {"samples": dataset.n_samples, "batch_size": dataset.batch_size,
                                              "labels": dataset.labels is not None, "notes": list(dataset.notes)},
        "pool": pool.summary(),
        "search": facts,
        "evaluations": counter.evaluations,
        "evaluations_stopped_early": counter.stopped_early,
        "evaluations_dominated": counter.dominated,
        "evaluated_units": counter.units,
        "candidates": [c.to_dict(q_ref) for c in candidates],
        "front": [c.to_dict(q_ref) for c in front],
        "choice": choice,
        "stages": rows,
        "file": {"bytes": file_bytes, "ratio": round(source.original_bytes / file_bytes, 4),
                 "weight_bytes": final.weight_bytes, "other_bytes": file_bytes - final.weight_bytes},
    }


__all__ = ["convert", "ConvertResult", "ConvertError", "check_writable"]
