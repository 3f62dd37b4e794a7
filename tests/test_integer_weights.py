"""Already-quantized models: their integer weights are coded losslessly (format 1.4).

Models quantized by onnxruntime (int8 QDQ behind DequantizeLinear, dynamic MatMulInteger) and a
ConvInteger model built with onnx.helper are converted; the file must restore every integer
tensor bit for bit in its own element type, leave every quantization parameter (scales, zero
points) exactly as it was, run in onnxruntime to outputs identical to the original's where no
float weight was searched, and be smaller than ``zstd -19`` of the .onnx.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

import moub_runtime
import user_models
from moub_converters import convert
from moub_converters.integers import integer_coding
from moub_format import dtypes, writer
from moub_format.reader import MoubFile
from moub_runtime.inspect import summarize
from moub_runtime.sites import iter_tensor_sites

FAST = dict(population=4, generations=3, merge_budget=0)
QUANT_PARAMETER_INPUTS = {"DequantizeLinear": (1, 2), "QuantizeLinear": (1, 2), "MatMulInteger": (2, 3),
                          "ConvInteger": (2, 3)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quantized-models")


@pytest.fixture(scope="module")
def quantized(folder):
    return user_models.quantized_models(folder)


def _site_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {site.path: numpy_helper.to_array(site.tensor) for site in iter_tensor_sites(model)}


def _quant_parameters(model: onnx.ModelProto) -> set[str]:
    return {name for node in model.graph.node for i, name in enumerate(node.input)
            if i in QUANT_PARAMETER_INPUTS.get(node.op_type, ()) and name}


def _outputs(model: onnx.ModelProto | Path, feeds: dict) -> list[np.ndarray]:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


def _check_lossless_integers(original_path: Path, moub_path: Path) -> onnx.ModelProto:
    """Every integer tensor and every quantization parameter of the original comes back bit for bit."""
    original = onnx.load(original_path)
    restored = moub_runtime.load(moub_path)
    before, after = _site_arrays(original), _site_arrays(restored)
    integers = [p for p, a in before.items() if a.dtype.kind in "iu"]
    assert integers
    for path in integers:
        assert after[path].dtype == before[path].dtype and after[path].tobytes() == before[path].tobytes(), path
    names = _quant_parameters(original)
    assert names
    by_name = {site.tensor.name: site.path for site in iter_tensor_sites(original)}
    for name in names & set(by_name):
        assert after[by_name[name]].tobytes() == before[by_name[name]].tobytes(), f"quantization parameter {name} changed"
    return restored


def _assert_streams_beat_zstd(original_path: Path, moub_path: Path) -> None:
    """The integer tensors' streams together are smaller than zstd -19 of the same bytes.
    (Whole files are compared on real models, in the decision record: on a model of a few
    hundred KB the container's fixed ~3 KB of index, metadata and graph outweighs the margin.)"""
    arrays = _site_arrays(onnx.load(original_path))
    with MoubFile(moub_path) as moub:
        coded = [t for t in moub.index.tensors if t.dtype in dtypes.INTEGER_RANGES]
        stored = sum(t.data.length + 8 * len(t.chunk_bits) for t in coded)
        raw = b"".join(arrays[t.path].tobytes() for t in coded)
    assert coded and stored < len(zstandard.ZstdCompressor(level=19).compress(raw))


def _stored_integer_elements(moub_path: Path) -> int:
    """Elements of integer tensors the file stores as tensors of their own (Huffman, or raw where
    zlib / xz of their bytes is smaller): none is left for the graph to carry."""
    with MoubFile(moub_path) as moub:
        return sum(t.n_elements for t in moub.index.tensors if t.dtype in dtypes.INTEGER_RANGES)


def test_an_int8_qdq_model_is_converted_with_its_integers_lossless(quantized, tmp_path):
    qdq, _ = quantized
    result = convert(qdq.path, data=qdq.search, **FAST)
    out = tmp_path / "qdq.moub"
    result.write(out)
    restored = _check_lossless_integers(qdq.path, out)
    assert _stored_integer_elements(out) >= 64 * 256 + 256 * 256
    coding = result.report["coding"]["kinds"]
    assert coding["lossless integer"]["elements"] >= 64 * 256
    _assert_streams_beat_zstd(qdq.path, out)
    # every float left is a quantization parameter or a small bias: searched floats, if any,
    # are judged by the metric on held-out samples like any model's
    test = {"pixels": qdq.test["pixels"][:200]}
    original, written = _outputs(qdq.path, test), _outputs(restored, test)
    if "searched float" not in coding:
        assert all(np.array_equal(a, b) for a, b in zip(original, written))
    assert np.mean(original[0].argmax(1) == written[0].argmax(1)) >= 0.99


def test_a_dynamically_quantized_model_keeps_its_matmulinteger_weights(quantized, tmp_path):
    _, dynamic = quantized
    model = onnx.load(dynamic.path)
    assert any(node.op_type == "MatMulInteger" for node in model.graph.node)
    result = convert(dynamic.path, data=dynamic.search, **FAST)
    out = tmp_path / "dynamic.moub"
    result.write(out)
    _check_lossless_integers(dynamic.path, out)
    assert _stored_integer_elements(out) >= 64 * 256 + 256 * 256
    _assert_streams_beat_zstd(dynamic.path, out)
    # the report's weight line describes the float weights only, never the integers
    assert result.report["pool"]["pooled_weights"] < 64 * 256


def _conv_integer_model(path: Path) -> None:
    """uint8 activations x int8 weights through ConvInteger and MatMulInteger, scaled back to float:
    every weight is an integer, so no float is searched and the outputs must be identical."""
    rng = np.random.default_rng(5)
    conv_w = np.clip(np.round(rng.laplace(0, 12, (32, 8, 3, 3))), -127, 127).astype(np.int8)
    fc_w = np.clip(np.round(rng.laplace(0, 12, (32 * 6 * 6, 128))), -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(fc_w, "fc_w"),
             numpy_helper.from_array(np.array(0, np.uint8), "x_zp"), numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.001, np.float32), "out_scale"),
             numpy_helper.from_array(np.array([-1, 32 * 6 * 6], np.int64), "flat")]
    nodes = [
        helper.make_node("ConvInteger", ["x", "conv_w", "x_zp", "w_zp"], ["c"]),
        helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["cf", "out_scale"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("DynamicQuantizeLinear", ["r"], ["rq", "rs", "rz"]),
        helper.make_node("Reshape", ["rq", "flat"], ["rf"]),
        helper.make_node("MatMulInteger", ["rf", "fc_w", "rz"], ["m"]),
        helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["mf", "rs"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "conv-integer", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["n", 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 128])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


def test_a_conv_integer_model_with_no_float_weights_converts_bit_identically(tmp_path):
    path = tmp_path / "conv_integer.onnx"
    _conv_integer_model(path)
    rng = np.random.default_rng(6)
    search = {"x": rng.integers(0, 256, (32, 8, 8, 8), dtype=np.uint8)}
    held_out = {"x": rng.integers(0, 256, (32, 8, 8, 8), dtype=np.uint8)}
    result = convert(path, data=search, metric="rel-l2", max_drop=0.01, **FAST)  # it used to say "no float weights"
    out = tmp_path / "conv_integer.moub"
    result.write(out)
    restored = _check_lossless_integers(path, out)
    assert result.report["loss"] == 0
    assert set(result.report["coding"]["kinds"]) == {"lossless integer"}
    original, written = _outputs(path, held_out), _outputs(restored, held_out)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(original, written))
    _assert_streams_beat_zstd(path, out)


def test_without_data_an_integer_only_model_is_written_losslessly(tmp_path):
    path = tmp_path / "conv_integer.onnx"
    _conv_integer_model(path)
    result = convert(path)
    out = tmp_path / "conv_integer.moub"
    result.write(out)
    _check_lossless_integers(path, out)
    summary = summarize(out)
    assert summary.integer_weights == 32 * 8 * 3 * 3 + 32 * 6 * 6 * 128 and summary.quantized_weights == 0
    assert result.report["choice"] is None and "integers" in result.report


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(sorted(dtypes.INTEGER_RANGES)), data=st.data())
def test_the_integer_codec_round_trips_any_integer_tensor(tmp_path_factory, dtype, data):
    low, high = dtypes.INTEGER_RANGES[dtype]
    storage = dtypes.STORAGE_DTYPES[dtype]
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40))
    span = data.draw(st.integers(0, high - low))
    base = data.draw(st.integers(low, high - span))
    values = data.draw(hnp.arrays(storage, shape, elements=st.integers(base, base + span)))
    tensor = numpy_helper.from_array(values, "w")
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", dtype, list(shape))], [tensor])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    coded = integer_coding(model, min_elements=1)
    codebooks, assignments = coded.extend([], {})
    specs = [writer.HuffmanTensor(t.path, "w", dtype, tuple(shape), t.indices, i) for i, t in enumerate(coded.tensors)]
    if not specs:  # smaller than the raw minimum, or zlib wins: the codec itself is still exact
        from moub_converters.integers import code_integer_tensor
        t = code_integer_tensor("init:w", tensor)
        codebooks, specs = [t.codebook], [writer.HuffmanTensor("init:w", "w", dtype, tuple(shape), t.indices, 0)]
    path = tmp_path_factory.mktemp("codec") / "t.moub"
    path.write_bytes(writer.build(b"graph", codebooks, specs, {}))
    with MoubFile(path) as moub:
        (info, decoded), = list(moub.iter_tensors())
    assert decoded.dtype == storage and decoded.shape == values.shape and decoded.tobytes() == values.tobytes()


def test_scales_of_onnxruntime_contrib_kernels_are_never_pooled():
    """MatMulIntegerToFloat (com.microsoft) takes its per-channel weight scale as input 3: a float
    vector of a weight's size, which the converter must leave exactly as it is."""
    from moub_converters.intake import pool_weights

    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (256, 2048), dtype=np.int8), "w"),
             numpy_helper.from_array(np.array(0.02, np.float32), "a_scale"),
             numpy_helper.from_array((rng.random(2048) * 0.01).astype(np.float32), "w_scale"),
             numpy_helper.from_array(rng.normal(size=2048).astype(np.float32), "bias")]
    node = helper.make_node("MatMulIntegerToFloat", ["x", "w", "a_scale", "w_scale", "", "", "bias"], ["y"],
                            domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2048])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    pool = pool_weights(model, 16)
    assert [site.name for site in pool.sites] == ["bias"]
    assert pool.passthrough["init:w_scale"] == "not a weight (MatMulIntegerToFloat input 3)"


def test_an_already_quantized_model_whose_floats_cannot_move_gets_the_lossless_file(quantized, tmp_path):
    """No lossy candidate meets a tolerance its float weights cannot keep: the converter writes
    the lossless file (integers coded, floats exact) and says so, instead of exiting without one."""
    _, dynamic = quantized
    result = convert(dynamic.path, data=dynamic.search, metric="l2", max_drop=1e-6, **FAST)
    assert result.report["lossless"]["reason"].startswith(("no candidate", "the smallest candidates", "it is no larger"))
    assert "lossless" in result.closing_table()
    out = tmp_path / "lossless.moub"
    result.write(out)
    restored = _check_lossless_integers(dynamic.path, out)
    test = {"pixels": dynamic.test["pixels"][:100]}
    assert all(a.tobytes() == b.tobytes() for a, b in zip(_outputs(dynamic.path, test), _outputs(restored, test)))


def test_scales_of_weight_only_quantization_are_never_pooled():
    """An int8 weight turned into floats by Cast, Sub (zero point) and Mul (per-row scale), as
    weight-only int8 exports do: the zero point and the scale are quantization parameters."""
    from moub_converters.intake import pool_weights

    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (2048, 64), dtype=np.int8), "w_q"),
             numpy_helper.from_array(rng.integers(-3, 4, (2048, 1)).astype(np.float32), "w_zp"),
             numpy_helper.from_array((rng.random((2048, 1)) * 0.01).astype(np.float32), "w_scale"),
             numpy_helper.from_array(rng.normal(size=(64, 2048)).astype(np.float32), "proj")]
    nodes = [helper.make_node("Cast", ["w_q"], ["w_f"], to=TensorProto.FLOAT), helper.make_node("Sub", ["w_f", "w_zp"], ["w_c"]),
             helper.make_node("Mul", ["w_c", "w_scale"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("MatMul", ["h", "proj"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2048])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2048])], inits)
    pool = pool_weights(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), 16)
    assert [site.name for site in pool.sites] == ["proj"]
    assert pool.passthrough["init:w_scale"] == "not a weight (Mul input 1, dequantizing an integer weight)"
    assert pool.passthrough["init:w_zp"] == "not a weight (Sub input 1, dequantizing an integer weight)"
