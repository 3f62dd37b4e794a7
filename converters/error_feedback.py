"""Error feedback: round a layer's weights so that its outputs, not its weights, stay close.

Rounding every weight to its nearest level ignores that a layer's inputs are correlated: the
error of one weight can be cancelled by nudging the levels of the weights that see correlated
inputs. GPTQ (Frantar et al., 2023) does this column by column with the inverse of the input
second-moment matrix ``H = E[x x^T]``, on the same uniform grid, so the file format and the
step sizes stay as they are and the output error at a given step is lower (docs/decisions/0011).
The adaptive mode rounds every candidate it scores this way (``step_layout.py``), so the search
and the file see the same model.

It serves layers whose output mixes input channels linearly with a 2-D view of the weight:
``Conv`` with 1x1 kernels and one group, ``MatMul`` with a 2-D weight, ``Gemm`` (transA 0), in
the main graph. ``H`` is computed inside onnxruntime (a Gram matrix per layer input), so no
activation leaves the session. Wider kernels and grouped Convs keep nearest rounding: serving
them made some files smaller but moved other conversions to choices that failed held-back data
(docs/decisions/0016).

An input channel that is exactly zero on every sample of the data (a ReLU that never fires)
leaves its weights free: whatever they hold, the layer's output on that data is the same bits.
GPTQ sets them to zero, and so does :meth:`ErrorFeedback.levels`: level 0 is the most frequent
level of a weight tensor and takes the shortest code (docs/decisions/0025). Coarser steps for
the input channels that carry little signal do not pay: a channel's energy does not say what
its weights are worth downstream (docs/decisions/0027).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moub_format import constants as C

from .data import Dataset
from .intake import Pool, is_main_graph
from .probes import fresh_prefix, probe_copy

DAMPING = 0.01        # of H's mean diagonal, added to the diagonal: GPTQ's default
BLOCK = 128           # columns per lazy batch update
# Multiply-adds (a layer's inputs x its weights, summed over layers) that error feedback may
# add to every candidate the search scores. The work grows with a layer's inputs times its
# weights and the factor with its inputs squared: one 8192 x 8192 MatMul takes tens of seconds
# and half a gigabyte per candidate, so a search over a model of such layers would spend hours
# rounding. The bench's models need at most 6.0e8; layers beyond the budget, the costliest
# first, keep nearest rounding (docs/decisions/0029).
MAX_WORK = 10**10
PROBE_PREFIX = "moub_gram"


@dataclass(frozen=True)
class Layer:
    """Pool site ``weight`` read by a layer whose input is ``source``; ``columns_last``: the
    weight is stored (inputs, outputs), as MatMul's and Gemm's untransposed B."""

    weight: int
    source: str
    columns_last: bool


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def find_layers(model: onnx.ModelProto, pool: Pool) -> list[Layer]:
    """Layers of the main graph that error feedback serves, one per weight (a weight read by
    several layers is left to nearest rounding: its inputs differ)."""
    index = {s.name: i for i, s in enumerate(pool.sites) if is_main_graph(s) and s.name}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    layers = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] not in index:
            continue
        w = index[node.input[1]]
        dims = pool.sites[w].dims
        if readers[node.input[1]] != 1 or node.input[0] in index:
            continue
        if node.op_type == "Conv" and len(dims) >= 3 and all(d == 1 for d in dims[2:]) and int(_attr(node, "group", 1)) == 1:
            layers.append(Layer(w, node.input[0], False))
        elif node.op_type == "MatMul" and len(dims) == 2:
            layers.append(Layer(w, node.input[0], True))
        elif node.op_type == "Gemm" and len(dims) == 2 and int(_attr(node, "transA", 0)) == 0:
            layers.append(Layer(w, node.input[0], not int(_attr(node, "transB", 0))))
    return layers


def _inputs_of(layer: Layer, dims: tuple[int, ...]) -> int:
    return dims[0] if layer.columns_last else dims[1]


def _probe_model(model: onnx.ModelProto, pool: Pool, layers: list[Layer]) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """The model plus, per distinct layer input, its Gram matrix X^T X over all positions
    (channels last, rows = every other axis) and the shape of X."""
    probe, taken = probe_copy(model)
    outputs: dict[str, tuple[str, str]] = {}
    for layer in layers:
        if layer.source in outputs:
            continue
        dims = pool.sites[layer.weight].dims
        k = len(outputs)
        base = fresh_prefix(f"{PROBE_PREFIX}_{k}", taken)
        channels = _inputs_of(layer, dims)
        source = layer.source
        if not layer.columns_last or len(dims) > 2:  # Conv: channels are axis 1
            rank = len(dims)
            source = f"{base}_last"
            probe.graph.node.append(helper.make_node("Transpose", [layer.source], [source], name=source,
                                                     perm=[0] + list(range(2, rank)) + [1]))
        shape = f"{base}_shape"
        probe.graph.initializer.append(numpy_helper.from_array(np.array([-1, channels], np.int64), shape))
        rows, rows_t, gram, size = f"{base}_rows", f"{base}_rows_t", f"{base}_gram", f"{base}_size"
        probe.graph.node.extend([
            helper.make_node("Reshape", [source, shape], [rows], name=rows),
            helper.make_node("Transpose", [rows], [rows_t], name=rows_t, perm=[1, 0]),
            helper.make_node("MatMul", [rows_t, rows], [gram], name=gram),
            helper.make_node("Shape", [rows], [size], name=size),
        ])
        probe.graph.output.extend([onnx.ValueInfoProto(name=gram), onnx.ValueInfoProto(name=size)])
        taken.update({source, shape, rows, rows_t, gram, size})
        outputs[layer.source] = (gram, size)
    return probe, outputs


def second_moments(model: onnx.ModelProto, pool: Pool, layers: list[Layer], dataset: Dataset) -> dict[str, np.ndarray]:
    """H = E[x x^T] of every layer input over ``dataset`` (float64), through the converter's
    Evaluator with the original weights and one onnxruntime thread (same bits in every process)."""
    if not layers:
        return {}
    from .evaluate import Evaluator, original_arrays

    probe, outputs = _probe_model(model, pool, layers)
    evaluator = Evaluator(probe, pool, dataset, per_sample=False)
    position = {name: evaluator.output_names.index(name) for pair in outputs.values() for name in pair}
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for _, result in evaluator.iter_outputs(original_arrays(model, pool), dataset):
        for source, (gram, size) in outputs.items():
            value = np.asarray(result[position[gram]], np.float64)
            sums[source] = value if source not in sums else sums[source] + value
            rows[source] = rows.get(source, 0) + int(np.asarray(result[position[size]])[0])
    return {source: sums[source] / max(rows[source], 1) for source in outputs}


def _inverse_factor(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of the damped inverse of H (GPTQ's Hinv)."""
    h = h.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += DAMPING * float(np.mean(np.diag(h)))
    return np.linalg.cholesky(np.linalg.inv(h)).T


def feedback_levels(weights: np.ndarray, step: float, factor: np.ndarray, limit: int = 2**31 - 1) -> np.ndarray | None:
    """Integer levels (int32) of ``weights`` (outputs x inputs, float32 or float64) on the grid
    ``step``, rounded column by column with the error fed forward through ``factor`` (GPTQ,
    lazy batches); None as soon as a level reaches ``limit`` in magnitude.

    Works on the transpose, a column per row, so that each column's update touches
    contiguous memory; every product, difference and matrix product is the one the
    column-major form computes, so the levels are the same bits. One float64 copy of the
    layer and int32 levels: 20 bytes per weight at the peak."""
    w = np.ascontiguousarray(weights.T, dtype=np.float64)
    n = w.shape[0]
    q = np.empty(w.shape, np.int32)
    for a in range(0, n, BLOCK):
        b = min(n, a + BLOCK)
        block = w[a:b].copy()
        errors = np.empty_like(block)
        f = factor[a:b, a:b]
        for i in range(b - a):
            levels = np.rint(block[i] / step)
            if levels.size and float(np.abs(levels).max()) >= limit:
                return None
            q[a + i] = levels
            error = (block[i] - levels * step) / f[i, i]
            block[i + 1 :] -= f[i, i + 1 :, None] * error
            errors[i] = error
        if b < n:
            w[b:] -= (np.ascontiguousarray(errors.T) @ factor[a:b, b:]).T
    return np.ascontiguousarray(q.T)


@dataclass
class ErrorFeedback:
    """The layers of a model and their inputs' second moments; re-rounds their levels."""

    layers: list[Layer]
    factors: dict[str, np.ndarray]
    dead: dict[str, np.ndarray]  # per layer input: the channels that were zero on every sample
    zeroed_weights: int = 0      # weights that read such a channel: set to level 0
    over_budget: int = 0         # layers left to nearest rounding by MAX_WORK

    @classmethod
    def measure(cls, model: onnx.ModelProto, pool: Pool, dataset: Dataset) -> ErrorFeedback:
        found = find_layers(model, pool)
        layers = within_budget(found, pool)
        moments = second_moments(model, pool, layers, dataset)
        usable, factors, dead, zeroed = [], {}, {}, 0
        for layer in layers:
            h = moments.get(layer.source)
            n = _inputs_of(layer, pool.sites[layer.weight].dims)
            if h is None or h.shape != (n, n) or not np.isfinite(h).all():
                continue
            if layer.source not in factors:
                try:
                    factors[layer.source] = _inverse_factor(h)
                except np.linalg.LinAlgError:
                    continue
                dead[layer.source] = np.diag(h) <= 0
            usable.append(layer)
            zeroed += int(dead[layer.source].sum()) * (pool.sites[layer.weight].size // n)
        return cls(usable, factors, dead, zeroed, len(found) - len(layers))

    def levels(self, pool: Pool, steps: np.ndarray, levels: list[np.ndarray]) -> list[np.ndarray]:
        """``levels`` with every served layer's weight re-rounded by error feedback at its step,
        the weights that read a dead input channel at level 0 (a layer whose levels would leave
        the grid codebook's range keeps nearest rounding)."""
        out = list(levels)
        for layer in self.layers:
            site = pool.sites[layer.weight]
            values = pool.values[site.start : site.stop]
            dims = site.dims
            matrix = values.reshape(dims[0], -1).T if layer.columns_last else values.reshape(dims[0], -1)
            q = feedback_levels(matrix, float(steps[layer.weight]), self.factors[layer.source], C.GRID_LIMIT // 4)
            if q is None:
                continue
            q[:, self.dead[layer.source]] = 0
            out[layer.weight] = np.ascontiguousarray(q.T if layer.columns_last else q).reshape(-1)
        return out

    def summary(self) -> dict:
        out = {"layers": len(self.layers), "zeroed_weights": self.zeroed_weights}
        if self.over_budget:
            out["over_budget"] = self.over_budget
        return out


def work(layer: Layer, pool: Pool) -> int:
    """Multiply-adds of one GPTQ pass over ``layer``: each weight is updated once per input column."""
    site = pool.sites[layer.weight]
    return _inputs_of(layer, site.dims) * site.size


def within_budget(layers: list[Layer], pool: Pool, budget: int | None = None) -> list[Layer]:
    """The cheapest layers whose summed work stays within ``budget`` (default MAX_WORK), in their
    own order: the search rounds every candidate this way, so its cost is bounded whatever the
    model's size."""
    budget = MAX_WORK if budget is None else budget
    kept: set[int] = set()
    total = 0
    for number in sorted(range(len(layers)), key=lambda i: (work(layers[i], pool), i)):
        cost = work(layers[number], pool)
        if total + cost > budget:
            break
        kept.add(number)
        total += cost
    return [layer for i, layer in enumerate(layers) if i in kept]


__all__ = ["MAX_WORK", "ErrorFeedback", "Layer", "feedback_levels", "find_layers", "second_moments", "within_budget", "work"]
