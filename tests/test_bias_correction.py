"""Bias correction: the rules found in a graph, the input means, and that a corrected bias
really cancels a layer's mean output shift when onnxruntime runs the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moub_converters import convert
from moub_converters.bias_correction import CONV, GEMM_T, MATMUL, BiasCorrector, find_rules
from moub_converters.data import Dataset
from moub_converters.intake import pool_weights

DATA = Path(__file__).resolve().parent.parent / "converters" / "data"


def _model(opset: int = 13) -> onnx.ModelProto:
    """Grouped Conv with a bias input -> Relu -> 1x1 Conv + Add(1,C,1,1) -> Flatten -> Gemm(transB,
    alpha, beta) -> MatMul + Add(bias first); every layer's output is a graph output."""
    rng = np.random.default_rng(0)
    inits = {
        "W1": rng.normal(0, 0.3, (6, 2, 3, 3)), "B1": rng.normal(0, 0.1, (6,)),
        "W2": rng.normal(0, 0.3, (4, 6, 1, 1)), "B2": rng.normal(0, 0.1, (1, 4, 1, 1)),
        "W3": rng.normal(0, 0.2, (5, 64)), "C3": rng.normal(0, 0.1, (5,)),
        "W4": rng.normal(0, 0.3, (5, 3)), "B4": rng.normal(0, 0.1, (3,)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["y1"], group=2),
        helper.make_node("Relu", ["y1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["c2"]),
        helper.make_node("Add", ["c2", "B2"], ["y2"]),
        helper.make_node("Flatten", ["y2"], ["f"]),
        helper.make_node("Gemm", ["f", "W3", "C3"], ["y3"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("MatMul", ["y3", "W4"], ["m4"]),
        helper.make_node("Add", ["B4", "m4"], ["y4"]),
    ]
    graph = helper.make_graph(
        nodes, "bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 6, 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2", "y3", "y4")],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _dataset(n: int = 40) -> Dataset:
    x = np.random.default_rng(1).normal(0.7, 1.0, (n, 4, 6, 6)).astype(np.float32)  # inputs far from zero mean
    return Dataset({"x": x}, None, n, 16)


def _run(model: onnx.ModelProto, replace: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name in replace:
            t.CopyFrom(numpy_helper.from_array(replace[t.name].astype(np.float32), t.name))
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(("y1", "y2", "y3", "y4"), session.run(None, {"x": x})))


def _channel_means(y: np.ndarray) -> np.ndarray:
    return y.mean(axis=(0, 2, 3)) if y.ndim == 4 else y.mean(axis=0)


@pytest.mark.parametrize("opset", [13, 18])  # ReduceMean's axes: an attribute, then an input
def test_corrected_bias_cancels_the_mean_output_shift(opset):
    model, data = _model(opset), _dataset()
    pool = pool_weights(model, min_elements=1)
    corrector = BiasCorrector.measure(model, pool, data)
    by_weight = {pool.sites[r.weight].name: r for r in corrector.rules}
    assert sorted((n, r.kind, pool.sites[r.bias].name) for n, r in by_weight.items()) == [
        ("W1", CONV, "B1"), ("W2", CONV, "B2"), ("W3", GEMM_T, "C3"), ("W4", MATMUL, "B4")]
    assert by_weight["W1"].groups == 2 and by_weight["W3"].scale == pytest.approx(0.25)
    np.testing.assert_allclose(corrector.means["x"], data.inputs["x"].mean(axis=(0, 2, 3)), rtol=1e-5)

    x = data.inputs["x"]
    reference = _run(model, {}, x)
    rng = np.random.default_rng(2)
    for name, output in (("W1", "y1"), ("W2", "y2"), ("W3", "y3"), ("W4", "y4")):
        rule = by_weight[name]
        site, bias = pool.sites[rule.weight], pool.sites[rule.bias]
        original = pool.values[site.start : site.stop]
        noisy = (original + rng.normal(0.02, 0.05, original.size)).astype(np.float32)  # a biased weight error
        fixed = corrector.corrected_bias(pool, rule, noisy).reshape(bias.dims)
        plain = _run(model, {name: noisy.reshape(site.dims)}, x)[output]
        corrected = _run(model, {name: noisy.reshape(site.dims), bias.name: fixed}, x)[output]
        shift = np.abs(_channel_means(plain) - _channel_means(reference[output])).max()
        left = np.abs(_channel_means(corrected) - _channel_means(reference[output])).max()
        # exact where every output sees every input position alike; a 3x3 kernel without padding
        # sees border pixels less often than the per-channel input mean assumes
        allowed = 0.1 * shift if name == "W1" else 1e-4 * max(1.0, shift)
        assert shift > 0.02 and left < allowed, (name, shift, left)


def test_layers_whose_bias_is_not_theirs_alone_are_left_alone():
    model = _model()
    graph = model.graph
    # y2's Conv output also feeds an extra output: its Add is no longer the bias of that Conv alone
    graph.output.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, None))
    # MatMul's bias B4 also feeds a second Add: shared, so not corrected
    graph.node.append(helper.make_node("Add", ["B4", "y4"], ["y5"]))
    graph.output.append(helper.make_tensor_value_info("y5", TensorProto.FLOAT, None))
    pool = pool_weights(model, min_elements=1)
    assert sorted(pool.sites[r.weight].name for r in find_rules(model, pool)) == ["W1", "W3"]


def test_small_biases_left_out_of_the_pool_are_not_corrected():
    model = _model()
    pool = pool_weights(model, min_elements=8)  # B1 (6), B2 (4), C3 (5), B4 (3) stay lossless
    assert find_rules(model, pool) == []
    assert BiasCorrector.measure(model, pool, _dataset()).summary() == {"layers": 0, "by_kind": {}}


def test_adaptive_conversion_corrects_the_digits_model_and_can_be_turned_off():
    on = convert(DATA / "digits_cnn.onnx", data=DATA / "digits_val.npz", mode="adaptive", max_drop=0.01, seed=0)
    off = convert(DATA / "digits_cnn.onnx", data=DATA / "digits_val.npz", mode="adaptive", max_drop=0.01, seed=0,
                  bias_correction=False)
    assert on.report["search"]["bias_correction"] == {"layers": 3, "by_kind": {"conv": 2, "gemm-t": 1}}
    assert off.report["search"]["bias_correction"] == {"layers": 0, "by_kind": {}}
    assert on.report["settings"]["bias_correction"] is True and off.report["settings"]["bias_correction"] is False
    assert on.moub_bytes != off.moub_bytes


def test_batchnorm_mean_takes_the_shift_of_the_conv_before_it():
    rng = np.random.default_rng(3)
    inits = {"W": rng.normal(0, 0.3, (3, 4, 1, 1)), "scale": rng.uniform(0.5, 2, 3), "B": rng.normal(0, 0.1, 3),
             "mean": rng.normal(0, 0.1, 3), "var": rng.uniform(0.5, 2, 3)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"]),
         helper.make_node("BatchNormalization", ["c", "scale", "B", "mean", "var"], ["y"])],
        "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    pool, data = pool_weights(model, min_elements=1), _dataset()
    corrector = BiasCorrector.measure(model, pool, data)
    (rule,) = corrector.rules
    assert (pool.sites[rule.weight].name, pool.sites[rule.bias].name, rule.sign) == ("W", "mean", 1.0)
    site = pool.sites[rule.weight]
    noisy = (pool.values[site.start : site.stop] + 0.05).astype(np.float32)

    def run(replace):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for t in m.graph.initializer:
            if t.name in replace:
                t.CopyFrom(numpy_helper.from_array(replace[t.name].astype(np.float32), t.name))
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": data.inputs["x"]})[0]

    reference = _channel_means(run({}))
    shifted = _channel_means(run({"W": noisy.reshape(site.dims)}))
    fixed = _channel_means(run({"W": noisy.reshape(site.dims), "mean": corrector.corrected_bias(pool, rule, noisy)}))
    assert np.abs(shifted - reference).max() > 0.05 and np.abs(fixed - reference).max() < 1e-4


def test_cli_turns_bias_correction_off(tmp_path):
    import json
    import subprocess
    import sys

    out, report = tmp_path / "d.moub", tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "moub_runtime.cli", "convert", str(DATA / "digits_cnn.onnx"), "-o", str(out),
                           "--data", str(DATA / "digits_val.npz"), "--max-drop", "0.01", "--no-bias-correction",
                           "--report", str(report), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(report.read_text())
    assert facts["settings"]["bias_correction"] is False and facts["search"]["bias_correction"]["layers"] == 0
    assert out.stat().st_size == facts["file"]["bytes"]
