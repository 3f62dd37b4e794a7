"""Error feedback (GPTQ): which layers it serves, the second moments it measures in onnxruntime,
and that its rounding keeps a layer's outputs closer than nearest rounding on the same grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from moub_converters import convert
from moub_converters.data import Dataset
from moub_converters import error_feedback
from moub_converters.error_feedback import ErrorFeedback, feedback_levels, find_layers, within_budget, work
from moub_converters.intake import pool_weights

DATA = Path(__file__).resolve().parent.parent / "converters" / "data"


def _model() -> onnx.ModelProto:
    """1x1 Conv -> 3x3 Conv -> grouped 1x1 Conv -> Transpose -> MatMul (rank-4 input) -> Flatten ->
    Gemm(transB) -> Gemm -> MatMul whose weight S is also read by an Identity."""
    rng = np.random.default_rng(0)
    inits = {
        "P": rng.normal(0, 0.4, (8, 6, 1, 1)), "K": rng.normal(0, 0.2, (8, 8, 3, 3)), "G": rng.normal(0, 0.4, (8, 4, 1, 1)),
        "M": rng.normal(0, 0.3, (8, 5)), "T": rng.normal(0, 0.3, (4, 5)), "U": rng.normal(0, 0.3, (4, 3)),
        "S": rng.normal(0, 0.3, (3, 3)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "P"], ["p"]),
        helper.make_node("Conv", ["p", "K"], ["k"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["k", "G"], ["g"], group=2),
        helper.make_node("Transpose", ["g"], ["gt"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["gt", "M"], ["m"]),
        helper.make_node("Flatten", ["m"], ["f"], axis=3),
        helper.make_node("Gemm", ["f", "T"], ["t"], transB=1),
        helper.make_node("Gemm", ["t", "U"], ["u"]),
        helper.make_node("MatMul", ["u", "S"], ["y"]),
        helper.make_node("Identity", ["S"], ["s_copy"]),
    ]
    graph = helper.make_graph(nodes, "fb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("s_copy", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _correlated(n: int, seed: int) -> np.ndarray:
    """Inputs whose 6 channels are mixtures of 2 sources: strongly correlated, as real activations are."""
    rng = np.random.default_rng(seed)
    sources = rng.normal(0.3, 1.0, (n, 2, 5, 5))
    mix = np.random.default_rng(99).normal(0, 1, (6, 2))
    x = np.einsum("cs,nshw->nchw", mix, sources) + 0.05 * rng.normal(0, 1, (n, 6, 5, 5))
    return x.astype(np.float32)


def test_layers_served():
    model = _model()
    pool = pool_weights(model, min_elements=1)
    served = sorted((pool.sites[layer.weight].name, layer.columns_last) for layer in find_layers(model, pool))
    # K: 3x3 kernel; G: two groups; S: also read by an Identity (a weight read twice keeps nearest rounding)
    assert served == [("M", True), ("P", False), ("T", False), ("U", True)]


def test_second_moments_are_those_of_the_layer_inputs():
    model, x = _model(), _correlated(24, 1)
    pool = pool_weights(model, min_elements=1)
    feedback = ErrorFeedback.measure(model, pool, Dataset({"x": x}, None, 24, 10))  # batches of 10, 10, 4
    by_name = {pool.sites[layer.weight].name: layer for layer in feedback.layers}
    assert set(by_name) == {"P", "M", "T", "U"}
    from moub_converters.error_feedback import second_moments

    moments = second_moments(model, pool, feedback.layers, Dataset({"x": x}, None, 24, 10))
    rows = x.transpose(0, 2, 3, 1).reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(moments["x"], rows.T @ rows / rows.shape[0], rtol=1e-4, atol=1e-5)
    # the MatMul reads a rank-4 tensor: rows are every position of every sample
    session = ort.InferenceSession(_with_output(model, "gt").SerializeToString(), providers=["CPUExecutionProvider"])
    gt = session.run(["gt"], {"x": x})[0].reshape(-1, 8).astype(np.float64)
    np.testing.assert_allclose(moments["gt"], gt.T @ gt / gt.shape[0], rtol=1e-4, atol=1e-5)


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.ValueInfoProto(name=name))
    return m


def _layer_error(model: onnx.ModelProto, weight: str, values: np.ndarray, output: str, x: np.ndarray) -> float:
    m = _with_output(model, output)
    for t in m.graph.initializer:
        if t.name == weight:
            t.CopyFrom(numpy_helper.from_array(values.astype(np.float32), weight))
    reference = ort.InferenceSession(_with_output(model, output).SerializeToString(),
                                     providers=["CPUExecutionProvider"]).run([output], {"x": x})[0]
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run([output], {"x": x})[0]
    return float(np.mean((got.astype(np.float64) - reference) ** 2))


@pytest.mark.parametrize("weight,output", [("P", "p"), ("M", "m")])
def test_feedback_keeps_layer_outputs_closer_than_nearest_rounding_on_unseen_inputs(weight, output):
    model = _model()
    pool = pool_weights(model, min_elements=1)
    feedback = ErrorFeedback.measure(model, pool, Dataset({"x": _correlated(64, 1)}, None, 64, 64))
    number = next(i for i, s in enumerate(pool.sites) if s.name == weight)
    site = pool.sites[number]
    values = pool.values[site.start : site.stop].astype(np.float64)
    steps = np.full(len(pool.sites), np.float32(0.15))
    nearest = np.rint(values / 0.15).astype(np.int64)
    levels = feedback.levels(pool, steps, [np.rint(pool.values[s.start : s.stop] / 0.15).astype(np.int64) for s in pool.sites])
    fed = levels[number]
    assert fed.shape == nearest.shape and not np.array_equal(fed, nearest)
    assert np.abs(fed - nearest).max() <= 3  # same grid, levels moved by a few steps at most
    unseen = _correlated(64, 2)
    plain = _layer_error(model, weight, (nearest * np.float32(0.15)).reshape(site.dims), output, unseen)
    better = _layer_error(model, weight, (fed * np.float32(0.15)).reshape(site.dims), output, unseen)
    assert better < 0.7 * plain, (better, plain)


def test_weights_reading_a_dead_input_channel_are_set_to_level_zero():
    """Input channel 2 of x is zero on every sample: P's weights on it are free (the layer's output
    on such data is the same bits whatever they hold), so they take level 0, the cheapest."""
    model = _model()
    pool = pool_weights(model, min_elements=1)
    x = _correlated(64, 1)
    x[:, 2] = 0.0
    feedback = ErrorFeedback.measure(model, pool, Dataset({"x": x}, None, 64, 64))
    np.testing.assert_array_equal(feedback.dead["x"], [False, False, True, False, False, False])
    assert not feedback.dead["gt"].any()
    assert feedback.zeroed_weights == 8 == feedback.summary()["zeroed_weights"]  # P: 8 outputs x 1 dead input
    number = next(i for i, s in enumerate(pool.sites) if s.name == "P")
    site = pool.sites[number]
    steps = np.full(len(pool.sites), np.float32(0.15))
    nearest = [np.rint(pool.values[s.start : s.stop] / 0.15).astype(np.int64) for s in pool.sites]
    fed = feedback.levels(pool, steps, nearest)[number].reshape(site.dims)
    assert not fed[:, 2].any() and nearest[number].reshape(site.dims)[:, 2].any()
    assert fed[:, [0, 1, 3, 4, 5]].any()
    # the same bits out of the layer as with the dead column rounded like the others, on fresh data
    unseen = _correlated(16, 2)
    unseen[:, 2] = 0.0
    kept = fed.copy()
    kept[:, 2] = nearest[number].reshape(site.dims)[:, 2]
    outputs = []
    for levels in (fed, kept):
        m = _with_output(model, "p")
        for t in m.graph.initializer:
            if t.name == "P":
                t.CopyFrom(numpy_helper.from_array((levels * np.float32(0.15)).astype(np.float32), "P"))
        outputs.append(ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["p"], {"x": unseen})[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 200), st.floats(0.01, 1.0), st.integers(0, 2**31 - 1))
def test_uncorrelated_inputs_give_nearest_rounding(outputs, inputs, step, seed):
    """With H diagonal (independent inputs) nothing is fed forward: the levels are nearest rounding."""
    w = np.random.default_rng(seed).normal(0, 1, (outputs, inputs))
    factor = np.diag(np.random.default_rng(seed + 1).uniform(0.5, 2.0, inputs))
    np.testing.assert_array_equal(feedback_levels(w, step, factor), np.rint(w / step).astype(np.int64))


def test_conversion_reports_it_and_can_be_turned_off():
    on = convert(DATA / "digits_cnn.onnx", data=DATA / "digits_val.npz", mode="adaptive", max_drop=0.01, seed=0)
    off = convert(DATA / "digits_cnn.onnx", data=DATA / "digits_val.npz", mode="adaptive", max_drop=0.01, seed=0,
                  error_feedback=False)
    facts = on.report["search"]["error_feedback"]
    assert facts["layers"] == 2  # the two Gemms; the 3x3 convs are not served
    assert facts["zeroed_weights"] > 0  # the first Gemm reads flattened ReLU maps: some positions never fire
    assert off.report["search"]["error_feedback"] == {"layers": 0, "zeroed_weights": 0}
    assert on.report["settings"]["error_feedback"] is True and off.report["settings"]["error_feedback"] is False
    assert on.moub_bytes != off.moub_bytes


def test_a_probe_onnxruntime_rejects_leaves_nearest_rounding_and_says_why(monkeypatch):
    from moub_converters import error_feedback

    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : probe rejected")

    monkeypatch.setattr(error_feedback.ErrorFeedback, "measure", classmethod(lambda cls, *a: refuse()))
    result = convert(DATA / "digits_cnn.onnx", data=DATA / "digits_val.npz", mode="adaptive", max_drop=0.01, seed=0)
    facts = result.report["search"]["error_feedback"]
    assert facts["layers"] == 0 and "probe rejected" in facts["skipped"]
    assert result.report["search"]["bias_correction"]["layers"] == 3


def test_a_level_past_the_limit_stops_the_rounding():
    """The caller keeps nearest rounding for such a layer; int32 levels never wrap unnoticed."""
    w = np.array([[0.5, 3.0e6], [1.0, 2.0]])
    factor = np.eye(2)
    assert feedback_levels(w, 0.1, factor, limit=2**24) is None
    assert feedback_levels(w, 1.0, factor, limit=2**24).dtype == np.int32


def test_layers_beyond_the_work_budget_keep_nearest_rounding(monkeypatch):
    """The cheapest layers are served first; the report counts the others. On the demo CNN the
    first Gemm (512 inputs, 91% of the weights) costs 3.4e7 multiply-adds a candidate, the
    second 1.1e6: a budget between them serves only the second."""
    source = onnx.load(DATA / "digits_cnn.onnx")
    pool = pool_weights(source, 16)
    layers = find_layers(source, pool)
    costs = sorted(work(layer, pool) for layer in layers)
    assert within_budget(layers, pool, budget=sum(costs)) == layers
    assert [work(layer, pool) for layer in within_budget(layers, pool, budget=costs[0])] == [costs[0]]
    assert within_budget(layers, pool, budget=costs[0] - 1) == []

    monkeypatch.setattr(error_feedback, "MAX_WORK", costs[0])
    result = convert(DATA / "digits_cnn.onnx", data=DATA / "digits_val.npz", mode="adaptive", max_drop=0.01, seed=0)
    facts = result.report["search"]["error_feedback"]
    assert facts["layers"] == 1 and facts["over_budget"] == 1
