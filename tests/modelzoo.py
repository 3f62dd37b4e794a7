"""Small ONNX models built with onnx.helper that put weights everywhere a real
model can: If/Loop subgraphs, Constant nodes, a model-local function, fp16,
bf16 and fp64 initializers, a shared initializer, metadata and doc strings."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moub_format import dtypes
from moub_runtime.sites import iter_tensor_sites

N = 32  # feature width


def _init(rng: np.random.Generator, name: str, dtype=np.float32, shape=(N, N), scale=0.2) -> TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(dtype), name)


def _bf16_init(rng: np.random.Generator, name: str) -> TensorProto:
    values = (rng.standard_normal((N, N)) * 0.2).astype(np.float32)
    bits = dtypes.float32_to_bfloat16_bits(values)
    tensor = helper.make_tensor(name, TensorProto.BFLOAT16, [N, N], bits.tobytes(), raw=True)
    return tensor


def everything_model(seed: int = 0) -> onnx.ModelProto:
    """y = f(x) touching every kind of weight site; runs on onnxruntime's CPU provider."""
    rng = np.random.default_rng(seed)
    f32 = TensorProto.FLOAT
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["h2", "W_then"], ["then_out"])],
        "then_branch", [], [helper.make_tensor_value_info("then_out", f32, [1, N])],
        [_init(rng, "W_then")],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Relu", ["h2"], ["else_out"])],
        "else_branch", [], [helper.make_tensor_value_info("else_out", f32, [1, N])],
    )
    loop_body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["v_in", "W_loop"], ["v_mm"]),
            helper.make_node("Tanh", ["v_mm"], ["v_out"]),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", f32, [1, N]),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v_out", f32, [1, N])],
        [_init(rng, "W_loop")],
    )
    function = helper.make_function(
        "moub.test", "ScaledAdd", ["a"], ["b"],
        [
            helper.make_node("Constant", [], ["fn_weight"], value=_init(rng, "fn_weight")),
            helper.make_node("MatMul", ["a", "fn_weight"], ["b"]),
        ],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    nodes = [
        helper.make_node("Constant", [], ["C"], value=_init(rng, "const_weight")),
        helper.make_node("MatMul", ["x", "W_shared"], ["a1"], doc_string="first use of W_shared"),
        helper.make_node("MatMul", ["a1", "W_shared"], ["a2"], doc_string="second use of W_shared"),
        helper.make_node("MatMul", ["a2", "C"], ["a3"]),
        helper.make_node("Cast", ["W_half"], ["W_half_f"], to=f32),
        helper.make_node("MatMul", ["a3", "W_half_f"], ["a4"]),
        helper.make_node("Cast", ["W_bf16"], ["W_bf16_f"], to=f32),
        helper.make_node("MatMul", ["a4", "W_bf16_f"], ["a5"]),
        helper.make_node("Cast", ["W_double"], ["W_double_f"], to=f32),
        helper.make_node("MatMul", ["a5", "W_double_f"], ["h"]),
        helper.make_node("Add", ["h", "small_bias"], ["h1"]),
        helper.make_node("ScaledAdd", ["h1"], ["h2"], domain="moub.test"),
        helper.make_node("If", ["flag"], ["branch"], then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Loop", ["trips", "", "branch"], ["y"], body=loop_body),
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
    ]
    graph = helper.make_graph(
        nodes,
        "everything",
        [
            helper.make_tensor_value_info("x", f32, [1, N]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
        ],
        [helper.make_tensor_value_info("y", f32, [1, N]), helper.make_tensor_value_info("emb", TensorProto.INT32, [3, 64])],
        [
            _init(rng, "W_shared"),
            _init(rng, "W_half", np.float16),
            _bf16_init(rng, "W_bf16"),
            _init(rng, "W_double", np.float64),
            _init(rng, "small_bias", shape=(1, N)),  # below min_elements: stays in the graph
            numpy_helper.from_array(np.array(2, dtype=np.int64), "trips"),
            numpy_helper.from_array(rng.integers(-100, 100, (64, 64)).astype(np.int32), "table"),  # raw pass-through
        ],
        doc_string="a graph with weights in every place",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("moub.test", 1)],
        functions=[function],
        producer_name="moub-tests",
        doc_string="model doc string",
    )
    helper.set_model_props(model, {"author": "moub tests", "purpose": "round trip"})
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def sample_feeds(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((1, N)).astype(np.float32),
        "flag": np.array(True),
        "ids": np.array([0, 5, 63], dtype=np.int64),
    }


def float_sites(model: onnx.ModelProto, min_elements: int = 256):
    """Sites a fixed-bins quantizer would pool."""
    return [
        s for s in iter_tensor_sites(model)
        if s.tensor.data_type in dtypes.FLOAT_DTYPES and int(np.prod(s.tensor.dims)) >= min_elements
    ]


def tensor_as_float32(tensor: TensorProto) -> np.ndarray:
    array = numpy_helper.to_array(tensor)
    if tensor.data_type == TensorProto.BFLOAT16:
        bits = np.frombuffer(tensor.raw_data, dtype="<u2") if tensor.raw_data else np.asarray(tensor.int32_data, np.uint16)
        return dtypes.bfloat16_bits_to_float32(bits).reshape(tuple(tensor.dims))
    return np.asarray(array, dtype=np.float32)


def equal_width_assignments(model: onnx.ModelProto, k: int, min_elements: int = 256):
    """A plain, independent equal-width binning for tests: (codebook, {path: TensorAssignment})."""
    from moub_converters.encode import TensorAssignment

    sites = float_sites(model, min_elements)
    pooled = np.concatenate([tensor_as_float32(s.tensor).ravel() for s in sites])
    lo, hi = float(pooled.min()), float(pooled.max())

    def bins(values: np.ndarray) -> np.ndarray:
        return np.clip(((values.astype(np.float64) - lo) / (hi - lo) * k).astype(np.int64), 0, k - 1)

    pooled_bins = bins(pooled)
    used = np.unique(pooled_bins)
    remap = np.full(k, -1, dtype=np.int64)
    remap[used] = np.arange(used.size)
    sums = np.bincount(pooled_bins, weights=pooled, minlength=k)[used]
    counts = np.bincount(pooled_bins, minlength=k)[used]
    codebook = (sums / counts).astype(np.float32)
    assignments = {
        s.path: TensorAssignment(0, remap[bins(tensor_as_float32(s.tensor).ravel())]) for s in sites
    }
    return codebook, assignments
