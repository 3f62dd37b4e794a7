"""Read a model and pool its float weights.

The pool is one float32 vector holding every weight the converter may
quantize, site after site in the canonical order of ``moub_runtime.sites``
(initializers, ``Constant`` nodes, If/Loop/Scan subgraphs, functions).
Everything else passes through the container losslessly, with a reason:
non-float tensors, tensors under ``min_elements``, tensors with non-finite
values, unused tensors, and tensors that feed a shape, index or scale input
(``Reshape``'s shape, ``Resize``'s scales, ``DequantizeLinear``'s scale, ...),
which are not weights whatever their size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from moub_format import dtypes
from moub_runtime.payload import element_count
from moub_runtime.compact import four_bit_weights
from moub_runtime.sites import KIND_CONSTANT, is_main_graph_initializer, is_main_graph_site, iter_tensor_sites
from moub_runtime.tensor_walk import (
    describe_external_reference,
    external_location,
    first_external_reference,
    iter_reachable_tensors,
    refers_to_external_data,
)

from .errors import ModelError

# Input positions that carry shapes, axes, indices, scales or flags, never weights.
# A tensor consumed at one of these anywhere in the model passes through losslessly.
# Unknown ops count as weight consumers: the pool stays structure-agnostic.
NON_WEIGHT_INPUTS: dict[str, frozenset[int]] = {
    op: frozenset(positions)
    for op, positions in {
        "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Pad": (1, 2, 3),
        "Resize": (1, 2, 3), "Upsample": (1,), "ConstantOfShape": (0,), "TopK": (1,),
        "Range": (0, 1, 2), "OneHot": (1, 2), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,),
        "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,),
        "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,),
        "ReduceSumSquare": (1,), "Clip": (1, 2), "Gather": (1,), "GatherElements": (1,), "GatherND": (1,),
        "ScatterElements": (1,), "ScatterND": (1,), "Scatter": (1,), "NonMaxSuppression": (2, 3, 4),
        "Dropout": (1, 2), "CumSum": (1,), "Trilu": (1,), "Shape": (0,), "Size": (0,), "Where": (0,),
        "Loop": (0, 1), "If": (0,), "Compress": (1,), "RoiAlign": (1, 2), "CenterCropPad": (1,),
        "DequantizeLinear": (1, 2), "QuantizeLinear": (1, 2), "DynamicQuantizeLinear": (),
        "QLinearConv": (1, 2, 4, 5, 6, 7), "QLinearMatMul": (1, 2, 4, 5, 6, 7),
        "MatMulInteger": (2, 3), "ConvInteger": (2, 3), "GridSample": (1,), "AffineGrid": (1,),
        "DFT": (1, 2), "STFT": (1, 2, 3), "Col2Im": (1, 2), "Bernoulli": (), "ReverseSequence": (1,),
    }.items()
}

# The same for onnxruntime's contrib ops (domain com.microsoft): the quantization parameters
# (scales, zero points) of its quantized kernels. Changing a scale moves every weight it scales.
MICROSOFT_NON_WEIGHT_INPUTS: dict[str, frozenset[int]] = {
    op: frozenset(positions)
    for op, positions in {
        "DequantizeLinear": (1, 2), "QuantizeLinear": (1, 2), "DynamicQuantizeLSTM": (4, 8, 9, 10, 11),
        "MatMulIntegerToFloat": (2, 3, 4, 5), "DynamicQuantizeMatMul": (2, 3), "QGemm": (1, 2, 4, 5, 7, 8),
        "QAttention": (3, 4, 5, 6, 7), "QLinearConv": (1, 2, 4, 5, 6, 7), "QLinearMatMul": (1, 2, 4, 5, 6, 7),
        "QLinearAdd": (1, 2, 4, 5, 6, 7), "QLinearMul": (1, 2, 4, 5, 6, 7), "QLinearSigmoid": (1, 2, 3, 4),
        "QLinearLeakyRelu": (1, 2, 3, 4), "QLinearSoftmax": (1, 2, 3, 4), "QLinearGlobalAveragePool": (1, 2, 3, 4),
        "QLinearAveragePool": (1, 2, 3, 4), "MatMulNBits": (2, 3, 4), "GatherBlockQuantized": (1, 2, 3),
    }.items()
}

REASON_NON_FLOAT = "non-float"
REASON_SMALL = "small"
REASON_NOT_WEIGHT = "not a weight"
REASON_UNUSED = "unused"
REASON_NON_FINITE = "non-finite values"


@dataclass(frozen=True)
class PoolSite:
    """One pooled tensor: its site and its slice ``[start, stop)`` of the pool."""

    path: str
    name: str
    kind: str
    dtype: int
    dims: tuple[int, ...]
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class Pool:
    """Every quantizable weight of a model, pooled as float32."""

    sites: list[PoolSite]
    values: np.ndarray
    passthrough: dict[str, str] = field(default_factory=dict)  # path -> reason
    # paths of the weights a compact session can hold in 4 bits (moub_runtime.compact.four_bit_weights)
    four_bit: frozenset[str] = frozenset()
    # paths the fallback gives the int16 window under --ram (held in two bytes in a compact session; fallback.py)
    sixteen_bit: frozenset[str] = frozenset()

    @property
    def n_weights(self) -> int:
        return int(self.values.size)

    def without(self, numbers: Collection[int], reason: str) -> Pool:
        """The pool less the sites ``numbers`` (indices into ``sites``), which pass through with ``reason``."""
        dropped = set(numbers)
        kept = [site for i, site in enumerate(self.sites) if i not in dropped]
        values = np.empty(sum(site.size for site in kept), dtype=np.float32)
        sites: list[PoolSite] = []
        offset = 0
        for site in kept:
            values[offset : offset + site.size] = self.values[site.start : site.stop]
            sites.append(replace(site, start=offset, stop=offset + site.size))
            offset += site.size
        passthrough = {**self.passthrough, **{self.sites[i].path: reason for i in sorted(dropped)}}
        gone = {self.sites[i].path for i in dropped}
        return Pool(sites, values, passthrough, self.four_bit - gone, self.sixteen_bit - gone)

    def summary(self) -> dict:
        reasons: dict[str, int] = {}
        for reason in self.passthrough.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        return {
            "pooled_tensors": len(self.sites),
            "pooled_weights": self.n_weights,
            "passthrough_tensors": len(self.passthrough),
            "passthrough_reasons": dict(sorted(reasons.items())),
            "min": float(self.values.min()) if self.values.size else None,
            "max": float(self.values.max()) if self.values.size else None,
        }


@dataclass(frozen=True)
class SourceModel:
    """A loaded model with everything the report needs to know about its source."""

    model: onnx.ModelProto
    sha256: str
    original_bytes: int
    label: str


def _external_files(model: onnx.ModelProto) -> set[str]:
    return {external_location(item.tensor) for item in iter_reachable_tensors(model) if refers_to_external_data(item.tensor)}


def _check_loaded(model: onnx.ModelProto, label: str) -> None:
    if model.ir_version <= 0 or not len(model.opset_import) or not len(model.graph.node):
        raise ModelError(f"{label}: not an ONNX model (no IR version, opset or graph nodes)")
    reference = first_external_reference(model)  # onnx loads initializers and attributes, not sparse tensors
    if reference is not None:
        raise ModelError(f"{label}: {describe_external_reference(reference)} that was not loaded")


def load_source(model_or_path: str | os.PathLike | onnx.ModelProto | bytes, input_shapes=None) -> SourceModel:
    """Load an ONNX model (external data resolved from its folder) and fingerprint it.

    A TorchScript file (``.pt``; needs ``input_shapes``) is exported to ONNX first; its
    sha256 is the .pt file's and its original size the exported fp32 ONNX model's.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        from .torch_export import export, is_torchscript_path

        if is_torchscript_path(model_or_path) or input_shapes:
            model = export(model_or_path, input_shapes or [])
            _check_loaded(model, str(model_or_path))
            digest = hashlib.sha256(Path(model_or_path).read_bytes()).hexdigest()
            return SourceModel(model, digest, model.ByteSize(), str(model_or_path))
    if isinstance(model_or_path, onnx.ModelProto):
        data = model_or_path.SerializeToString(deterministic=True)
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        if _external_files(model):
            raise ModelError("model: a ModelProto with external data references; pass its path instead")
        _check_loaded(model, "model")
        return SourceModel(model, hashlib.sha256(data).hexdigest(), len(data), "model")
    if isinstance(model_or_path, bytes):
        raise ModelError("model: pass a path or an onnx.ModelProto, not bytes")
    path = Path(model_or_path)
    label = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ModelError(f"{label}: is a directory, not an ONNX file") from None
    except OSError as exc:
        raise ModelError(f"{label}: cannot read ({exc.strerror})") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(raw)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelError(f"{label}: not an ONNX model (protobuf does not parse: {exc})") from None
    original = len(raw)
    external = _external_files(model)
    if external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # missing file, path escaping the folder, short read
            raise ModelError(f"{label}: external data cannot be loaded ({' '.join(str(exc).split())})") from None
    _check_loaded(model, label)
    for name in sorted(external):  # every one was loaded: each names a file in the model's folder
        original += (path.parent / name).stat().st_size
    return SourceModel(model, hashlib.sha256(raw).hexdigest(), original, label)


def tensor_to_float32(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values as a flat float32 array (bf16 widened from its bits)."""
    array = numpy_helper.to_array(tensor)
    if tensor.data_type == onnx.TensorProto.BFLOAT16:
        return dtypes.bfloat16_bits_to_float32(array.view(np.uint16).ravel())
    return np.asarray(array, dtype=np.float32).ravel()


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for graph in _graphs(model.graph):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def consumer_roles(model: onnx.ModelProto) -> tuple[set[str], dict[str, str]]:
    """(names read anywhere, name -> 'Op input i' for names used as non-weight inputs).

    Names are matched across scopes: a name shadowed in a subgraph may be kept
    lossless needlessly, never quantized wrongly.
    """
    used: set[str] = set()
    non_weight: dict[str, str] = {}
    for graph in _graphs(model.graph):
        used.update(o.name for o in graph.output)
    for node in _all_nodes(model):
        if node.domain in ("", "ai.onnx"):
            positions = NON_WEIGHT_INPUTS.get(node.op_type, frozenset())
        elif node.domain == "com.microsoft":
            positions = MICROSOFT_NON_WEIGHT_INPUTS.get(node.op_type, frozenset())
        else:
            positions = frozenset()
        for i, name in enumerate(node.input):
            if not name:
                continue
            used.add(name)
            if i in positions:
                non_weight.setdefault(name, f"{node.op_type} input {i}")
    for function in model.functions:
        used.update(function.output)
    for name, role in _weight_only_parameters(model).items():
        non_weight.setdefault(name, role)
    return used, non_weight


def _weight_only_parameters(model: onnx.ModelProto) -> dict[str, str]:
    """Zero points and scales of weight-only quantization done with plain ops: an integer
    tensor turned into floats by a Cast, then maybe a Sub (its zero point), then a Mul or Div
    (its scale). Those floats are quantization parameters, not weights: a changed scale moves
    every weight of its row. name -> "Op input i, dequantizing an integer weight"."""
    integer_types = set(dtypes.INTEGER_RANGES) | {onnx.TensorProto.INT32, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    integers = {t.name for graph in _graphs(model.graph) for t in graph.initializer if t.data_type in integer_types}
    integers |= {node.output[0] for node in _all_nodes(model) if node.op_type == "Constant" and node.output
                 and any(a.t.data_type in integer_types for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)}
    nodes = list(_all_nodes(model))
    casts = {n.output[0] for n in nodes if n.op_type == "Cast" and n.input and n.input[0] in integers and n.output}
    roles: dict[str, str] = {}
    for op in ("Sub", "Mul", "Div"):  # a zero point first, then the scale of what it gave
        for node in nodes:
            if node.op_type != op or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
                continue
            for i, name in enumerate(node.input):
                other = node.input[1 - i]
                if name in casts and other and other not in casts and (op != "Div" or i == 0):
                    roles.setdefault(other, f"{op} input {1 - i}, dequantizing an integer weight")
                    if op == "Sub":
                        casts.add(node.output[0])
    return roles


def pool_weights(model: onnx.ModelProto, min_elements: int = 1024) -> Pool:
    """Pool every quantizable float weight of ``model`` (see the module docstring)."""
    used, non_weight = consumer_roles(model)
    constant_outputs = _constant_outputs(model)
    # Two passes, so the pool is one array filled in place: no per-tensor copies joined at
    # the end (twice the weights at the peak). The first decides from the graph alone.
    plan: list[tuple] = []
    for site in iter_tensor_sites(model):
        tensor = site.tensor
        name = constant_outputs.get(site.path, tensor.name) if site.kind == KIND_CONSTANT else tensor.name
        if tensor.data_type not in dtypes.FLOAT_DTYPES:
            plan.append((site, name, REASON_NON_FLOAT, 0))
            continue
        n = element_count(tensor)
        if n < max(1, min_elements):
            reason = REASON_SMALL
        elif name in non_weight:
            reason = f"{REASON_NOT_WEIGHT} ({non_weight[name]})"
        elif name not in used:
            reason = REASON_UNUSED
        else:
            reason = None
        plan.append((site, name, reason, n))
    pooled = np.empty(sum(n for *_, reason, n in plan if reason is None), dtype=np.float32)
    sites: list[PoolSite] = []
    passthrough: dict[str, str] = {}
    offset = 0
    for site, name, reason, n in plan:
        if reason is not None:
            passthrough[site.path] = reason
            continue
        tensor = site.tensor
        values = tensor_to_float32(tensor)
        if values.size != n:
            raise ModelError(f"tensor {tensor.name!r}: {values.size} values for dims {list(tensor.dims)}")
        if not np.isfinite(values).all():
            passthrough[site.path] = REASON_NON_FINITE
            continue
        sites.append(PoolSite(site.path, name, site.kind, int(tensor.data_type), tuple(int(d) for d in tensor.dims), offset, offset + n))
        pooled[offset : offset + n] = values
        offset += n
    if offset < pooled.size:  # a tensor with non-finite values stayed out
        pooled = pooled[:offset].copy()
    return Pool(sites, pooled, passthrough, _four_bit_paths(model, sites))


def _four_bit_paths(model: onnx.ModelProto, sites: list[PoolSite]) -> frozenset[str]:
    """The pooled main-graph weights that one MatMul or Gemm alone reads, as the weight onnxruntime
    fuses into a 4-bit MatMulNBits (the compact session's rule, :func:`four_bit_weights`)."""
    main = {site.name: site for site in sites
            if is_main_graph_site(site.path) and (site.kind == KIND_CONSTANT or is_main_graph_initializer(site.path))}
    names = four_bit_weights(model.graph, {name: list(site.dims) for name, site in main.items()})
    return frozenset(main[name].path for name in names)


def _constant_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """Site path of every Constant node -> the value name it defines (its output)."""
    names: dict[str, str] = {}

    def walk_nodes(nodes, prefix: str) -> None:
        for index, node in enumerate(nodes):
            node_prefix = f"{prefix}node:{index}"
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                    names[f"{node_prefix}/{attr.name}"] = node.output[0] if node.output else ""
                elif attr.type == onnx.AttributeProto.GRAPH:
                    walk_graph(attr.g, f"{node_prefix}/{attr.name}/")
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for j, graph in enumerate(attr.graphs):
                        walk_graph(graph, f"{node_prefix}/{attr.name}[{j}]/")

    def walk_graph(graph, prefix: str) -> None:
        walk_nodes(graph.node, prefix)

    walk_graph(model.graph, "")
    for j, function in enumerate(model.functions):
        walk_nodes(function.node, f"func:{j}/")
    return names


def is_main_graph(site: PoolSite) -> bool:
    """Initializer or Constant node of the main graph (not a subgraph or function)."""
    return site.path.startswith("init:") or (site.kind == KIND_CONSTANT and site.path.startswith("node:") and site.path.count("/") == 1)


__all__ = ["Pool", "PoolSite", "SourceModel", "load_source", "pool_weights", "tensor_to_float32", "is_main_graph"]
