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
counts them. 8-bit levels use the ONNX ``DequantizeLinear`` (opset 10 and later), 16-bit and
4-bit ones onnxruntime's own (domain ``com.microsoft``) unless the model's opset is 21 or later:
raising a model's opset would change what its other nodes mean.

A weight that one ``MatMul`` or ``Gemm`` reads as its second input, and nothing else (:func:`four_bit_weights`),
of rank 2, whose levels span at most 16 values, is held as int4 or uint4, two levels a byte (ONNX's
packing: the first in the low nibble): onnxruntime fuses such a ``DequantizeLinear`` and its
reader into a 4-bit ``MatMulNBits``, which computes in float32 (the session sets accuracy level
1) with the weight packed. The scale and zero point are given per column (``axis`` 1, every
column the same values): onnxruntime shares equal scalar initializers between nodes before its
QDQ fusions run, and a ``DequantizeLinear`` whose scale is shared is not fused; a per-column
scale is not shared and costs 4.5 bytes per column.

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
from moub_format.reader import aligned_empty

from .sites import KIND_CONSTANT, TensorSite, is_main_graph_initializer, is_main_graph_site

if TYPE_CHECKING:
    import onnx

    from moub_format import PackMember

    from .validation import CheckedFile

ONNXRUNTIME_DOMAIN = "com.microsoft"
# ONNX's 4-bit element types (TensorProto.INT4, UINT4): not container types (moub_format.dtypes).
ONNX_INT4 = 22
ONNX_UINT4 = 21
# The rank of a weight onnxruntime fuses with its MatMul or Gemm into MatMulNBits.
FOUR_BIT_RANK = 2

# What ``compact=`` takes besides True (which picks one of them) and False.
COMPACT_MODES = ("fast", "smallest")
GROUPED_CONV_REASON = "read by a grouped Conv (slow from a DequantizeLinear; compact='smallest' holds it)"
EIGHT_BIT_MATMUL_REASON = ("read by MatMul/Gemm, levels wider than 4 bits (onnxruntime's 8-bit MatMulNBits is slower "
                           "than float32; compact='smallest' holds it)")


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


def _attribute(node, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return attribute.f if attribute.type == 1 else attribute.i  # AttributeProto.FLOAT is 1
    return default


def _fuses_into_matmul_nbits(node, position: int) -> bool:
    """Whether onnxruntime fuses a ``DequantizeLinear`` giving input ``position`` of ``node``
    into a ``MatMulNBits``: the second input of a MatMul, or of a Gemm that neither transposes
    nor scales (a transposed B stays a Gemm that dequantizes at every run)."""
    if node.domain not in ("", "ai.onnx") or position != 1:
        return False
    if node.op_type == "MatMul":
        return True
    if node.op_type != "Gemm":
        return False
    plain = _attribute(node, "transA", 0) == 0 and _attribute(node, "transB", 0) == 0 and _attribute(node, "alpha", 1.0) == 1.0
    return plain and (len(node.input) < 3 or not node.input[2] or _attribute(node, "beta", 1.0) == 1.0)


def four_bit_weights(graph, ranks: dict[str, int]) -> set[str]:
    """The names of ``ranks`` (value name -> rank of the weight) that have rank
    :data:`FOUR_BIT_RANK` and that one main-graph MatMul or Gemm reads, as the weight onnxruntime
    fuses into ``MatMulNBits``, and nothing else reads (onnxruntime fuses a DequantizeLinear of
    one reader only; nor is it a graph output): the weights a compact session holds in 4 bits
    when their levels span at most 16 values, and ``--ram int4`` limits so."""
    fused: set[str] = set()
    other: set[str] = {value.name for value in graph.output}
    for node in graph.node:
        for position, name in enumerate(node.input):
            if _fuses_into_matmul_nbits(node, position) and name not in fused:
                fused.add(name)
            else:
                other.add(name)
    return {name for name, rank in ranks.items() if rank == FOUR_BIT_RANK and name in fused and name not in other}


def pack_nibbles(levels: np.ndarray) -> np.ndarray:
    """4-bit values (int8 in [-8, 7] or uint8 in [0, 15]) packed two a byte as ONNX stores INT4
    and UINT4: element 2i in the low nibble of byte i, 2i + 1 in its high nibble (an odd count
    leaves the last high nibble 0). One array of the packed bytes, 64-byte aligned."""
    flat = levels.reshape(-1).view(np.uint8)
    pairs = flat.size // 2
    packed = aligned_empty((-(-flat.size // 2),), np.dtype(np.uint8))
    np.bitwise_and(flat[0 : 2 * pairs : 2], 0x0F, out=packed[:pairs])
    high = np.left_shift(flat[1::2], 4)
    np.bitwise_or(packed[:pairs], high, out=packed[:pairs])
    del high
    if flat.size % 2:
        packed[-1] = flat[-1] & 0x0F
    return packed


@dataclass(frozen=True)
class LevelType:
    """An integer element type ``DequantizeLinear`` takes, and the least ONNX opset whose
    ``DequantizeLinear`` takes it. ``numpy``: the dtype the levels decode to (a 4-bit type's
    levels are then packed two a byte, :func:`pack_nibbles`)."""

    numpy: str
    onnx: int
    low: int
    high: int
    onnx_opset: int
    name: str
    bits: int

    @property
    def itemsize(self) -> int:
        return np.dtype(self.numpy).itemsize

    def stored_bytes(self, elements: int) -> int:
        """Bytes ``elements`` levels take in memory (4-bit ones two a byte)."""
        return -(-elements * self.bits // 8)


# Narrowest first; signed before unsigned, so that levels around zero keep zero point 0.
LEVEL_TYPES = (
    LevelType("i1", dtypes.INT8, -(1 << 7), (1 << 7) - 1, 10, "int8", 8),
    LevelType("u1", dtypes.UINT8, 0, (1 << 8) - 1, 10, "uint8", 8),
    LevelType("<i2", dtypes.INT16, -(1 << 15), (1 << 15) - 1, 21, "int16", 16),
    LevelType("<u2", dtypes.UINT16, 0, (1 << 16) - 1, 21, "uint16", 16),
)
FOUR_BIT_TYPES = (
    LevelType("i1", ONNX_INT4, -(1 << 3), (1 << 3) - 1, 21, "int4", 4),
    LevelType("u1", ONNX_UINT4, 0, (1 << 4) - 1, 21, "uint4", 4),
)


def level_type(low: int, high: int, four_bit: bool = False) -> tuple[LevelType, int] | None:
    """The narrowest type holding ``level + zero_point`` for every level in [low, high], with a
    zero point of that type (the one nearest 0); None when none does. ``four_bit``: int4 and
    uint4 come first (a weight :func:`four_bit_weights` names)."""
    for candidate in (FOUR_BIT_TYPES + LEVEL_TYPES) if four_bit else LEVEL_TYPES:
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
            entry = held.setdefault(planned.level.name, {"tensors": 0, "weights": 0})
            entry["tensors"] += 1
            entry["weights"] += self.weights[sites[ordinal].path]
        kept: dict[str, dict[str, int]] = {}
        for path, reason in self.kept.items():
            entry = kept.setdefault(reason, {"tensors": 0, "weights": 0})
            entry["tensors"] += 1
            entry["weights"] += self.weights[path]
        resident = sum(p.level.stored_bytes(self.weights[sites[o].path]) for o, p in self.planned.items())
        return {"held": held, "kept_float": kept, "held_weight_bytes": resident}


def _target_name(site: TensorSite) -> str | None:
    """The value name a main-graph initializer or Constant site gives the graph; None for a
    site inside a subgraph or function."""
    if is_main_graph_initializer(site.path):
        return site.tensor.name
    if site.kind == KIND_CONSTANT and is_main_graph_site(site.path) and site.node.output:
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
    ranks = {name: len(site.tensor.dims) for site in checked.members.values() if (name := _target_name(site)) is not None}
    four_bit = four_bit_weights(model.graph, ranks)
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
                chosen = level_type(low + member.offset, high + member.offset, name in four_bit)
                if chosen is None:
                    reason = "levels wider than 16 bits"
                elif mode == "fast" and name in four_bit and chosen[0].bits == 8:
                    reason = EIGHT_BIT_MATMUL_REASON
                else:
                    plan.planned[member.site] = CompactTensor(chosen[0], chosen[1], low + member.offset, high + member.offset)
                    continue
            plan.kept[site.path] = reason
    return plan


def _set_axis(node, axis: int | None) -> None:
    if axis is not None:
        node.attribute.add(name="axis", type=2, i=axis)  # AttributeProto.INT is 2


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
        self.new_nodes: list[tuple[list[str], str, str, int | None]] = []   # (inputs, output, domain, axis) of nodes for initializers
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

    def _vector(self, name: str, element_type: int, raw: bytes, length: int) -> None:
        self.graph.initializer.add(name=name, data_type=element_type, dims=[length], raw_data=raw)

    def add(self, site: TensorSite, planned: CompactTensor, scale: float) -> onnx.TensorProto:
        """Replace ``site`` (a planned tensor) and return the stub of its integer initializer."""
        target = _target_name(site)
        level = planned.level
        q_name = self._unique(f"{target}_quantized")
        scale_name = self._unique(f"{target}_scale")
        zero_name = self._unique(f"{target}_zero_point")
        dims = list(site.tensor.dims)
        stub = self.graph.initializer.add(name=q_name, data_type=level.onnx, dims=dims)
        if level.bits == 4:  # per column (see the module docstring): a scale onnxruntime does not share
            columns = dims[1]
            self._vector(scale_name, dtypes.FLOAT, np.full(columns, scale, dtype=np.float32).tobytes(), columns)
            zero = np.full(columns, planned.zero_point, dtype=np.dtype(level.numpy))
            self._vector(zero_name, level.onnx, pack_nibbles(zero).tobytes(), columns)
            axis = 1
        else:
            self._scalar(scale_name, dtypes.FLOAT, np.float32(scale))
            self._scalar(zero_name, level.onnx, planned.zero_point)
            axis = None
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
            _set_axis(node, axis)
        else:
            self.replaced.add(target)
            self.new_nodes.append((inputs, target, domain, axis))
        return stub

    def finish(self) -> None:
        graph = self.graph
        for i in reversed([i for i, t in enumerate(graph.initializer) if t.name in self.replaced]):
            del graph.initializer[i]
        if self.new_nodes:
            rest = type(graph)()
            rest.node.extend(graph.node)
            del graph.node[:]
            for inputs, output, domain, axis in self.new_nodes:
                node = graph.node.add(op_type="DequantizeLinear", domain=domain, input=inputs, output=[output],
                                      name=self._unique(f"{output}_dequantize"))
                _set_axis(node, axis)
            graph.node.extend(rest.node)
        if self.uses_onnxruntime_domain and not any(o.domain == ONNXRUNTIME_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.add(domain=ONNXRUNTIME_DOMAIN, version=1)


def compact_decoded(checked: CheckedFile, plan: CompactPlan, graph: CompactGraph
                    ) -> Iterator[tuple[TensorSite, int, np.ndarray, onnx.TensorProto | None]]:
    """Decode ``checked`` with the planned members as integers: (site, element type, array,
    None) for what decodes as usual; (site, element type of the integers, q, stub) for a
    planned member, whose site ``graph`` has just replaced by ``stub`` (to fill or hand over);
    4-bit levels come packed (:func:`pack_nibbles`), as the stub's raw data holds them."""
    ordinal_of = {id(site): ordinal for ordinal, site in checked.members.items()}
    scale_of = {member.site: member.scale for pack in checked.moub.index.packs for member in pack.members}
    for site, element_type, array, zero_point in checked.decoded_levels(plan.level_of):
        if zero_point is None:
            yield site, element_type, array, None
            continue
        ordinal = ordinal_of[id(site)]
        planned = plan.planned[ordinal]
        if planned.level.bits == 4:
            with checked.moub.allocating(site.path):
                array = pack_nibbles(array)
        yield site, planned.level.onnx, array, graph.add(site, planned, scale_of[ordinal])
