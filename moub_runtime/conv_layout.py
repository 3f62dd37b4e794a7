"""Whether the onnxruntime in this process runs Convs in its NCHWc layout, which decides what
``compact=True`` keeps float (:mod:`.compact`).

onnxruntime's NCHWc transformer (the blocked channel layout of its fastest x86 Conv kernels)
rewrites a Conv only when its weight is a constant initializer, reordering the filter once; a
weight that comes from a ``DequantizeLinear`` leaves the Conv on the plain kernel, which for a
grouped Conv is one small matrix product per group. Where onnxruntime has no NCHWc kernels (the
arm64 wheels of 1.32, x86 CPUs without AVX2), the normal session runs the plain kernel too, so
holding a grouped Conv's weight as integers costs only its dequantization.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import onnxruntime

from . import onnx_proto
from .compact import compact_mode

NCHWC_DOMAIN = "com.microsoft.nchwc"
CHANNELS = 16   # the transformer's multiple of channels


@functools.lru_cache(maxsize=1)
def convs_run_in_nchwc() -> bool:
    """Whether this onnxruntime rewrites a 16-channel Conv with a constant weight into its NCHWc
    kernels (its optimized graph has a node of the NCHWc domain). Probed once per process."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3   # the optimized model of the all level is not portable: it warns so
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        onnxruntime.InferenceSession(_probe_model().SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx_proto.ModelProto()
        optimized.ParseFromString(Path(options.optimized_model_filepath).read_bytes())
    return any(node.domain == NCHWC_DOMAIN for node in optimized.graph.node)


def _probe_model():
    """y = Conv(x, w): x [1, 16, 8, 8], w [16, 16, 1, 1] a constant initializer."""
    model = onnx_proto.ModelProto(ir_version=8, opset_import=[onnx_proto.OperatorSetIdProto(domain="", version=13)])
    graph = model.graph
    graph.name = "probe"
    graph.node.add(op_type="Conv", input=["x", "w"], output=["y"])
    weight = graph.initializer.add(name="w", data_type=onnx_proto.TensorProto.FLOAT, dims=[CHANNELS, CHANNELS, 1, 1])
    weight.raw_data = bytes(4 * CHANNELS * CHANNELS)
    for values, name in ((graph.input, "x"), (graph.output, "y")):
        tensor_type = values.add(name=name).type.tensor_type
        tensor_type.elem_type = onnx_proto.TensorProto.FLOAT
        for dim in (1, CHANNELS, 8, 8):
            tensor_type.shape.dim.add(dim_value=dim)
    return model


def compact_mode_here(compact: bool | str) -> str | None:
    """:func:`.compact.compact_mode`, with True resolved for this onnxruntime: ``"fast"`` where it
    runs Convs in NCHWc, else ``"smallest"``."""
    return compact_mode(compact, convs_run_in_nchwc)
