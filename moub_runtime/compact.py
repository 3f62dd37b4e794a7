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
counts them. 8-bit levels use the ONNX ``DequantizeLinear`` (opset 10 and later; 13 with a
per-row scale), 16-bit ones onnxruntime's own (domain ``com.microsoft``) unless the model's opset
is 21 or later: raising a model's opset would change what its other nodes mean.

A weight that one ``MatMul`` or ``Gemm`` reads as its second input, and nothing else (:func:`four_bit_weights`),
of rank 2, whose levels span at most 16 values, is held in 4 bits: its reader becomes onnxruntime's
``MatMulNBits`` (domain ``com.microsoft``), which keeps the weight packed and computes in float32
(accuracy level 1): B holds each column's levels in blocks of :data:`MATMUL_NBITS_BLOCK` along K,
two a byte, unsigned with one zero point, every block the tensor's one scale; a Gemm's C is added
after it, and a Gemm with ``transB`` = 1 (torch's 2-D ``Linear``) already stores the columns
MatMulNBits wants. The graph says so itself rather than leaving it to onnxruntime's fusion of a
4-bit ``DequantizeLinear``: that fusion runs after the one of a Gemm with a following activation,
so a Linear + ReLU on a 2-D input stayed a Gemm dequantizing its weight at every run.
The same weight with 8-bit levels is given a per-row scale: onnxruntime would otherwise fuse it
into its 8-bit MatMulNBits, which is slower than float32 and larger once it runs (measured on four
chained 1024 x 1024 weights, one thread, one row: 7.0 ms, against 1.6 ms for the per-row
DequantizeLinear and a float MatMul, 0.73 ms in float32 and 0.40 ms for the 4-bit MatMulNBits).

Two modes (:data:`COMPACT_MODES`). ``"fast"`` keeps float the 8- and 16-bit weights of a MatMul or
Gemm (above; one onnxruntime does not fuse, a ``transB`` Gemm's or a 16-bit one, is dequantized at
every run, and a Linear layer uses each weight once per row, so that doubles its time), and every weight a grouped ``Conv``
reads: onnxruntime gives a Conv its fast kernels (the NCHWc layout on x86, with the filter
reordered once) only when the weight is a constant initializer, and without them a grouped
(depthwise) Conv runs one small matrix product per group: measured 27-82 ns per weight per
inference on PP-OCR cls and rec, against at most 4 for any other weight, each saving the same 3
bytes. ``"smallest"`` holds every weight that qualifies, whatever its consumer costs.
``compact=True`` is ``"fast"`` where the onnxruntime at hand has NCHWc kernels, else
``"smallest"`` (:mod:`.conv_layout`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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
DROPPED = "moub.dropped"  # marks a Constant node whose value a MatMulNBits now holds, until finish() removes it
# ONNX's 4-bit element types (TensorProto.INT4, UINT4): not container types (moub_format.dtypes).
ONNX_INT4 = 22
ONNX_UINT4 = 21
# The rank of a weight onnxruntime fuses with its MatMul or Gemm into MatMulNBits.
FOUR_BIT_RANK = 2
# MatMulNBits for 4-bit weights: levels in blocks of this many along K, one scale per block (every
# block of a tensor the same scale: a per-tensor step), stored unsigned with this zero point by default.
MATMUL_NBITS_BLOCK = 128
ZERO_POINT_4 = 8
PER_AXIS_OPSET = 13  # the first ONNX DequantizeLinear with an axis (onnxruntime's own has one at any opset)
MATMUL_NBITS_FLOAT32 = 1  # accuracy_level: compute in float32, as the normal session does

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
    into a ``MatMulNBits``, or the compact graph can write one: the second input of a MatMul, or
    of a Gemm that does not transpose A nor scale. A Gemm with ``transB`` = 1 (how torch exports
    a 2-D ``Linear``) becomes a MatMulNBits only when the compact graph writes it (4 bits):
    onnxruntime keeps it a Gemm that dequantizes at every run."""
    if node.domain not in ("", "ai.onnx") or position != 1:
        return False
    if node.op_type == "MatMul":
        return True
    if node.op_type != "Gemm":
        return False
    plain = _attribute(node, "transA", 0) == 0 and _attribute(node, "alpha", 1.0) == 1.0
    return plain and (len(node.input) < 3 or not node.input[2] or _attribute(node, "beta", 1.0) == 1.0)


def transposed_gemm_weights(graph) -> dict[str, object]:
    """Weight name -> the main-graph ``Gemm`` that reads it as B with ``transB`` = 1."""
    return {node.input[1]: node for node in graph.node
            if node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and len(node.input) > 1
            and _attribute(node, "transB", 0) == 1}


def matmul_weights(graph, shapes: dict[str, Sequence[int]]) -> dict[str, int]:
    """The names of ``shapes`` (value name -> the weight's dims) of rank :data:`FOUR_BIT_RANK`
    that one main-graph MatMul or Gemm reads as B (:func:`_fuses_into_matmul_nbits`) and nothing
    else reads (onnxruntime fuses a DequantizeLinear of one reader only; nor is it a graph
    output), each with its K (rows; columns when read with transB)."""
    readers: dict[str, object] = {}
    other: set[str] = {value.name for value in graph.output}
    for node in graph.node:
        for position, name in enumerate(node.input):
            if _fuses_into_matmul_nbits(node, position) and name not in readers:
                readers[name] = node
            else:
                other.add(name)
    return {name: int(dims[1] if _attribute(readers[name], "transB", 0) == 1 else dims[0])
            for name, dims in shapes.items() if len(dims) == FOUR_BIT_RANK and name in readers and name not in other}


def four_bit_weights(graph, shapes: dict[str, Sequence[int]]) -> set[str]:
    """The :func:`matmul_weights` with enough rows for a MatMulNBits (:func:`matmul_nbits_fits`):
    the weights a compact session holds in 4 bits when their levels span at most 16 values, and
    ``--ram int4`` limits so."""
    return {name for name, rows in matmul_weights(graph, shapes).items() if matmul_nbits_fits(rows)}


def matmul_nbits_fits(k: int) -> bool:
    """Whether a weight with ``k`` rows can be a MatMulNBits' B: its last block's padding at most
    doubles the levels (a hostile ``[1, N]`` weight would otherwise take 64 bytes a weight)."""
    return k > 0 and -(-k // MATMUL_NBITS_BLOCK) * MATMUL_NBITS_BLOCK <= 2 * k


def matmul_nbits_weight(levels: np.ndarray, planned: CompactTensor) -> np.ndarray:
    """4-bit unsigned levels (uint8 in [0, 15], the weight's shape) as ``MatMulNBits`` stores B:
    ``[N, blocks, MATMUL_NBITS_BLOCK / 2]`` bytes, each column's K levels in blocks, two a byte (the
    first in the low nibble), the last block padded with the zero point (a weight of 0). 64-byte
    aligned; a block at a time, so nothing but B and one block's padding is allocated."""
    k, n = planned.k, planned.n
    columns = levels.reshape(n, k) if planned.transposed else levels.reshape(k, n).T
    blocks = -(-k // MATMUL_NBITS_BLOCK)
    packed = aligned_empty((n, blocks, MATMUL_NBITS_BLOCK // 2), np.dtype(np.uint8))
    for number in range(blocks):
        block = columns[:, number * MATMUL_NBITS_BLOCK : (number + 1) * MATMUL_NBITS_BLOCK]
        if block.shape[1] < MATMUL_NBITS_BLOCK:
            padding = np.full((n, MATMUL_NBITS_BLOCK - block.shape[1]), planned.zero_point, dtype=np.uint8)
            block = np.concatenate([block, padding], axis=1)
        out = packed[:, number, :]
        np.left_shift(block[:, 1::2], 4, out=out)
        np.bitwise_or(out, block[:, 0::2], out=out)
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
    """A planned tensor: its levels' type and zero point. ``axis``: how its ``DequantizeLinear``
    gives the scale and zero point, None one scalar each, 0 one per row (8-bit levels of a weight
    onnxruntime would fuse into its 8-bit MatMulNBits, which it does not do for a per-row scale).
    4-bit levels become a ``MatMulNBits`` instead (:func:`matmul_nbits_weight`): ``k``, ``n`` its
    sizes, ``transposed`` when the weight is stored ``[N, K]`` (a Gemm's B with ``transB`` = 1)."""

    level: LevelType
    zero_point: int
    low: int    # least and greatest level the code table allows
    high: int
    axis: int | None = None
    k: int = 0
    n: int = 0
    transposed: bool = False

    def stored_bytes(self, elements: int) -> int:
        """Bytes the integers and their per-block or per-row scales and zero points take in memory."""
        if self.level.bits == 4:
            blocks = -(-self.k // MATMUL_NBITS_BLOCK)
            zero_points = self.n * -(-blocks // 2) if self.zero_point != ZERO_POINT_4 else 0
            return self.n * blocks * (MATMUL_NBITS_BLOCK // 2 + 4) + zero_points
        rows = self.k if self.axis == 0 else 0
        return self.level.stored_bytes(elements) + rows * (4 + self.level.itemsize)


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
        resident = sum(p.stored_bytes(self.weights[sites[o].path]) for o, p in self.planned.items())
        return {"held": held, "kept_float": kept, "held_weight_bytes": resident}


def target_name(site: TensorSite) -> str | None:
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
    shapes = {name: list(site.tensor.dims) for site in checked.members.values() if (name := target_name(site)) is not None}
    matmul = matmul_weights(model.graph, shapes)
    four_bit = {name for name, rows in matmul.items() if matmul_nbits_fits(rows)}
    transposed = transposed_gemm_weights(model.graph)
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
            name = target_name(site)
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
                flipped = name in transposed
                k, n = 0, 0
                if name in matmul:  # rank 2: [K, N], or [N, K] read with transB
                    k, n = (int(d) for d in (reversed(site.tensor.dims) if flipped else site.tensor.dims))
                chosen = level_type(low + member.offset, high + member.offset, name in four_bit)
                if chosen is None:
                    reason = "levels wider than 16 bits"
                elif mode == "fast" and name in matmul and chosen[0].bits > 4:
                    reason = EIGHT_BIT_MATMUL_REASON
                else:
                    kind, zero_point = chosen
                    if kind.bits == 4:  # MatMulNBits stores unsigned levels: zero point 8 for int4's
                        zero_point += ZERO_POINT_4 if kind.numpy == "i1" else 0
                        kind = FOUR_BIT_TYPES[1]
                    axis = 0 if kind.bits == 8 and name in matmul and not flipped else None
                    plan.planned[member.site] = CompactTensor(kind, zero_point, low + member.offset, high + member.offset,
                                                              axis, k, n, flipped)
                    continue
            plan.kept[site.path] = reason
    return plan


def _set_axis(node, axis: int | None) -> None:
    if axis is not None:
        node.attribute.add(name="axis", type=2, i=axis)  # AttributeProto.INT is 2


def _set_attribute(node, name: str, value: int) -> None:
    """Set an INT attribute of ``node`` in place."""
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.i = value
            return
    node.attribute.add(name=name, type=2, i=value)


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
        self.readers = {node.input[1]: node for node in self.graph.node
                        if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and len(node.input) > 1}
        self.biases: dict[str, tuple[str, str]] = {}   # a MatMulNBits' output -> (the Gemm's C, the Gemm's output)

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
        target = target_name(site)
        level = planned.level
        q_name = self._unique(f"{target}_quantized")
        scale_name = self._unique(f"{target}_scale")
        zero_name = self._unique(f"{target}_zero_point")
        if level.bits == 4:
            return self._matmul_nbits(site, target, planned, scale, (q_name, scale_name, zero_name))
        dims = list(site.tensor.dims)
        stub = self.graph.initializer.add(name=q_name, data_type=level.onnx, dims=dims)
        axis = planned.axis
        if axis is None:
            self._scalar(scale_name, dtypes.FLOAT, np.float32(scale))
            self._scalar(zero_name, level.onnx, planned.zero_point)
        else:  # one value per row (see CompactTensor)
            length = dims[axis]
            self._vector(scale_name, dtypes.FLOAT, np.full(length, scale, dtype=np.float32).tobytes(), length)
            zero = np.full(length, planned.zero_point, dtype=np.dtype(level.numpy))
            self._vector(zero_name, level.onnx, zero.tobytes(), length)
        least_opset = max(level.onnx_opset, PER_AXIS_OPSET if axis is not None else 0)
        domain = "" if self.default_opset >= least_opset else ONNXRUNTIME_DOMAIN
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

    def _matmul_nbits(self, site: TensorSite, target: str, planned: CompactTensor, scale: float,
                      names: tuple[str, str, str]) -> onnx.TensorProto:
        """The MatMul or Gemm reading ``site`` becomes a ``MatMulNBits`` over its 4-bit levels (a
        Gemm's C an ``Add`` after it); the weight's initializer or Constant goes."""
        q_name, scale_name, zero_name = names
        k, n = planned.k, planned.n
        blocks = -(-k // MATMUL_NBITS_BLOCK)
        stub = self.graph.initializer.add(name=q_name, data_type=dtypes.UINT8, dims=[n, blocks, MATMUL_NBITS_BLOCK // 2])
        self._vector(scale_name, dtypes.FLOAT, np.full(n * blocks, scale, dtype=np.float32).tobytes(), n * blocks)
        reader = self.readers[target]
        inputs = [reader.input[0], q_name, scale_name]
        if planned.zero_point != ZERO_POINT_4:
            length = n * -(-blocks // 2)
            self._vector(zero_name, dtypes.UINT8, bytes([planned.zero_point * 17]) * length, length)
            inputs.append(zero_name)
        bias = reader.input[2] if reader.op_type == "Gemm" and len(reader.input) > 2 else ""
        output = reader.output[0]
        if bias:
            matmul_output = self._unique(f"{output}_matmul")
            self.biases[matmul_output] = (bias, output)
            output = matmul_output
        name = reader.name
        reader.Clear()
        reader.name, reader.op_type, reader.domain = name, "MatMulNBits", ONNXRUNTIME_DOMAIN
        reader.input.extend(inputs)
        reader.output.append(output)
        for attribute, value in (("K", k), ("N", n), ("bits", 4), ("block_size", MATMUL_NBITS_BLOCK),
                                 ("accuracy_level", MATMUL_NBITS_FLOAT32)):
            _set_attribute(reader, attribute, value)
        self.uses_onnxruntime_domain = True
        if site.kind == KIND_CONSTANT:
            site.node.Clear()
            site.node.domain = DROPPED
        else:
            self.replaced.add(target)
        return stub

    def finish(self) -> None:
        graph = self.graph
        for i in reversed([i for i, t in enumerate(graph.initializer) if t.name in self.replaced]):
            del graph.initializer[i]
        if self.new_nodes or self.biases or any(node.domain == DROPPED for node in graph.node):
            rest = type(graph)()
            rest.node.extend(graph.node)
            del graph.node[:]
            for inputs, output, domain, axis in self.new_nodes:
                node = graph.node.add(op_type="DequantizeLinear", domain=domain, input=inputs, output=[output],
                                      name=self._unique(f"{output}_dequantize"))
                _set_axis(node, axis)
            for node in rest.node:
                if node.domain == DROPPED:
                    continue
                graph.node.append(node)
                if node.op_type == "MatMulNBits" and node.output[0] in self.biases:
                    bias, output = self.biases[node.output[0]]
                    graph.node.add(op_type="Add", input=[node.output[0], bias], output=[output],
                                   name=self._unique(f"{output}_bias"))
        if self.uses_onnxruntime_domain and not any(o.domain == ONNXRUNTIME_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.add(domain=ONNXRUNTIME_DOMAIN, version=1)


def compact_decoded(checked: CheckedFile, plan: CompactPlan, graph: CompactGraph
                    ) -> Iterator[tuple[TensorSite, int, np.ndarray, onnx.TensorProto | None]]:
    """Decode ``checked`` with the planned members as integers: (site, element type, array,
    None) for what decodes as usual; (site, element type of the integers, q, stub) for a
    planned member, whose site ``graph`` has just replaced by ``stub`` (to fill or hand over);
    4-bit levels come as MatMulNBits' B (:func:`matmul_nbits_weight`), uint8."""
    ordinal_of = {id(site): ordinal for ordinal, site in checked.members.items()}
    scale_of = {member.site: member.scale for pack in checked.moub.index.packs for member in pack.members}
    for site, element_type, array, zero_point in checked.decoded_levels(plan.level_of):
        if zero_point is None:
            yield site, element_type, array, None
            continue
        ordinal = ordinal_of[id(site)]
        planned = plan.planned[ordinal]
        element_type = planned.level.onnx
        if planned.level.bits == 4:
            with checked.moub.allocating(site.path):
                array = matmul_nbits_weight(array, planned)
            element_type = dtypes.UINT8
        yield site, element_type, array, graph.add(site, planned, scale_of[ordinal])
