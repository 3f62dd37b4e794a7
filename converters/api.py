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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from moub_format import constants as FC
from moub_format import writer
from moub_format.writer import PRODUCER
from moub_runtime.output import unwritable_reason

from . import fallback, guards, heads, lossless, metrics, targets
from .data import Dataset, load_dataset
from .encode import encode_model
from .errors import ConvertError, DataError, ModelError, OutputError, ToleranceError
from .evaluate import Evaluator, Scorer, reference_outputs
from .intake import Pool, SourceModel, load_source, pool_weights
from .layer_errors import layer_table
from .integers import IntegerCoding, integer_coding
from .modes import get_mode
from .candidates import Candidate, Stage
from .modes.base import Mode, ModeContext
from .modes.paper import fixed_bins
from .options import ConvertOptions, describe, keyword_parameters
from .passed_over import passed_over
from .progress import ConsoleProgress
from .report import REPORT_VERSION, closing_table, dumps, front_of, stage_rows
from .resolution import resolution
from .scoring import OWN_FILE_LIMITS, Baseline, Measured, held_out, measure
from .session import ConversionSession
from .solution import Quantization, Size
from .uniform import RAM_LEVEL_LIMITS, site_stats
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

    def write_plot(self, path: str | os.PathLike, compare: Sequence[dict] = ()) -> None:
        """The Pareto plot beside bits per tensor against sensitivity (``plots.py``); ``compare``:
        reports of other runs on the same model whose choices it marks (e.g. the paper mode's)."""
        from .plots import plot

        check_writable(path)
        if not self.report.get("candidates"):
            raise OutputError(f"{path}: no search ran (fixed --bins), nothing to plot")
        tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
        try:
            plot(self.report, tmp, compare)
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
    integers = integer_coding(source.model, options.min_elements)
    if pool.n_weights == 0 and not integers.all_elements:
        raise ModelError(f"{source.label}: no float weights with at least {options.min_elements} elements to compress")
    if data is None:
        if pool.n_weights == 0:
            return _lossless(source, pool, options, started, integers)
        if options.bins is None:
            raise DataError("no sample data: pass data (--data DATA.npz), or --bins K to encode without a search")
        return _fixed(source, pool, options, started, integers)

    setup = _Setup.build(source, pool, data, labels, batch_axes, options)
    if pool.n_weights == 0:
        return _lossless(source, pool, options, started, integers, setup.baseline)
    if options.bins is not None:
        return _fixed(source, pool, options, started, integers, setup.baseline)

    session = setup.session(source.model, options)
    target = options.target(source.original_bytes)
    bar = ConsoleProgress(options.max_drop) if progress is None and not quiet else None
    counter = _Counter(progress or bar)
    try:
        with candidate_map(session, options.workers, on_result=lambda r: counter({"result": r})) as mapper:
            context = ModeContext(pool, session, options, mapper, counter)
            result = mode_impl.run(context)
            if target is not None and hasattr(mode_impl, "toward_size"):
                other = _Writer(source, pool, options, setup, mode_impl, result.candidates,
                                _front_rows(front_of(result.candidates, setup.q0), setup.q0),
                                integers=integers).other_bytes()
                result.candidates += mode_impl.toward_size(context, 8 * (target - other) / pool.n_weights)
        result.facts["evaluation_strategy"] = setup.evaluator.strategy
        front = front_of(result.candidates, setup.q0)
        front_rows = _front_rows(front, setup.q0)
        written = _Writer(source, pool, options, setup, mode_impl, result.candidates, front_rows, session, counter,
                          integers=integers)
        if not result.feasible and target is None:  # never worse than lossless: the exact file, said why
            limited = f" (--ram {options.ram} limits the finest step)" if options.ram != "float" else ""
            return _keep_exact(written, mode_impl, _no_candidate(result.candidates, options.max_drop, setup.metric) + limited,
                               counter, started, test, test_labels, batch_axes, front)

        counter({"phase": "write", "total": None})
        if target is None:
            try:
                moub_bytes, chosen = written.within_tolerance(result.feasible)
            except ToleranceError:
                worst = max(miss["loss"] for miss in written.misses)
                return _keep_exact(written, mode_impl, f"the smallest candidates within --max-drop {options.max_drop} on "
                                   f"the search miss it when decoded by moub_runtime (loss up to {worst:.4f})", counter,
                                   started, test, test_labels, batch_axes, front)
            if written.no_larger_lossless(moub_bytes, chosen):  # never larger than lossless
                return written.lossless(f"it is no larger than the smallest lossy file within tolerance "
                                        f"({len(moub_bytes):,} bytes)", counter, started, test, test_labels,
                                        batch_axes, front)
        else:
            moub_bytes, chosen = written.within_target(target)
        return written.result(moub_bytes, chosen, front, result.facts, counter, started, test, test_labels, batch_axes)
    finally:
        if bar:
            bar.close()


@dataclass
class _Setup:
    """What every conversion of one model on one data set measures first: the data, the
    original's outputs, the metric (chosen per output head unless given) and the original's quality."""

    dataset: Dataset
    evaluator: Evaluator
    reference: list[np.ndarray]
    metric: str
    metric_reason: str
    judged: metrics.Heads
    q0: float
    max_drop: float | None = None  # the tolerance the choice is guarded against (guards.py); None: plain scores
    guard_notes: list[str] = field(default_factory=list)  # what the samples cannot resolve, said before the search

    @classmethod
    def build(cls, source: SourceModel, pool: Pool, data, labels, batch_axes, options: ConvertOptions) -> _Setup:
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
            metric, reason, judged = options.metric, "chosen with --metric", ()
        else:
            metric, reason, judged = heads.default_metric(source.model, reference, dataset.n_samples, dataset.labels,
                                                          evaluator.output_names)
        metrics.check_metric(metric, dataset.labels, reference, judged)
        q0 = metrics.quality(metric, reference, reference, dataset.labels, judged)
        return cls(dataset, evaluator, reference, metric, reason, judged, q0, options.guarded_max_drop())

    @property
    def baseline(self) -> Baseline:
        return Baseline(self.dataset, self.metric, self.reference, self.q0, self.evaluator.layout,
                         self.evaluator.output_names, self.judged, self.max_drop)

    def annotate(self, converted: ConvertResult, source: SourceModel, pool: Pool, options: ConvertOptions, test=None,
                 test_labels=None, batch_axes=None) -> ConvertResult:
        """The report's account of the metric and, with ``test``, the file scored on held-out data."""
        report = converted.report
        report["metric_reason"] = self.metric_reason
        report["guards"] = self.guard_notes
        if self.judged:
            report["heads"] = [{"output": self.evaluator.output_names[i], "metric": m} for i, m in self.judged]
        if test is not None:
            report["test"] = held_out(source, pool, converted.moub_bytes, test, test_labels, batch_axes, self.metric,
                                      self.judged, options).as_report(options.max_drop)
        return converted

    def session(self, model: onnx.ModelProto, options: ConvertOptions) -> ConversionSession:
        session = ConversionSession(model, self.evaluator.pool, self.dataset, self.metric, self.reference,
                                    self.q0, options, self.evaluator.strategy, self.judged)
        session.use_scorer(Scorer(self.evaluator, self.metric, self.reference, self.dataset.labels, self.q0,
                                  heads=self.judged, max_drop=self.max_drop))
        if self.max_drop is not None:
            self.guard_notes = _guard_notes(self.metric, self.judged, session.scorer, options.max_drop)
        return session


@dataclass
class _Writer:
    """Writes one evaluated candidate as the converter writes its files: encoded, decoded again by
    ``moub_runtime`` and measured on all the data, then encoded with that quality in its metadata."""

    source: SourceModel
    pool: Pool
    options: ConvertOptions
    setup: _Setup
    mode: Mode
    candidates: list[Candidate]
    front_rows: list[dict]
    session: ConversionSession | None = None  # for the per-layer error shares (None: no per-layer table)
    progress: Callable[[dict], None] = lambda event: None
    misses: list[dict] = field(default_factory=list)  # choices whose written file missed --max-drop
    integers: IntegerCoding | None = None  # the integer tensors coded losslessly beside the weights (None: found here)

    def __post_init__(self) -> None:
        if self.integers is None:
            self.integers = integer_coding(self.source.model, self.options.min_elements)

    def _trial(self, candidate: Candidate, quality: float | None = None) -> tuple[bytes, Quantization, list[Stage]]:
        quant, stages = self.mode.materialize(self.pool, candidate, self.options, self.candidates)
        metadata = _metadata(self.source, self.options, self.setup.metric, self.setup.q0, quality, self.front_rows)
        return _encode(self.source, quant, self.pool, self.integers, metadata), quant, stages

    def write(self, candidate: Candidate) -> tuple[bytes, tuple]:
        """The file of ``candidate`` (with its measured quality) and what the report needs of it."""
        trial, quant, stages = self._trial(candidate)
        measured = measure(trial, self.setup.baseline)
        del trial
        moub_bytes = _encode(self.source, quant, self.pool, self.integers, _metadata(self.source, self.options, self.setup.metric,
                                                                     self.setup.q0, measured.quality, self.front_rows))
        return moub_bytes, (candidate, quant, stages, measured)

    def within_tolerance(self, feasible: list[Candidate]) -> tuple[bytes, tuple]:
        """The first of the mode's choices whose written file stays within --max-drop on all the data."""
        for candidate in feasible[:VERIFY_CANDIDATES]:
            trial, quant, stages = self._trial(candidate)
            measured = measure(trial, self.setup.baseline)
            if measured.loss <= self.options.max_drop + 1e-12:
                break
            self.misses.append({"name": candidate.name, "loss": round(measured.loss, 6)})
        else:
            raise ToleranceError(f"the written file misses --max-drop {self.options.max_drop} when decoded by "
                                 f"moub_runtime (loss {measured.loss:.4f}); raise --max-drop or give more data")
        del trial
        moub_bytes = _encode(self.source, quant, self.pool, self.integers, _metadata(self.source, self.options, self.setup.metric,
                                                                     self.setup.q0, measured.quality, self.front_rows))
        return moub_bytes, (candidate, quant, stages, measured)

    def other_bytes(self) -> int:
        """What a file of this model spends beside its weights (graph, pass-through tensors,
        index, metadata): measured on the smallest candidate's file."""
        candidate = targets.smallest(self.candidates)
        trial, _, _ = self._trial(candidate, quality=1.0)
        return max(0, len(trial) - int(candidate.bits_per_weight * self.pool.n_weights / 8))

    def within_target(self, target: int) -> tuple[bytes, tuple]:
        """The least-loss evaluated candidate whose file fits ``target`` bytes (``targets.py``)."""
        n, other, tried = self.pool.n_weights, 0, set()
        for _ in range(targets.MAX_TRIES):
            order = [c for c in targets.fitting(self.candidates, n, target, other) if c.name not in tried]
            if not order:
                break
            candidate = order[0]
            tried.add(candidate.name)
            # the original's quality stands in for the file's: the same length in the metadata
            size = len(self._trial(candidate, quality=self.setup.q0)[0])
            if size <= target:
                moub_bytes, chosen = self.write(candidate)
                if len(moub_bytes) <= target:
                    return moub_bytes, chosen
                size = len(moub_bytes)
            other = max(other, size - int(candidate.bits_per_weight * n / 8))
        small = targets.smallest(self.candidates)
        raise ToleranceError(f"no evaluated candidate's file fits {target:,} bytes; the smallest, {small.name}, takes "
                             f"about {int(small.bits_per_weight * n / 8) + other:,} bytes")

    def _layers(self, moub_bytes: bytes, quant: Quantization, facts: dict) -> tuple[list[dict], dict]:
        from moub_runtime.layers import layer_rows

        with tempfile.TemporaryDirectory(prefix="moub-layers-") as folder:
            path = Path(folder) / "chosen.moub"
            path.write_bytes(moub_bytes)
            file_rows = layer_rows(path, OWN_FILE_LIMITS)
        calibration = getattr(self.mode, "calib", None)
        rules = calibration.corrector.rules if calibration is not None else ()
        return layer_table(self.session, file_rows, quant.site_arrays(self.pool), rules, facts, self.progress,
                           self.options.layer_shares)

    def result(self, moub_bytes: bytes, chosen: tuple, front: list[Candidate], facts: dict, counter: _Counter,
               started: float, test=None, test_labels=None, batch_axes=None) -> ConvertResult:
        candidate, quant, stages, measured = chosen
        setup, options, source = self.setup, self.options, self.source
        final = measure(moub_bytes, None)
        report = _report(source, self.pool, options, setup.metric, setup.q0, measured, setup.dataset, stages, final,
                         len(moub_bytes), self.candidates, front, candidate, facts, counter, quant, setup.reference,
                         self.integers)
        if self.misses:
            report["written_misses"] = self.misses
        report["passed_over"] = passed_over(report)
        if self.session is not None:
            report["layers"], report["layer_error"] = self._layers(moub_bytes, quant, facts)
        report["file_front"] = self.front_rows  # as the file's metadata holds it: a point written from the report matches
        target = options.target(source.original_bytes)
        if target is not None:
            report["target"] = {"bytes": target, "file_bytes": len(moub_bytes),
                                "within_max_drop": measured.loss <= options.max_drop + 1e-12}
        return setup.annotate(ConvertResult(moub_bytes, report, report["front"], setup.q0, measured.quality,
                                            counter.evaluations, time.perf_counter() - started, setup.metric),
                              source, self.pool, options, test, test_labels, batch_axes)

    def lossless(self, why: str, counter: _Counter, started: float, test=None, test_labels=None,
                 batch_axes=None, front: list[Candidate] = ()) -> ConvertResult:
        """The lossless file (integers coded, every float exact) in place of a searched one; the search
        stays in the report."""
        converted = _lossless(self.source, self.pool, self.options, started, self.integers, self.setup.baseline, why,
                              counter, self.candidates, list(front))
        return self.setup.annotate(converted, self.source, self.pool, self.options, test, test_labels, batch_axes)

    def lossless_size(self) -> int:
        """The lossless file's length (its quality is the original's)."""
        metadata = _metadata(self.source, self.options, self.setup.metric, self.setup.q0, self.setup.q0, [])
        return len(_lossless_bytes(self.source, self.integers, metadata))

    def no_larger_lossless(self, moub_bytes: bytes, chosen: tuple) -> bool:
        """Whether the lossless file is no larger than the searched one (checked where it could be:
        a lossy file over a quarter of the model, or a model whose integers outweigh its floats)."""
        if not (self.already_quantized or lossless.worth_comparing(len(moub_bytes), self.source.original_bytes)):
            return False
        metadata = _metadata(self.source, self.options, self.setup.metric, self.setup.q0, chosen[3].quality, [])
        return len(_lossless_bytes(self.source, self.integers, metadata)) <= len(moub_bytes)

    @property
    def already_quantized(self) -> bool:
        """Its integer weights outnumber its float weights more than four times: no searched file is worth more than
        the lossless one when the search finds nothing within the tolerance."""
        return 4 * self.pool.n_weights < self.integers.all_elements


def _keep_exact(written: _Writer, mode: Mode, why: str, counter: _Counter, started: float, test=None, test_labels=None,
                batch_axes=None, front: list[Candidate] = ()) -> ConvertResult:
    """Where no candidate holds the tolerance: the file keeping the most sensitive tensors exact and
    searching the rest (``fallback.py``) where one holds it and is smaller than the lossless file;
    else the lossless file. A mode that measures no sensitivity per tensor (the paper's) writes the
    lossless file."""
    trials: list[fallback.ExactTrial] = []
    measures_sensitivity = hasattr(mode, "narrowed") and getattr(mode, "measured", None) is not None
    found = _search_keeping_exact(written, mode, counter, trials) if measures_sensitivity else None
    if found is None:
        if trials:
            widening = "giving every 4-bit weight the int8 window, " if any(t.widened for t in trials) else ""
            widening += "every tensor the int16 window, " if any(t.sixteen_bit for t in trials) else ""
            why += (f"; {widening}{'and ' if widening else ''}keeping the most sensitive tensors exact (up to "
                    f"{100 * trials[-1].share:.0f}% of the weights) gave no smaller file within it")
        converted = written.lossless(why, counter, started, test, test_labels, batch_axes, front)
        if trials:
            converted.report["lossless"]["kept_exact_trials"] = [t.as_dict() for t in trials]
        return converted
    converted = found.writer.result(found.moub_bytes, found.chosen, front_of(found.writer.candidates, written.setup.q0),
                                    found.facts, counter, started, test, test_labels, batch_axes)
    if found.exact:
        converted.report["kept_exact"] = fallback.kept_exact_report(written.pool, found.exact, why, trials, found.lossless_bytes)
    if found.widened:
        converted.report["widened_to_int8"] = fallback.widened_report(written.pool, found.widened, why, trials)
    if found.sixteen_bit:
        converted.report["widened_to_int16"] = fallback.sixteen_bit_report(written.pool, found.sixteen_bit, why, trials)
    return converted


@dataclass
class _KeptExact:
    """A file within the tolerance with the sites ``exact`` kept exact, and what its report needs."""

    writer: _Writer
    moub_bytes: bytes
    chosen: tuple
    facts: dict
    exact: list[int]
    lossless_bytes: int
    widened: list[int] = field(default_factory=list)   # 4-bit sites given the int8 window
    sixteen_bit: list[int] = field(default_factory=list)   # sites given the int16 window


def _fallback_variants(pool: Pool, distortions: np.ndarray, ram: str) -> list[tuple[list[int], list[int], list[int]]]:
    """(4-bit sites given the int8 window, sites given the int16 window, sites kept exact) to try in
    turn (``fallback.py``): under ``--ram int4`` first the 4-bit windows widened; under any ``--ram``
    then the most sensitive tensors given the int16 window, with all 4-bit ones widened; then
    tensors kept exact with every other one in the widest window tried. Each step orders the
    tensors by their sensitivity at the floors of the pool the step before leaves."""
    limit = RAM_LEVEL_LIMITS[ram]
    order = fallback.sensitivity_order(site_stats(pool, limit), distortions)
    widen_sets = fallback.four_bit_sets(pool, order) if ram == "int4" else []
    every = widen_sets[-1] if widen_sets else []
    base = fallback.widened(pool, every)
    if every:
        order = fallback.sensitivity_order(site_stats(base, limit), distortions)
    sizes = np.array([site.size for site in pool.sites], dtype=np.int64)
    sixteen_sets = fallback.exact_sets(sizes, order, fallback.WIDEN_SHARES) if limit.levels is not None else []
    wide = sixteen_sets[-1] if sixteen_sets else []
    if wide:
        order = fallback.sensitivity_order(site_stats(fallback.sixteen_bit(base, wide), limit), distortions)
    return ([(w, [], []) for w in widen_sets] + [(every, s, []) for s in sixteen_sets]
            + [(every, wide, exact) for exact in fallback.exact_sets(sizes, order)])


def _search_keeping_exact(written: _Writer, mode, counter: _Counter, trials: list[fallback.ExactTrial]) -> _KeptExact | None:
    """Search the pool less its most sensitive tensors, in growing sets (``fallback.py``; under
    ``--ram`` first with its most sensitive tensors given wider windows), until a search yields a
    file within the tolerance; that file where it is smaller than the lossless one.
    Each variant tried is added to ``trials``."""
    source, pool, options, setup = written.source, written.pool, written.options, written.setup
    lossless_bytes = written.lossless_size()
    variants = _fallback_variants(pool, mode.measured[0], options.ram)
    for number, (widen, sixteen, exact) in enumerate(variants):
        counter({"phase": "keep exact", "total": len(variants) - number})  # one probe per variant left
        if len(exact) == len(pool.sites):
            break
        reduced = fallback.sixteen_bit(fallback.widened(pool, widen), sixteen)
        if exact:
            reduced = reduced.without(exact, fallback.REASON_KEPT_EXACT)
        session = written.session.with_pool(reduced)
        held = set(exact)
        narrowed = mode.narrowed([i for i in range(len(pool.sites)) if i not in held])
        with candidate_map(session, options.workers, on_result=lambda r: counter({"result": r})) as mapper:
            context = ModeContext(reduced, session, options, mapper, counter)
            finest, holds = narrowed.finest(context)
            result = narrowed.run(context) if holds else None
        weights = pool.n_weights - reduced.n_weights
        sixteen = [i for i in sixteen if i not in held]
        trial = fallback.ExactTrial(len(exact), weights, weights / pool.n_weights, finest.loss, "finest step misses",
                                    len(widen), sum(pool.sites[i].size for i in widen),
                                    len(sixteen), sum(pool.sites[i].size for i in sixteen))
        trials.append(trial)
        if result is None:
            continue
        if not result.feasible:
            trial.outcome = "no candidate"
            continue
        kept = _Writer(source, reduced, options, setup, narrowed, result.candidates,
                       _front_rows(front_of(result.candidates, setup.q0), setup.q0), session, counter,
                       integers=written.integers)
        try:
            moub_bytes, chosen = kept.within_tolerance(result.feasible)
        except ToleranceError:
            trial.outcome = "written file misses"
            continue
        if len(moub_bytes) >= lossless_bytes:
            trial.outcome = "no smaller than lossless"
            return None
        trial.outcome = "written"
        result.facts["evaluation_strategy"] = setup.evaluator.strategy
        return _KeptExact(kept, moub_bytes, chosen, result.facts, exact, lossless_bytes, widen, sixteen)
    return None


def _point(measured: Measured) -> float | None:
    return measured.loss if measured.point_loss is None else measured.point_loss


def _guard_notes(metric: str, judged: metrics.Heads, scorer: Scorer, max_drop: float) -> list[str]:
    """What the samples cannot resolve, said before the search (``guards.py``)."""
    parts = [(m, scorer._totals(m, [scorer.reference[i]])[0]) for i, m in judged] if judged else [(metric, scorer.total_units)]
    return [note for m, units in parts if (note := guards.resolution_note(m, units, max_drop))]


def _no_candidate(candidates: list[Candidate], max_drop: float, metric: str) -> str:
    """Why the search found nothing to write, without contradicting itself: a best loss within
    the tolerance on the search half means the confirm half refused it."""
    best = min((c for c in candidates if c.complete), key=lambda c: c.loss, default=None)
    if best is None:
        return f"no candidate stays within --max-drop {max_drop} on {metric}"
    if best.loss <= max_drop + 1e-12:
        return (f"no candidate within --max-drop {max_drop} on {metric} on the search half (best {best.name}, "
                f"loss {best.loss:.4f}) holds on the confirm half")
    return f"no candidate stays within --max-drop {max_drop} on {metric} (best {best.name}, loss {best.loss:.4f})"


if convert.__doc__:  # None under python -OO
    convert.__doc__ = convert.__doc__.format(options=describe())
convert.__signature__ = inspect.signature(convert).replace(parameters=[  # the options as keywords, from their declaration
    *(p for p in inspect.signature(convert).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD),
    *keyword_parameters()])


def _encode(source: SourceModel, quant, pool: Pool, integers: IntegerCoding, metadata: dict[str, str]) -> bytes:
    """The .moub bytes of a mode's quantization (codebook assignments and, format 1.2, packs),
    the integer tensors coded losslessly beside them."""
    codebooks, assignments = integers.extend(quant.codebooks, quant.assignments(pool))
    return encode_model(source.model, codebooks, assignments, metadata, packs=getattr(quant, "packs", ()),
                        **getattr(quant, "build_options", {}))


def _lossless_bytes(source: SourceModel, integers: IntegerCoding, metadata: dict[str, str]) -> bytes:
    """The lossless file's bytes: integer tensors coded, every float as it is (raw, xz where smaller)."""
    codebooks, assignments = integers.extend([], {})
    build = {**lossless.BUILD_OPTIONS, "chunk_elements": FC.DEFAULT_CHUNK_ELEMENTS}  # few chunk entries: nothing decodes in lock step here
    return encode_model(source.model, codebooks, assignments, metadata, **build)


def _lossless(source: SourceModel, pool: Pool, options: ConvertOptions, started: float, integers: IntegerCoding,
              baseline: Baseline | None = None, why: str = "no float weights to search",
              counter: _Counter | None = None, candidates: list[Candidate] = (),
              front: list[Candidate] = ()) -> ConvertResult:
    """The lossless file (``lossless.py``): every integer tensor coded losslessly, every other
    tensor stored as it is (raw, xz where smaller). Written where no searched file holds the
    tolerance or none is smaller, and for a model whose only weights are integers. With data the
    file is scored like any other (its outputs are the original's, bit for bit); the search's
    candidates stay in the report. ``why`` goes to the report and the closing table."""
    metric = baseline.metric if baseline else None
    q0 = baseline.quality if baseline else None
    quant = Quantization((), np.zeros(0, dtype=np.uint32))
    measured = measure(_lossless_bytes(source, integers, _metadata(source, options, metric, q0, None, [])), baseline)
    moub_bytes = _lossless_bytes(source, integers, _metadata(source, options, metric, q0, measured.quality, []))
    final = measure(moub_bytes, None)
    bits = 8 * final.file_bytes / max(pool.n_weights + integers.all_elements, 1)
    chosen = Candidate("lossless", "lossless", measured.quality if baseline else 0.0, measured.loss if baseline else 0.0,
                       baseline is not None, bits, 0, {"lossless": True})
    stages = [Stage("every tensor exact", 0, measured.quality, "exact", Size(0, 0, 0, pool.n_weights))]
    report = _report(source, pool, options, metric, q0, measured, baseline.dataset if baseline else None, stages, final,
                     len(moub_bytes), list(candidates), list(front), chosen, {"method": "lossless"},
                     counter or _Counter(None), quant, baseline.reference if baseline else None, integers)
    if baseline is None:
        report["choice"] = None
    else:
        report["choice"]["bits_per_weight_file"] = round(bits, 6)
    report["lossless"] = {"reason": why}
    return ConvertResult(moub_bytes, report, report["front"], q0, measured.quality,
                         counter.evaluations if counter else 0, time.perf_counter() - started, metric)


def _fixed(source: SourceModel, pool: Pool, options: ConvertOptions, started: float, integers: IntegerCoding,
           baseline: Baseline | None = None) -> ConvertResult:
    """``bins=K``: equal-width binning with K bins, no search; quality measured only with data."""
    metric = baseline.metric if baseline else None
    q0 = baseline.quality if baseline else None
    quant, stages = fixed_bins(pool, options.bins, options.representative)
    trial = _encode(source, quant, pool, integers, _metadata(source, options, metric, q0, None, []))
    measured = measure(trial, baseline)
    del trial  # not beside the final file
    for stage in stages:
        stage.quality = measured.quality
    moub_bytes = _encode(source, quant, pool, integers, _metadata(source, options, metric, q0, measured.quality, []))
    final = measure(moub_bytes, None)
    known = measured.quality is not None
    chosen = Candidate(f"k={options.bins}", "fixed", measured.quality if known else 0.0, measured.loss if known else 0.0,
                       known, stages[-1].size.bits_per_weight, quant.bins_used(), {"k": options.bins, "merges": []})
    report = _report(source, pool, options, metric, q0, measured, baseline.dataset if baseline else None, stages, final,
                     len(moub_bytes), [], [], chosen, {"method": "fixed bins"}, _Counter(None), quant,
                     baseline.reference if baseline else None, integers)
    return ConvertResult(moub_bytes, report, [], q0, measured.quality, 0, time.perf_counter() - started, metric)


def _report(source: SourceModel, pool: Pool, options: ConvertOptions, metric, q0, measured: Measured, dataset: Dataset | None,
            stages: list[Stage], final: Measured, file_bytes: int, candidates: list[Candidate],
            front: list[Candidate], chosen: Candidate, facts: dict, counter: _Counter, quant: Quantization,
            reference: list[np.ndarray] | None = None, integers: IntegerCoding | None = None) -> dict:
    q1 = measured.quality
    rows = stage_rows(stages, final.weight_bytes, file_bytes, source.original_bytes, pool.n_weights) if pool.n_weights else []
    bits_file = rows[-1]["bits_per_weight"] if rows else None
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
        "loss": None if _point(measured) is None else round(_point(measured), 6),
        "loss_judged": None if measured.loss is None else round(measured.loss, 6),  # with the guards (guards.py)
        "loss_measure": None if metric is None else metrics.METRICS[metric].loss_measure,
        # a count of broken samples needs one row per sample (not a time step or a frame of a feed)
        "resolution": None if reference is None or dataset is None or not reference[0].ndim
        or reference[0].shape[0] != dataset.n_samples else resolution(metric, reference, _point(measured), options.max_drop),
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
                 "weight_bytes": final.weight_bytes, "other_bytes": file_bytes - final.weight_bytes,
                 "resident_weight_bytes": final.resident},
        "coding": final.coding,
        "integers": None if integers is None else integers.summary(),
    }


__all__ = ["convert", "ConvertResult", "ConvertError", "check_writable"]
