"""Error feedback: round a layer's weights so that its outputs, not its weights, stay close.

Rounding every weight to its nearest level (what the search evaluates) ignores that a
layer's inputs are correlated: the error of one weight can be cancelled by nudging the
levels of the weights that see correlated inputs. GPTQ (Frantar et al., 2023) does this
column by column with the inverse of the input second-moment matrix ``H = E[x x^T]``, on
the same uniform grid, so the file format and the step sizes stay as they are.

Measured on PP-OCRv4 det's pointwise convolutions (86% of its weights; H from 5 search
pages, checked on the other 5, bias correction in both arms): at the steps the search
chose, relative output error 0.0385 -> 0.0326; with every step 2^0.5 coarser (0.5
bits/weight fewer) 0.0773 -> 0.0568. The adaptive mode rounds every candidate it scores
this way (``modes/adaptive.py``), so the search and the file see the same model: about
0.04 s per candidate on cls, 0.2 s on det and 0.7 s on rec.

It serves layers whose output mixes input channels linearly with a 2-D view of the
weight: ``Conv`` with 1x1 kernels and one group, ``MatMul`` with a 2-D weight, ``Gemm``
(transA 0), in the main graph. ``H`` is computed inside onnxruntime (a Gram matrix per
layer input), so no activation leaves the session.

An input channel that is exactly zero on every sample of the data (a ReLU that never fires)
leaves its weights free: whatever they hold, the layer's output on that data is the same bits.
GPTQ sets them to zero, and so does :meth:`ErrorFeedback.levels`: level 0 is the most frequent
level of a weight tensor and takes the shortest code. On the halves of the bench's search
splits the converter measures on, such channels hold 6.9% of PP-OCRv4 det's weights, 3.6% of
rapidocr cls's and 1.5% of rec's (none of magika's, whose layers read LayerNorm-ed inputs); of
those channels, 16 of 276 (det), 11 of 39 (cls) and 9 of 97 (rec) carry some signal on the test
split, at most 3.9% (det) of the layer's mean channel energy.

Coarser steps for the input channels that carry little signal were measured and not adopted.
High-rate theory says a step per input channel proportional to 1/sqrt(E[x_i^2]) would save
0.52-0.57 bits/weight on det, rec and cls; on the shared grid (column i rounded to multiples
of m_i = floor(sqrt(E_ref / E[x_i^2])) levels, so the format need not change) it did the
opposite on det at the bench's gamma (throwaway sweep of x on the test split): at 99.18% mask
IoU the file is 657 KB with m_i = 1, about 664 KB with E_ref the channels' median and about
745 KB with their 90th percentile. A channel's energy does not say what its weights are worth
downstream.

Wider kernels and grouped Convs are not served, by measurement (branch
``experiment/wide-error-feedback``: im2col inside the graph, one ``H`` per group;
``scripts/sweep_steps.py`` at gamma 0.75, samples lost on the confirm half plus the test
split, summed over the swept steps, against this module's scope). rapidocr cls lost 13
against 24 and the digits 14 against 31 (gamma 0.25 and 0.5), but magika 83 against 86,
while its search half, the one that also measures ``H``, lost 11 against 23: its 5x1
Conv_0 has 1280 patch columns and only 250 files behind them, and GPTQ fits that half.
The search then trusted its half too far: the bench's cls failed its test split (98.67% at
6.15x, against 5.02x passing), magika fell from 5.05x to 4.69x, and ``moub demo`` lost
1.1% of its held-back digits (4 of 360).

Tried again on 2026-11-27 on top of the margin-based coarsening and the dead-input rule (branch
``experiment/wide-error-feedback-2``, grouped Convs left out). On magika's Conv_0 alone
(``scripts/patch_feedback_gain.py``: ``H`` from half of the bench's search split, every other
tensor fp32, judged on the 500 test files) GPTQ on patches does generalize, so "GPTQ fits that half" above is not
what held it back: at 6.04 bits/weight the relative output
error went 1.63e-4 -> 1.21e-4 (1.15e-4 on the half that measured ``H``) and the scores' KL
divergence 2.25e-4 -> 1.81e-4; at 5.54 bits/weight 5.13e-4 -> 3.30e-4; damping of 0.1 to 1 of
the mean diagonal, or ``H`` from the whole split, did no better. ``make bench``'s moub rows
(``--models digits,cls,magika``) against the 05:54 run: the step swept on the test split went
magika 5.82x -> 6.26x, cls 6.01x -> 6.40x, digits 21.78x -> 22.23x; the converter's own choice
magika 4.59x -> 4.67x, cls 5.54x -> 5.53x, and the bench's digits file passed its test split
(97.22% at 21.87x). But ``moub demo`` chose x = +2.0, the grid's coarse end, with 0 of 180
flipped on each half, and lost 4 of its 360 held-back digits (1.1%, against its 0.5%): the
better rounding moves the choice to steps where a few hundred samples no longer resolve
--max-drop (``resolution.py``). With grouped Convs served too, cls's choice fell one grid step
short of a cliff (0 + 1 of 300 flipped, 45 of 150 at the next step) and lost 5 of 300 test
samples, though their ``H`` generalizes (fitted on one quarter of cls's search split, the
rounding leaves 0.44-0.80 of nearest rounding's error on the other quarter, as on its own).
On PP-OCRv4's 3x3 convolutions (same branch with main merged, with the back-off guard of its
18e6bc3; ``python -m benchmarks.run --models rec,det --peers moub_best,moub_swept --no-runtime``,
15.7 min, against the 05:54 run) it did not pay either: rec's own choice failed its test split
(98.82% per-step agreement at 7.77x, where 7.20x passed) and its swept step stayed put (7.37x
against 7.39x); det's own choice fell from 6.84x to 6.28x, its swept step 7.38x -> 7.46x; the
searches took 314 s and 253 s against 307 s and 198 s. So the 1x1 scope stays, for good reasons
on every bench model but magika.
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
# add to every candidate the search scores. On this kind of machine PP-OCRv4 rec's 30 layers,
# 6.0e8, take 0.3 s a candidate; one 8192 x 8192 MatMul, 5.5e11, took 35-40 s (with another job
# on the CPUs) and a 0.5 GB factor, so a search over a 2.4 GB model of nine such layers would
# spend hours rounding, and ran out of 23 GB. The bench's models need at most 6.0e8; layers
# beyond the budget, the costliest first, keep nearest rounding.
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
    evaluator = Evaluator(probe, pool, dataset)
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
    contiguous memory (1.4-2.3x faster on det's and rec's layer shapes); every product,
    difference and matrix product is the one the column-major form computed, so the
    levels are the same bits. One float64 copy of the layer and int32 levels: 20 bytes per
    weight at the peak, where three float64 copies and int64 levels took 40."""
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
