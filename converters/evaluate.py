"""Run candidate weights through onnxruntime on the sample data, fast and deterministically.

Three ways to get a candidate's weights into onnxruntime (``strategy``):

``inputs``        the pooled main-graph weights become graph inputs of one stripped
                  model and one session serves every candidate: weights are fed with
                  the data on each run. No session is built per candidate, but
                  onnxruntime cannot constant-fold or pre-pack those weights.
``initializers``  the pooled main-graph weights are external-data stubs in one
                  stripped graph serialized once; each candidate builds a session
                  with ``SessionOptions.add_external_initializers`` over OrtValues
                  that borrow the candidate's numpy arrays (no protobuf copy).
``serialize``     the whole model with the candidate's weights is serialized and a
                  session is built from it (the naive way; the reference).

``auto`` is ``initializers``, the fastest of the three where they differ: weights fed as
inputs lose onnxruntime's BatchNorm folding and weight pre-packing, and serializing the
model per candidate costs a protobuf copy (docs/decisions/0004). Weights inside subgraphs and
functions, which neither ``initializers`` nor ``inputs`` can hand over, are put back into the
graph and serialized per candidate; so are bfloat16 weights (numpy has no bfloat16).

Sessions run with one intra-op and one inter-op thread, sequentially: the same
weights and data always give the same outputs, whichever process runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from moub_format.dtypes import BFLOAT16
from moub_runtime.payload import clear_payload, fill_payload, mark_in_memory
from moub_runtime.sites import tensor_sites

from .data import Dataset, model_inputs
from .errors import ModelError, OptionError, OutputError
from .intake import Pool, PoolSite, is_main_graph
from .metrics import METRICS, Accumulator, Heads, HeadsAccumulator, output_energy, rarer_decisions, whole_channel_energy
from .stored import RowWriter, StoredArray, TemporaryFolder, storable

STRATEGIES = ("auto", "inputs", "initializers", "serialize")
WEIGHT_SUFFIX = "__moub_weight"
UNNAMED = -1  # an output's sample axis before it is found by running the model


def session_options(optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.graph_optimization_level = optimization
    return options


def _feedable(site: PoolSite) -> bool:
    return is_main_graph(site) and site.dtype != BFLOAT16


@dataclass
class _Prepared:
    graph: onnx.ModelProto
    fed: list[PoolSite]            # handed over per candidate (as inputs or OrtValues)
    inline: dict[str, onnx.TensorProto]  # path -> tensor in ``graph`` filled per candidate
    names: dict[str, str]          # path -> value name in ``graph`` for fed sites


def _prepare(model: onnx.ModelProto, pool: Pool, strategy: str) -> _Prepared:
    """A copy of ``model`` with pooled weights stripped the way ``strategy`` hands them over.

    Pooled main-graph Constant nodes become Identity nodes reading a new initializer
    (or graph input), so node numbers, and with them every site path, stay unchanged.
    """
    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    sites = tensor_sites(graph)
    fed: list[PoolSite] = []
    inline: dict[str, onnx.TensorProto] = {}
    names: dict[str, str] = {}
    if strategy == "serialize":
        for site in pool.sites:
            inline[site.path] = sites[site.path].tensor
            clear_payload(inline[site.path])
        return _compact(_Prepared(graph, fed, inline, names))
    new_inits: list[onnx.TensorProto] = []
    taken = {t.name for t in graph.graph.initializer} | {i.name for i in graph.graph.input}
    for site in pool.sites:
        tensor = sites[site.path].tensor
        if not _feedable(site):
            inline[site.path] = tensor
            clear_payload(tensor)
            continue
        if site.path.startswith("init:"):
            name = tensor.name
            stub = tensor
        else:  # main-graph Constant node -> Identity(new initializer)
            node_index = int(site.path.split("/")[0].split(":")[1])
            node = graph.graph.node[node_index]
            name = node.output[0] + WEIGHT_SUFFIX
            while name in taken:
                name += "_"
            taken.add(name)
            stub = onnx.TensorProto()
            stub.CopyFrom(tensor)
            stub.name = name
            identity = helper.make_node("Identity", [name], list(node.output), name=node.name)
            node.CopyFrom(identity)
            new_inits.append(stub)
        fed.append(site)
        names[site.path] = name
        if strategy == "initializers":
            mark_in_memory(stub)
    graph.graph.initializer.extend(new_inits)
    if strategy == "inputs":
        fed_names = {names[s.path] for s in fed}
        keep = [t for t in graph.graph.initializer if t.name not in fed_names]
        declared = {i.name for i in graph.graph.input}
        by_name = {names[s.path]: s for s in fed}
        del graph.graph.initializer[:]
        graph.graph.initializer.extend(keep)
        for name in sorted(fed_names - declared, key=lambda n: by_name[n].start):
            site = by_name[name]
            graph.graph.input.append(helper.make_tensor_value_info(name, site.dtype, list(site.dims)))
    elif strategy == "initializers" and graph.ir_version < 4:
        declared = {i.name for i in graph.graph.input}
        for site in fed:
            if names[site.path] not in declared:
                graph.graph.input.append(helper.make_tensor_value_info(names[site.path], site.dtype, list(site.dims)))
    return _compact(_Prepared(graph, fed, inline, names))


def _compact(prepared: _Prepared) -> _Prepared:
    """The stripped copy parsed afresh: protobuf keeps a cleared payload's bytes in the
    copy's arena until the copy dies, so the stripped graph would hold a whole model's size
    for the life of the Evaluator."""
    graph = onnx.ModelProto()
    graph.ParseFromString(prepared.graph.SerializeToString())
    sites = tensor_sites(graph)
    inline = {path: sites[path].tensor for path in prepared.inline}
    return _Prepared(graph, prepared.fed, inline, prepared.names)


class OutputLayout:
    """Where each output holds its samples, so that every output reaches the metrics with its rows
    on axis 0: an output whose batch dimension is not the first (a recurrent state [layers, N,
    hidden]) has it moved there; with one feed per sample, each output is cut into rows of its last
    axis (sequences of different lengths then join along the rows)."""

    def __init__(self, moves: Sequence[int | None]) -> None:
        self.moves = list(moves)  # per output: the axis to move to 0, or None to cut into rows

    @classmethod
    def of(cls, model: onnx.ModelProto, dataset: Dataset, names: Sequence[str] | None = None) -> OutputLayout:
        by_name = {o.name: o for o in model.graph.output}
        outputs = [by_name[n] for n in names] if names else list(model.graph.output)
        if dataset.feeds is not None:
            return cls([None] * len(outputs))
        specs = {s.name: s for s in model_inputs(model)}
        sample_params = {specs[name].params[axis] for name in dataset.inputs
                         if name in specs and (axis := dataset.axis(name)) is not None and axis < len(specs[name].params)}
        sample_params.discard(None)
        moves = []
        for output in outputs:
            params = [d.dim_param or None for d in output.type.tensor_type.shape.dim]
            moves.append(next((axis for axis, p in enumerate(params) if p in sample_params), UNNAMED))
        return cls(moves)

    @property
    def unresolved(self) -> list[int]:
        """Outputs whose declared shape names no sample axis."""
        return [i for i, move in enumerate(self.moves) if move == UNNAMED]

    def resolved(self, one: Sequence[np.ndarray] | None = None, three: Sequence[np.ndarray] | None = None) -> OutputLayout:
        """The sample axis of each unresolved output from its shapes on one and on three samples:
        the first axis that grows threefold (a recurrent state [layers, N, hidden] whose layers
        equal the batch size cannot be told apart by one shape), else axis 0."""
        moves = list(self.moves)
        for i in self.unresolved:
            if one is None or three is None:
                moves[i] = 0
                continue
            a, b = np.shape(one[i]), np.shape(three[i])
            grows = [axis for axis in range(min(len(a), len(b))) if b[axis] == 3 * a[axis] and a[axis] > 0]
            moves[i] = grows[0] if len(a) == len(b) and grows else 0
        return OutputLayout(moves)

    def __call__(self, outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        normal = []
        for array, move in zip(outputs, self.moves):
            move = 0 if move == UNNAMED else move
            if move is None:
                array = array.reshape(-1, array.shape[-1]) if array.ndim >= 2 else array.reshape(-1, 1)
            elif move and array.ndim > move:
                array = np.moveaxis(array, move, 0)
            normal.append(array)
        return normal


def reference_rows(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], rows: list[int]) -> list[np.ndarray]:
    """The rows of ``reference`` that a batch's ``outputs`` answer, per output (each output keeps its
    own count of rows: one sample can give several, a sequence one per time step); advances
    ``rows``."""
    picked = []
    for i, (r, o) in enumerate(zip(reference, outputs)):
        if not r.ndim:
            picked.append(r)
            continue
        n = o.shape[0] if o.ndim else 1
        picked.append(r[rows[i] : rows[i] + n])
        rows[i] += n
    return picked


class Evaluator:
    """Outputs of the model on the sample data with any candidate weights for the pool."""

    def __init__(self, model: onnx.ModelProto, pool: Pool, dataset: Dataset, strategy: str = "auto",
                 optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 outputs: Sequence[str] = (), per_sample: bool = True) -> None:
        """``outputs``: the outputs to run and score (default: all of them). ``per_sample``: the
        outputs hold rows per sample, on an axis to be found; False for outputs that sum over the
        batch (the calibration's probes), taken as they come, with no runs to look for that axis."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
        if strategy == "auto":
            strategy = "initializers"
        self.strategy = strategy
        self.pool = pool
        self.dataset = dataset
        self.optimization = optimization
        self._prepared = _prepare(model, pool, strategy)
        self._graph_bytes = None if self._prepared.inline else self._prepared.graph.SerializeToString()
        self._session: ort.InferenceSession | None = None
        names = [o.name for o in model.graph.output]
        unknown = [n for n in outputs if n not in names]
        if unknown:
            raise OptionError(f"--score-output {unknown[0]!r} is not an output of the model (outputs: {', '.join(names)})")
        self.output_names = list(outputs) or names
        self.layout = OutputLayout.of(model, dataset, self.output_names) if per_sample else \
            OutputLayout([0] * len(self.output_names))
        self.runs = 0
        if self.layout.unresolved:
            self.layout = self._found_layout(model)

    def _found_layout(self, model: onnx.ModelProto) -> OutputLayout:
        """The layout with each unnamed sample axis found by running the original on one and on
        three samples; axis 0 where the model cannot take those batches (a fixed batch size)."""
        layout, self.layout = self.layout, OutputLayout([0] * len(self.output_names))
        try:
            if self.dataset.n_samples < 3:
                return layout.resolved()
            arrays = original_arrays(model, self.pool)
            runs = [next(self.iter_outputs(arrays, replace(self.dataset.take(np.arange(k)), batch_size=k)))[1]
                    for k in (1, 3)]
            return layout.resolved(*runs)
        except Exception:  # onnxruntime's own error types: the model cannot run such a batch
            return layout.resolved()
        finally:
            self.runs = 0

    # -- onnxruntime plumbing
    def _new_session(self, graph_bytes: bytes, options: ort.SessionOptions) -> ort.InferenceSession:
        return ort.InferenceSession(graph_bytes, sess_options=options, providers=["CPUExecutionProvider"])

    def _graph_for(self, arrays: Mapping[str, np.ndarray]) -> bytes:
        if self._graph_bytes is not None:
            return self._graph_bytes
        for path, tensor in self._prepared.inline.items():
            fill_payload(tensor, arrays[path])
        try:
            return self._prepared.graph.SerializeToString()
        finally:
            for tensor in self._prepared.inline.values():
                clear_payload(tensor)

    def _batches(self, session: ort.InferenceSession, extra_feeds: Mapping[str, np.ndarray], dataset: Dataset | None = None):
        for start, feeds in (dataset or self.dataset).batches():
            yield start, self.layout(session.run(self.output_names, {**feeds, **extra_feeds}))

    def iter_outputs(self, arrays: Mapping[str, np.ndarray], dataset: Dataset | None = None):
        """(first sample, outputs) batch after batch with ``arrays`` (site path -> storage array)
        as the pooled weights, on ``dataset`` (default: all the data); stop iterating to
        abandon the candidate."""
        self.runs += 1
        prepared = self._prepared
        if self.strategy == "inputs":
            if self._session is None or prepared.inline:
                self._session = self._new_session(self._graph_for(arrays), session_options(self.optimization))
            feeds = {prepared.names[s.path]: np.ascontiguousarray(arrays[s.path]) for s in prepared.fed}
            yield from self._batches(self._session, feeds, dataset)
            return
        options = session_options(self.optimization)
        keep_alive: list = []  # the OrtValues borrow these arrays' memory
        if prepared.fed:
            values = []
            for site in prepared.fed:
                array = np.ascontiguousarray(arrays[site.path])
                keep_alive.append(array)
                values.append(ort.OrtValue.ortvalue_from_numpy(array))
            keep_alive.extend(values)
            options.add_external_initializers([prepared.names[s.path] for s in prepared.fed], values)
        session = self._new_session(self._graph_for(arrays), options)
        yield from self._batches(session, {}, dataset)

    def outputs(self, arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """All outputs over all samples, concatenated along the sample axis."""
        parts = [outputs for _, outputs in self.iter_outputs(arrays)]
        return [np.concatenate([p[i] for p in parts], axis=0) if parts[0][i].ndim else np.stack([p[i] for p in parts])
                for i in range(len(self.output_names))]


def subset_reference(evaluator: Evaluator, reference: Sequence[np.ndarray], n_samples: int, picked: np.ndarray,
                     subset: Dataset, originals: Callable[[], Mapping[str, np.ndarray]]) -> list[np.ndarray]:
    """The original model's outputs on the samples ``picked`` (given as the Dataset ``subset``):
    rows of ``reference`` when every output has one row per sample, else run again, because
    rows are then not samples (a Resize that also scales the batch axis)."""
    if all(r.ndim == 0 or r.shape[0] == n_samples for r in reference):
        rows = _as_slice(picked)  # a half's samples are every other one: a view, not a copy of the outputs
        return [r.select(picked) if isinstance(r, StoredArray) else r[rows] if r.ndim else r for r in reference]
    return _written(evaluator.iter_outputs(originals(), subset), TemporaryFolder("moub-reference-"), stack_scalars=False)


def _as_slice(picked: np.ndarray) -> slice | np.ndarray:
    """``picked`` (ascending sample numbers) as a slice where they are evenly spaced, so that
    indexing gives a view; else ``picked`` itself."""
    if picked.size >= 2:
        step = int(picked[1] - picked[0])
        if step > 0 and np.array_equal(picked, np.arange(picked[0], picked[-1] + 1, step)):
            return slice(int(picked[0]), int(picked[-1]) + 1, step)
    elif picked.size == 1:
        return slice(int(picked[0]), int(picked[0]) + 1)
    return picked


def original_arrays(model: onnx.ModelProto, pool: Pool) -> dict[str, np.ndarray]:
    """The pooled sites' original values in storage dtype and shape.

    float32 sites are read-only views of the pool, which holds their exact values: a copy
    per caller (the reference run, the calibration, the sensitivity runs) would cost one
    model size each."""
    from moub_format.dtypes import FLOAT, STORAGE_DTYPES
    from onnx import numpy_helper

    sites = tensor_sites(model)
    arrays = {}
    for site in pool.sites:
        if site.dtype == FLOAT:
            view = pool.values[site.start : site.stop].reshape(site.dims)
            view.flags.writeable = False
            arrays[site.path] = view
            continue
        tensor = sites[site.path].tensor
        array = numpy_helper.to_array(tensor)
        if site.dtype == BFLOAT16:
            array = array.view(np.uint16)
        arrays[site.path] = np.ascontiguousarray(array, dtype=STORAGE_DTYPES[site.dtype]).reshape(site.dims)
    return arrays


def reference_outputs(evaluator: Evaluator, model: onnx.ModelProto, label: str) -> list[np.ndarray | StoredArray]:
    """The original model's outputs through the evaluator (so the baseline is measured the
    same way as every candidate), each written to a temporary file batch by batch and read back
    a batch at a time when scoring: they grow with the samples (a map or a sequence per sample),
    and every process scoring candidates needs them, so in memory they would make the
    converter's memory follow the data. Scalar outputs and outputs of Python objects stay in
    memory. Any onnxruntime failure here is the model's fault."""
    folder = TemporaryFolder("moub-reference-")
    try:
        return _written(evaluator.iter_outputs(original_arrays(model, evaluator.pool)), folder)
    except OutputError as exc:  # the temporary folder's disk, not the model
        raise OutputError(f"{label}: {exc}") from None
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeException types
        raise ModelError(f"{label}: onnxruntime cannot run the model on the data ({' '.join(str(exc).split())[:300]})") from None


def _written(batches, folder: TemporaryFolder, stack_scalars: bool = True) -> list[np.ndarray | StoredArray]:
    """Each output over all ``batches`` (first sample, outputs) as :meth:`Evaluator.outputs`
    gives it, rows written to a file of ``folder`` where they can be; a scalar output stacked
    per batch, or with ``stack_scalars`` False the first batch's value."""
    writers: list[RowWriter | None] = []
    kept: list[list[np.ndarray]] = []
    for _, outputs in batches:
        if not writers:
            writers = [RowWriter(folder) if storable(o) else None for o in outputs]
            kept = [[] for _ in outputs]
        for writer, held, output in zip(writers, kept, outputs):
            if writer is not None:
                writer.append(output)
            else:
                held.append(output)
    return [writer.stored() if writer is not None else np.concatenate(held, axis=0) if held[0].ndim
            else np.stack(held) if stack_scalars else held[0] for writer, held in zip(writers, kept)]


@dataclass(frozen=True)
class Score:
    """A candidate's quality and loss (the tolerance measure, see metrics.py).

    ``complete`` False: the evaluation stopped early (``stopped`` says why: "tolerance",
    the loss provably exceeds the limit it was asked to respect, or "dominated", it
    provably reaches the loss of a known smaller candidate); ``loss`` is then a lower
    bound and ``quality`` covers only the units seen (None if none)."""

    quality: float | None
    loss: float
    complete: bool
    units: int
    stopped: str | None = None
    point_loss: float | None = None  # the loss as measured, before the guards (guards.py); None: same as loss


class Scorer:
    """Quality of candidate weights: the evaluator's outputs scored by the metric."""

    def __init__(self, evaluator: Evaluator | None, metric: str, reference: list[np.ndarray], labels: np.ndarray | None,
                 quality_original: float, n_samples: int | None = None, dataset: Dataset | None = None,
                 heads: Heads = (), max_drop: float | None = None, resolving_samples: int | None = None) -> None:
        """``dataset``: score on these samples instead of the evaluator's (``reference`` and
        ``labels`` must then be the ones of these samples). ``max_drop``: the tolerance a choice is
        made against, which turns on the guards (``guards.py``); None: plain measurements.
        ``resolving_samples``: the samples of all the data, when these are a part of it (a half):
        whether the data resolve the tolerance is a property of all of it, so every part of one
        conversion is guarded alike."""
        self.evaluator = evaluator
        self.dataset = dataset
        if dataset is not None and n_samples is None:
            n_samples = dataset.n_samples
        self.metric = metric
        self.reference = reference
        self.labels = labels
        self.quality_original = quality_original
        self.heads = heads
        self.max_drop = max_drop
        self.n_samples = n_samples if n_samples is not None else (evaluator.dataset.n_samples if evaluator else 0)
        self.total_units, self.n_classes, self.total_energy = self._totals(metric, reference)
        self.guard_scale = (resolving_samples or self.n_samples) / max(self.n_samples, 1)

    @property
    def guard_units(self) -> int:
        """The units of all the data, by which the guards decide whether counts resolve the tolerance."""
        return round(self.total_units * self.guard_scale)

    def _totals(self, metric: str, reference: Sequence[np.ndarray]) -> tuple[int, int, float]:
        """(units, classes of the first output, energy) of the whole reference, for a metric's bounds."""
        first = reference[0]
        info = METRICS[metric]
        units = (int(np.prod(first.shape[:-1])) if info.top1 else rarer_decisions(first) if info.rarer_units
                 else int(first.size) if info.elementwise else self.n_samples)
        classes = int(first.shape[-1]) if first.ndim else 0
        if info.channel_energy:
            return units, classes, whole_channel_energy(first)
        return units, classes, output_energy(reference, reference)[1] if METRICS[metric].energy else 0.0

    def _guarded(self, metric: str, units: int, classes: int, energy: float) -> Accumulator:
        from .guards import bounds_energy, estimates_flips

        return Accumulator(metric, units, classes, energy,
                           estimates_flips(metric, round(units * self.guard_scale), self.max_drop),
                           bounds_energy(metric, self.max_drop))

    def _accumulator(self) -> Accumulator | HeadsAccumulator:
        if not METRICS[self.metric].composite:
            return self._guarded(self.metric, self.total_units, self.n_classes, self.total_energy)
        return HeadsAccumulator([(i, self._guarded(m, *self._totals(m, [self.reference[i]]))) for i, m in self.heads])

    def accumulate(self, batches, max_loss: float | None = None, dominated_at: float | None = None) -> Score:
        """Score (first sample, outputs) batches. Stop once the loss provably exceeds
        ``max_loss``, or provably reaches ``dominated_at`` (checked before each batch, so
        a candidate that cannot beat a known smaller one may not run at all)."""
        acc = self._accumulator()

        def stopped(reason: str) -> Score:
            return Score(acc.value() if acc.units else None, acc.loss_lower_bound(), False, acc.units, reason)

        iterator = iter(batches)
        rows = [0] * len(self.reference)  # output rows so far: a sample may give several (a time step each)
        while True:
            if dominated_at is not None and acc.loss_lower_bound() >= dominated_at:
                return stopped("dominated")
            try:
                _, outputs = next(iterator)
            except StopIteration:
                break
            row = rows[0]
            reference = reference_rows(self.reference, outputs, rows)
            labels = None if self.labels is None else self.labels[row : rows[0] if self.reference[0].ndim else row + 1]
            acc.add(outputs, reference, labels)
            if max_loss is not None and acc.loss_lower_bound() > max_loss:
                return stopped("tolerance")
        return Score(acc.value(), acc.loss(self.quality_original), True, acc.units,
                     point_loss=acc.point_loss(self.quality_original))

    def score(self, arrays: Mapping[str, np.ndarray], max_loss: float | None = None, dominated_at: float | None = None) -> Score:
        """Evaluate candidate weights (site path -> storage array); see :meth:`accumulate`."""
        batches = self.evaluator.iter_outputs(arrays, self.dataset)
        try:
            return self.accumulate(batches, max_loss, dominated_at)
        finally:
            batches.close()
