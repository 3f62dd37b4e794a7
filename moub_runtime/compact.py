"""Compact models: quantized weights held as integer levels behind ``DequantizeLinear``.

A pack member over a grid codebook decodes to ``float32(level) * float32(scale)`` with the
integer ``level = first + symbol + offset`` (FORMAT.md, packs). ONNX's ``DequantizeLinear``
computes ``float(q - zero_point) * scale``: the same single float32 product when
``q - zero_point`` is the level. So such a member can stay in memory as an 8- or 16-bit
integer tensor ``q`` (the levels plus a zero point that brings them into the type's range),
with a ``DequantizeLinear`` node giving the graph the very weight the normal decode gives.
onnxruntime does not fold ``DequantizeLinear`` into a float initializer when it creates the
session (it keeps QDQ nodes for its quantization passes), so the integers are what stays
resident; the float weight exists while the node's consumer runs.

A quantized tensor qualifies when it is a pack member over an integer codebook (a grid, or the
explicit list of used levels a writer stores for a sparse pack), of element type
float32, an initializer or ``Constant`` of the main graph that a node reads and that is not a
graph input, and its levels fit int8, uint8, int16 or uint16 with a zero point of that type.
Every other tensor is decoded as usual; :func:`plan_compact` says why, and ``moub inspect``
counts them. 8-bit levels use the ONNX ``DequantizeLinear`` (opset 10 and later), 16-bit ones
onnxruntime's own (domain ``com.microsoft``) unless the model's opset is 21 or later: raising a
model's opset would change what its other nodes mean.

Two modes (:data:`COMPACT_MODES`). ``"fast"`` also keeps float every weight a grouped ``Conv``
reads: onnxruntime gives a Conv its fast kernels (the NCHWc layout on x86, with the filter
reordered once) only when the weight is a constant initializer, and without them a grouped
(depthwise) Conv runs one small matrix product per group: measured 27-82 ns per weight per
inference on PP-OCR cls and rec, against at most 4 for any other weight, each saving the same 3
bytes. ``"smallest"`` holds every weight that qualifies, whatever its consumer costs.
``compact=True`` is ``"fast"`` where the onnxruntime at hand has NCHWc kernels, else
``"smallest"`` (:mod:`.conv_layout`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from moub_format import constants as C
from moub_format import dtypes

from .sites import KIND_CONSTANT, TensorSite

if TYPE_CHECKING:
    import onnx

    from moub_format import PackMember

    from .validation import CheckedFile

ONNXRUNTIME_DOMAIN = "com.microsoft"

# What ``compact=`` takes besides True (which picks one of them) and False.
COMPACT_MODES = ("fast", "smallest")
GROUPED_CONV_REASON = "read by a grouped Conv (slow from a DequantizeLinear; compact='smallest' holds it)"


def compact_mode(compact: bool | str, fast_pays: Callable[[], bool]) -> str | None:
    """The mode a ``compact=`` argument asks for (None: a normal session); ValueError for another
    value. True: ``"fast"`` when ``fast_pays()``, else ``"smallest"``."""
    if not isinstance(compact, str):
        return None if not compact else ("fast" if fast_pays() else "smallest")
    if compact in COMPACT_MODES:
        return compact
    raise ValueError(f"compact must be True, False or one of {', '.join(COMPACT_MODES)}; got {compact!r}")


def grouped_conv_inputs(graph) -> set[str]:
    """The value names a main-graph ``Conv`` with ``group`` > 1 reads (its weight and bias)."""
    names: set[str] = set()
    for node in graph.node:
        if node.op_type == "Conv" and node.domain in ("", "ai.onnx"):
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group > 1:
                names.update(name for name in node.input if name)
    return names


@dataclass(frozen=True)
class LevelType:
    """An integer element type ``DequantizeLinear`` takes, and the least ONNX opset whose
    ``DequantizeLinear`` takes it."""

    numpy: str
    onnx: int
    low: int
    high: int
    onnx_opset: int

    @property
    def itemsize(self) -> int:
        return np.dtype(self.numpy).itemsize


# Narrowest first; signed before unsigned, so that levels around zero keep zero point 0.
LEVEL_TYPES = (
    LevelType("i1", dtypes.INT8, -(1 << 7), (1 << 7) - 1, 10),
    LevelType("u1", dtypes.UINT8, 0, (1 << 8) - 1, 10),
    LevelType("<i2", dtypes.INT16, -(1 << 15), (1 << 15) - 1, 21),
    LevelType("<u2", dtypes.UINT16, 0, (1 << 16) - 1, 21),
)


def level_type(low: int, high: int) -> tuple[LevelType, int] | None:
    """The narrowest type holding ``level + zero_point`` for every level in [low, high], with a
    zero point of that type (the one nearest 0); None when none does."""
    for candidate in LEVEL_TYPES:
        least = max(candidate.low, candidate.low - low)
        most = min(candidate.high, candidate.high - high)
        if least <= most:
            return candidate, min(max(0, least), most)
    return None


@dataclass(frozen=True)
class CompactTensor:
    """A planned tensor: its levels' type and zero point."""

    level: LevelType
    zero_point: int
    low: int    # least and greatest level the code table allows
    high: int


@dataclass
class CompactPlan:
    """Which quantized tensors a compact model holds as integers, and why the others stay float."""

    planned: dict[int, CompactTensor] = field(default_factory=dict)   # pack member site ordinal -> its type
    kept: dict[str, str] = field(default_factory=dict)                # quantized site path -> why it stays float
    weights: dict[str, int] = field(default_factory=dict)             # path -> elements, for both of the above

    def level_of(self, member: PackMember) -> tuple[str, int] | None:
        """What :meth:`moub_format.MoubFile.iter_pack_levels` asks: (dtype, zero point) or None."""
        planned = self.planned.get(member.site)
        return (planned.level.numpy, planned.zero_point) if planned is not None else None

    def summary(self, sites: dict[int, TensorSite]) -> dict:
        """Counts for ``moub inspect``: tensors and weights held as each integer type, and those kept as floats by reason."""
        held: dict[str, dict[str, int]] = {}
        for ordinal, planned in self.planned.items():
            entry = held.setdefault(dtypes.NAMES[planned.level.onnx], {"tensors": 0, "weights": 0})
            entry["tensors"] += 1
            entry["weights"] += self.weights[sites[ordinal].path]
        kept: dict[str, dict[str, int]] = {}
        for path, reason in self.kept.items():
            entry = kept.setdefault(reason, {"tensors": 0, "weights": 0})
            entry["tensors"] += 1
            entry["weights"] += self.weights[path]
        resident = sum(self.weights[sites[o].path] * p.level.itemsize for o, p in self.planned.items())
        return {"held": held, "kept_float": kept, "held_weight_bytes": resident}


def _target_name(site: TensorSite) -> str | None:
    """The value name a main-graph initializer or Constant site gives the graph; None for a
    site inside a subgraph or function."""
    if site.path.startswith("init:"):
        return site.tensor.name
    if site.kind == KIND_CONSTANT and site.path.startswith("node:") and site.path.count("/") == 1 and site.node.output:
        return site.node.output[0]
    return None


def plan_compact(checked: CheckedFile, consumed: set[str], mode: str) -> CompactPlan:
    """The plan for a checked file (nothing decoded): every pack member that qualifies (see the
    module docstring) with its type; every other quantized tensor with its reason.
    ``consumed``: the value names some node reads or the graph outputs; ``mode``: one of
    :data:`COMPACT_MODES`."""
    moub, model = checked.moub, checked.model
    index = moub.index
    graph_inputs = {value.name for value in model.graph.input}
    slow_when_dequantized = grouped_conv_inputs(model.graph) if mode == "fast" else set()
    plan = CompactPlan()
    for info in index.tensors:
        if info.encoding == C.ENCODING_HUFFMAN:
            plan.kept[info.path] = "a Huffman tensor (not a pack member)"
            plan.weights[info.path] = info.n_elements
    for pack in index.packs:
        integers = moub.integer_codebook(pack.codebook)
        low, high = moub.level_range(pack) if integers else (0, 0)
        for member in pack.members:
            site = checked.members[member.site]
            plan.weights[site.path] = member.count
            name = _target_name(site)
            if not integers:
                reason = "a codebook of non-integer values"
            elif site.tensor.data_type != dtypes.FLOAT:
                reason = f"element type {dtypes.NAMES.get(site.tensor.data_type, site.tensor.data_type)}"
            elif name is None:
                reason = "inside a subgraph or function"
            elif name not in consumed:
                reason = "read by no node"
            elif name in graph_inputs:
                reason = "also a graph input"
            elif name in slow_when_dequantized:
                reason = GROUPED_CONV_REASON
            else:
                chosen = level_type(low + member.offset, high + member.offset)
                if chosen is None:
                    reason = "levels wider than 16 bits"
                else:
                    plan.planned[member.site] = CompactTensor(chosen[0], chosen[1], low + member.offset, high + member.offset)
                    continue
            plan.kept[site.path] = reason
    return plan


class CompactGraph:
    """Edits a checked model in place: each planned tensor becomes an integer initializer (a
    stub the caller fills or hands to onnxruntime), a scale and a zero point, and a
    ``DequantizeLinear`` that defines the tensor's old name. :meth:`finish` then drops the
    replaced initializers and puts the new nodes first (the graph stays topologically sorted)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.names = self._all_names()
        self.default_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.new_nodes: list[tuple[list[str], str, str]] = []   # (inputs, output, domain) of nodes for initializers
        self.replaced: set[str] = set()
        self.uses_onnxruntime_domain = False

    def _all_names(self) -> set[str]:
        graph = self.graph
        names = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
        for node in graph.node:
            names.update(node.input)
            names.update(node.output)
        return names

    def _unique(self, base: str) -> str:
        name, number = base, 1
        while name in self.names:
            number += 1
            name = f"{base}_{number}"
        self.names.add(name)
        return name

    def _scalar(self, name: str, element_type: int, value) -> None:
        tensor = self.graph.initializer.add(name=name, data_type=element_type)
        tensor.raw_data = np.array(value, dtype=dtypes.STORAGE_DTYPES[element_type]).tobytes()

    def add(self, site: TensorSite, planned: CompactTensor, scale: float) -> onnx.TensorProto:
        """Replace ``site`` (a planned tensor) and return the stub of its integer initializer."""
        target = _target_name(site)
        level = planned.level
        q_name = self._unique(f"{target}_quantized")
        scale_name = self._unique(f"{target}_scale")
        zero_name = self._unique(f"{target}_zero_point")
        stub = self.graph.initializer.add(name=q_name, data_type=level.onnx, dims=list(site.tensor.dims))
        self._scalar(scale_name, dtypes.FLOAT, np.float32(scale))
        self._scalar(zero_name, level.onnx, planned.zero_point)
        domain = "" if self.default_opset >= level.onnx_opset else ONNXRUNTIME_DOMAIN
        self.uses_onnxruntime_domain |= domain == ONNXRUNTIME_DOMAIN
        inputs = [q_name, scale_name, zero_name]
        if site.kind == KIND_CONSTANT:  # the Constant node becomes the DequantizeLinear, in place
            node = site.node
            name = node.name
            node.Clear()
            node.name, node.op_type, node.domain = name, "DequantizeLinear", domain
            node.input.extend(inputs)
            node.output.append(target)
        else:
            self.replaced.add(target)
            self.new_nodes.append((inputs, target, domain))
        return stub

    def finish(self) -> None:
        graph = self.graph
        for i in reversed([i for i, t in enumerate(graph.initializer) if t.name in self.replaced]):
            del graph.initializer[i]
        if self.new_nodes:
            rest = type(graph)()
            rest.node.extend(graph.node)
            del graph.node[:]
            for inputs, output, domain in self.new_nodes:
                graph.node.add(op_type="DequantizeLinear", domain=domain, input=inputs, output=[output],
                               name=self._unique(f"{output}_dequantize"))
            graph.node.extend(rest.node)
        if self.uses_onnxruntime_domain and not any(o.domain == ONNXRUNTIME_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.add(domain=ONNXRUNTIME_DOMAIN, version=1)


def compact_decoded(checked: CheckedFile, plan: CompactPlan, graph: CompactGraph
                    ) -> Iterator[tuple[TensorSite, int, np.ndarray, onnx.TensorProto | None]]:
    """Decode ``checked`` with the planned members as integers: (site, element type, array,
    None) for what decodes as usual; (site, element type of the integers, q, stub) for a
    planned member, whose site ``graph`` has just replaced by ``stub`` (to fill or hand over)."""
    ordinal_of = {id(site): ordinal for ordinal, site in checked.members.items()}
    scale_of = {member.site: member.scale for pack in checked.moub.index.packs for member in pack.members}
    for site, element_type, array, zero_point in checked.decoded_levels(plan.level_of):
        if zero_point is None:
            yield site, element_type, array, None
            continue
        ordinal = ordinal_of[id(site)]
        planned = plan.planned[ordinal]
        yield site, planned.level.onnx, array, graph.add(site, planned, scale_of[ordinal])
