"""The sensitivity runs measure output error where decisions are made and on each output's scale."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from moub_converters.sensitivity import log_odds, relative_distortion


def _run(op: str, logits: np.ndarray) -> np.ndarray:
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(logits.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(logits.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": logits})[0]


def test_probabilities_are_compared_as_the_logits_that_decide_them():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((64, 4)) * 4).astype(np.float32)
    centred = logits - logits.mean(axis=-1, keepdims=True)
    softmax, sigmoid = log_odds([_run("Softmax", logits), _run("Sigmoid", logits)], ["Softmax", "Sigmoid"])
    np.testing.assert_allclose(softmax, centred, atol=2e-3)  # float32 probabilities
    np.testing.assert_allclose(sigmoid, logits, atol=2e-2)
    # A confident prediction losing half its margin: invisible in probabilities, plain in logits.
    confident = np.array([[12.0, 0.0, 0.0, 0.0]], np.float32)
    weaker = np.array([[6.0, 0.0, 0.0, 0.0]], np.float32)
    p0, p1 = _run("Softmax", confident), _run("Softmax", weaker)
    in_probabilities = float(np.sum((p1 - p0) ** 2) / np.sum(p0 ** 2))
    l0, l1 = log_odds([p0], ["Softmax"])[0], log_odds([p1], ["Softmax"])[0]
    in_logits = float(np.sum((l1 - l0) ** 2) / np.sum(l0 ** 2))
    assert in_probabilities < 1e-4 < 0.1 < in_logits
    other = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert log_odds([other], ["Conv"])[0] is other


def test_every_output_and_channel_counts_on_its_own_scale():
    # A probability's 1% error beside a loud state's 1% error: the same weight, whatever the energy.
    assert np.isclose(relative_distortion([1e-4 * 1.0, 1e-4 * 400.0], [1.0, 400.0]), 1e-4)
    assert np.isclose(relative_distortion([0.0, 4.0], [1.0, 400.0]), 0.005)
    # Channels of one output each against their own energy; a silent channel against the floor.
    err = np.array([1e-2, 1e-8, 0.0])
    energy = np.array([1.0, 1e-6, 0.0])
    assert np.isclose(relative_distortion([err], [energy]), (1e-2 + 1e-2 + 0.0) / 3)
    assert relative_distortion([], []) == 0.0
