"""Bias correction: give back to each layer's bias the mean shift its quantized weights add.

Rounding a layer's weights changes its output by ``(W_q - W) x``. The noise part of
that averages out over the input; its mean part, ``(W_q - W) E[x]``, is the same
shift of every output of a channel, and after ReLU-like activations and
BatchNorm-folded layers ``E[x]`` is far from zero. Subtracting the shift from the
layer's bias (Nagel et al., "Data-Free Quantization", 2019, section 4.2, here with
``E[x]`` measured on the user's data) removes it at no cost in bits: the bias is
stored on its own grid anyway. A corrected file can take coarser steps than an
uncorrected one of the same output error (docs/decisions/0010).

It applies where a pooled weight is read by ``Conv`` (with a bias input, or whose
only consumer is an ``Add`` of a per-channel constant or a BatchNormalization, whose
running mean then takes the shift), ``Gemm`` (transA 0, a C
input) or ``MatMul`` (2-D weight, then an ``Add`` of a per-column constant), in the
main graph, and the bias is pooled too. Structure-agnostic otherwise: any graph
made of these layers gets it, whatever the architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moub_format import constants as C
from moub_format.dtypes import cast_from_float32, storage_to_float32

from .data import Dataset
from .intake import Pool, is_main_graph
from .probes import fresh_prefix, probe_copy

CONV, MATMUL, GEMM, GEMM_T = "conv", "matmul", "gemm", "gemm-t"
PROBE_PREFIX = "moub_bias_probe"


@dataclass(frozen=True)
class Rule:
    """Weight site ``weight`` (pool index) of a ``kind`` layer reading ``source``, whose
    per-channel bias is pool site ``bias``; ``scale`` turns the weight's output shift into
    the bias's units (Gemm's alpha / beta), ``groups`` is Conv's group count. The bias is
    either added to the layer's output or, for a following BatchNormalization, its mean."""

    weight: int
    bias: int
    kind: str
    source: str
    groups: int = 1
    scale: float = 1.0
    sign: float = -1.0  # bias -= shift; +1 for BatchNormalization's mean input, which is subtracted


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _per_channel(dims: tuple[int, ...], channels: int, rank: int, axis: int) -> bool:
    """A constant of ``dims`` added to a rank-``rank`` output varies only along ``axis``, with ``channels`` values."""
    if len(dims) > rank or int(np.prod(dims, dtype=np.int64)) != channels:
        return False
    padded = (1,) * (rank - len(dims)) + tuple(dims)
    return all(d == (channels if i == axis else 1) for i, d in enumerate(padded))


def find_rules(model: onnx.ModelProto, pool: Pool) -> list[Rule]:
    """Every (weight, bias) pair of the main graph that bias correction can serve."""
    index = {s.name: i for i, s in enumerate(pool.sites) if is_main_graph(s) and s.name}
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def only_add(value: str) -> onnx.NodeProto | None:
        users = consumers.get(value, [])
        if value in outputs or len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in ("", "ai.onnx"):
            return None
        return users[0]

    def add_bias(node: onnx.NodeProto, channels: int, rank: int | None, axis: int) -> int | None:
        """The per-channel constant the layer's output is added to (rank None: any rank, channels last)."""
        add = only_add(node.output[0])
        if add is None or len(add.input) != 2:
            return None
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        if other not in index or not read_once(index[other], add):
            return None
        dims = pool.sites[index[other]].dims
        rank = max(1, len(dims)) if rank is None else rank
        return index[other] if _per_channel(dims, channels, rank, axis % rank) else None

    def batchnorm_mean(node: onnx.NodeProto, channels: int) -> int | None:
        """The running mean of an inference BatchNormalization that alone reads the layer's output."""
        users = consumers.get(node.output[0], [])
        if node.output[0] in outputs or len(users) != 1:
            return None
        bn = users[0]
        if (bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.input) != 5
                or bn.input[0] != node.output[0] or int(_attr(bn, "training_mode", 0)) or len(bn.output) != 1):
            return None
        mean = index.get(bn.input[3])
        ok = mean is not None and pool.sites[mean].dims == (channels,) and read_once(mean, bn)
        return mean if ok else None

    def read_once(bias: int, reader: onnx.NodeProto) -> bool:
        """The bias feeds ``reader`` and nothing else, so changing it changes only that layer."""
        name = pool.sites[bias].name
        return name not in outputs and sum(list(n.input).count(name) for n in consumers.get(name, [])) == 1 \
            and consumers[name][0] is reader

    rules: list[Rule] = []
    used_biases: set[int] = set()
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] not in index:
            continue
        w = index[node.input[1]]
        dims = pool.sites[w].dims
        rule = None
        if node.op_type == "Conv" and len(dims) >= 3:
            groups = int(_attr(node, "group", 1))
            if groups < 1 or dims[0] % groups:
                continue
            if len(node.input) > 2 and node.input[2]:
                b = index.get(node.input[2])
                b = b if b is not None and pool.sites[b].dims == (dims[0],) and read_once(b, node) else None
            else:
                b = add_bias(node, dims[0], len(dims), 1)
            rule = None if b is None else Rule(w, b, CONV, node.input[0], groups)
            if rule is None:
                b = batchnorm_mean(node, dims[0])
                rule = None if b is None else Rule(w, b, CONV, node.input[0], groups, sign=1.0)
        elif node.op_type == "Gemm" and len(dims) == 2 and len(node.input) > 2 and node.input[2] in index:
            beta, alpha = float(_attr(node, "beta", 1.0)), float(_attr(node, "alpha", 1.0))
            trans_b = int(_attr(node, "transB", 0))
            channels = dims[0] if trans_b else dims[1]
            b = index[node.input[2]]
            if (int(_attr(node, "transA", 0)) == 0 and beta != 0 and read_once(b, node)
                    and _per_channel(pool.sites[b].dims, channels, 2, 1)):
                rule = Rule(w, b, GEMM_T if trans_b else GEMM, node.input[0], 1, alpha / beta)
        elif node.op_type == "MatMul" and len(dims) == 2:
            b = add_bias(node, dims[1], None, -1)
            rule = None if b is None else Rule(w, b, MATMUL, node.input[0])
        if rule is not None and rule.bias not in used_biases and rule.bias != rule.weight:
            rules.append(rule)
            used_biases.add(rule.bias)
    # a bias shared by two layers, or also a weight of some rule, is left alone
    weights = {r.weight for r in rules}
    return [r for r in rules if r.bias not in weights]


def _channels_in(rule: Rule, dims: tuple[int, ...]) -> int:
    if rule.kind == CONV:
        return dims[1] * rule.groups
    return dims[1] if rule.kind == GEMM_T else dims[0]


def _probe_model(model: onnx.ModelProto, pool: Pool, rules: list[Rule]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The model plus one output per distinct layer input: its mean per input channel."""
    probe, taken = probe_copy(model)
    opset = next((o.version for o in probe.opset_import if o.domain in ("", "ai.onnx")), 13)
    means: dict[str, str] = {}
    for rule in rules:
        if rule.source in means:
            continue
        dims = pool.sites[rule.weight].dims
        k = len(means)
        out = fresh_prefix(f"{PROBE_PREFIX}_{k}", taken)
        taken.update({out, f"{out}_shape", f"{out}_rows", f"{out}_axes"})
        if rule.kind == CONV:
            source, axes = rule.source, [0] + list(range(2, len(dims)))
        else:  # rows of [-1, K]
            shape = f"{out}_shape"
            probe.graph.initializer.append(numpy_helper.from_array(np.array([-1, _channels_in(rule, dims)], np.int64), shape))
            source = f"{out}_rows"
            probe.graph.node.append(helper.make_node("Reshape", [rule.source, shape], [source], name=source))
            axes = [0]
        if opset >= 18:
            probe.graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), f"{out}_axes"))
            node = helper.make_node("ReduceMean", [source, f"{out}_axes"], [out], name=out, keepdims=0)
        else:
            node = helper.make_node("ReduceMean", [source], [out], name=out, axes=axes, keepdims=0)
        probe.graph.node.append(node)
        probe.graph.output.append(onnx.ValueInfoProto(name=out))  # onnxruntime infers the type
        means[rule.source] = out
    return probe, means


def input_means(model: onnx.ModelProto, pool: Pool, rules: list[Rule], dataset: Dataset) -> dict[str, np.ndarray]:
    """Each rule's layer input, averaged per input channel over ``dataset`` with the original weights
    (batch means weighted by batch size). Runs through the converter's Evaluator, so weights reach
    onnxruntime as they do for every candidate (models beyond protobuf's 2 GB included), with one
    thread: every process gets the same bits."""
    if not rules:
        return {}
    from .evaluate import Evaluator, original_arrays

    probe, names = _probe_model(model, pool, rules)
    evaluator = Evaluator(probe, pool, dataset, per_sample=False)
    positions = {out: evaluator.output_names.index(out) for out in names.values()}
    sums: dict[str, np.ndarray] = {}
    count = 0
    for start, outputs in evaluator.iter_outputs(original_arrays(model, pool), dataset):
        n = min(dataset.batch_size, dataset.n_samples - start)
        for out, position in positions.items():
            value = np.asarray(outputs[position], np.float64) * n
            sums[out] = value if out not in sums else sums[out] + value
        count += n
    return {source: sums[out] / max(count, 1) for source, out in names.items()}


@dataclass
class BiasCorrector:
    """The rules of a model and the input means they need; turns quantized weights into corrected biases."""

    rules: list[Rule]
    means: dict[str, np.ndarray]

    @classmethod
    def measure(cls, model: onnx.ModelProto, pool: Pool, dataset: Dataset) -> BiasCorrector:
        rules = find_rules(model, pool)
        means = input_means(model, pool, rules, dataset)
        usable = [r for r in rules if means[r.source].shape == (_channels_in(r, pool.sites[r.weight].dims),)
                  and np.isfinite(means[r.source]).all()]
        return cls(usable, {r.source: means[r.source] for r in usable})

    def shift(self, rule: Rule, delta: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
        """The mean output shift per channel caused by the weight change ``delta`` (flat, float64)."""
        mean = self.means[rule.source]
        if rule.kind == CONV:
            out_ch, in_per_group = dims[0], dims[1]
            g = rule.groups
            per = delta.reshape(g, out_ch // g, in_per_group, -1).sum(axis=3)
            return np.einsum("goi,gi->go", per, mean.reshape(g, in_per_group)).reshape(out_ch) * rule.scale
        if rule.kind == GEMM_T:
            return np.einsum("nk,k->n", delta.reshape(dims), mean) * rule.scale
        return np.einsum("k,kn->n", mean, delta.reshape(dims)) * rule.scale

    def corrected_bias(self, pool: Pool, rule: Rule, weight_values: np.ndarray) -> np.ndarray:
        """The bias (flat float64) that cancels the mean shift of ``weight_values`` (the weight as decoded)."""
        site = pool.sites[rule.weight]
        original = pool.values[site.start : site.stop].astype(np.float64)
        delta = np.asarray(weight_values, np.float64).ravel() - original
        bias = pool.sites[rule.bias]
        return pool.values[bias.start : bias.stop].astype(np.float64) + rule.sign * self.shift(rule, delta, site.dims)

    def correct_levels(self, pool: Pool, steps: np.ndarray, levels: list[np.ndarray]) -> list[np.ndarray]:
        """``levels`` with every ruled bias re-quantized (on its own step) from its corrected value.
        A correction that would leave the grid codebook's range is skipped."""
        from .uniform import dequantize

        out = list(levels)
        for rule in self.rules:
            site = pool.sites[rule.weight]
            decoded = storage_to_float32(dequantize(levels[rule.weight], steps[rule.weight], site.dtype), site.dtype)
            target = self.corrected_bias(pool, rule, decoded)
            q = np.rint(target / float(steps[rule.bias]))
            if np.isfinite(q).all() and (q.size == 0 or float(np.abs(q).max()) < C.GRID_LIMIT // 4):
                out[rule.bias] = q.astype(np.int64)
        return out

    def summary(self) -> dict:
        kinds: dict[str, int] = {}
        for r in self.rules:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        return {"layers": len(self.rules), "by_kind": dict(sorted(kinds.items()))}


def none() -> BiasCorrector:
    return BiasCorrector([], {})


def arrays_with_bias(pool: Pool, corrector: BiasCorrector, site_index: int, weight_storage: np.ndarray,
                     arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with the bias of site ``site_index`` (if ruled) corrected, unquantized, for the
    weight's decoded values ``weight_storage`` (storage dtype): what sensitivity runs measure."""
    out = dict(arrays)
    for rule in corrector.rules:
        if rule.weight == site_index:
            bias = pool.sites[rule.bias]
            weight = storage_to_float32(weight_storage, pool.sites[site_index].dtype)
            values = corrector.corrected_bias(pool, rule, weight)
            out[bias.path] = cast_from_float32(values.astype(np.float32), bias.dtype).reshape(bias.dims)
    return out


__all__ = ["BiasCorrector", "Rule", "arrays_with_bias", "find_rules", "input_means", "none"]
