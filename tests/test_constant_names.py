"""Constant tensor names left out of the graph (format 1.3, FEATURE_CONSTANT_NAMES):
the written graph is smaller, and every reader path restores the original graph exactly."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import moub_runtime
from moub_converters.encode import encode_model
from moub_format import GraphError, MoubFile, VersionError, writer
from moub_format import constants as C
from moub_runtime.constant_names import elide_constant_names
from moub_runtime.sites import KIND_CONSTANT, iter_tensor_sites

import test_hostile_kit as K
from test_hostile import expect, write

RNG = np.random.default_rng(3)


def _constant(output: str, shape: tuple[int, ...], name: str | None = None) -> onnx.NodeProto:
    value = numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), output if name is None else name)
    return helper.make_node("Constant", [], [output], value=value)


def paddle_like_model() -> onnx.ModelProto:
    """Weights as Constant nodes whose tensors carry their output's name (as Paddle2ONNX
    writes them), in the main graph, inside an If branch and inside a model function."""
    then_graph = helper.make_graph(
        [_constant("then_w", (4,)), helper.make_node("Add", ["h", "then_w"], ["then_out"])],
        "then", [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [1, 4])])
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["else_out"])],
        "else", [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [1, 4])])
    function = helper.make_function(
        "moub.test", "Scale", ["a"], ["b"],
        [_constant("fn_w", (4,)), helper.make_node("Mul", ["a", "fn_w"], ["b"])],
        opset_imports=[helper.make_opsetid("", 17)])
    nodes = [
        _constant("conv_w", (4, 4)),
        _constant("conv_b", (4,)),
        _constant("shape_c", (2,), name="a_shape_named_otherwise"),
        helper.make_node("MatMul", ["x", "conv_w"], ["m"]),
        helper.make_node("Add", ["m", "conv_b"], ["a0"]),
        helper.make_node("Scale", ["a0"], ["h"], domain="moub.test"),
        helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(
        nodes, "paddle_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("moub.test", 1)],
                              functions=[function])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _encode(model: onnx.ModelProto, elide: bool) -> bytes:
    return encode_model(model, [], {}, graph_codec=C.CODEC_NONE, elide_constant_names=elide)


def _constant_names(model: onnx.ModelProto) -> list[str]:
    return [site.tensor.name for site in iter_tensor_sites(model) if site.kind == KIND_CONSTANT]


def test_names_are_left_out_and_restored_exactly(tmp_path):
    model = paddle_like_model()
    elided, plain = tmp_path / "elided.moub", tmp_path / "plain.moub"
    elided.write_bytes(_encode(model, True))
    plain.write_bytes(_encode(model, False))
    with MoubFile(elided) as moub, MoubFile(plain) as reference:
        assert moub.index.required_features & C.FEATURE_CONSTANT_NAMES
        assert not reference.index.required_features & C.FEATURE_CONSTANT_NAMES
        stored = onnx.ModelProto.FromString(moub.graph_bytes())
        # the four named like their output lose the name; the one named otherwise keeps it
        assert sorted(_constant_names(stored)) == ["", "", "", "", "a_shape_named_otherwise"]
        saved = reference.index.graph.length - moub.index.graph.length
    assert saved == sum(2 + len(name) for name in ("conv_w", "conv_b", "then_w", "fn_w"))
    loaded = moub_runtime.load(elided)
    assert loaded.SerializeToString() == moub_runtime.load(plain).SerializeToString()
    assert loaded.SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)
    assert {p: a.tobytes() for p, a in moub_runtime.decode_tensors(elided)} == \
        {p: a.tobytes() for p, a in moub_runtime.decode_tensors(plain)}
    x = {"x": np.ones((1, 4), np.float32)}
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    assert np.array_equal(moub_runtime.InferenceSession(elided).run(None, x)[0], expected[0])


def test_nothing_is_left_out_when_a_constant_is_unnamed_already(tmp_path):
    """A reader could not tell a cleared name from one that was empty: then every name stays."""
    model = paddle_like_model()
    model.graph.node[2].attribute[0].t.ClearField("name")
    assert not elide_constant_names(copy.deepcopy(model))
    path = write(tmp_path, _encode(model, True))
    with MoubFile(path) as moub:
        assert not moub.index.required_features & C.FEATURE_CONSTANT_NAMES
    assert moub_runtime.load(path).SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)


def test_a_graph_with_nothing_to_leave_out_sets_no_bit():
    model = paddle_like_model()
    for site in iter_tensor_sites(model):
        if site.kind == KIND_CONSTANT:
            site.tensor.name = site.tensor.name + "_t"
    assert not elide_constant_names(model)


def test_a_reader_without_the_feature_refuses_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "KNOWN_REQUIRED_FEATURES", C.KNOWN_REQUIRED_FEATURES & ~C.FEATURE_CONSTANT_NAMES)
    expect(tmp_path, _encode(paddle_like_model(), True), VersionError, "requires features 0x10")


def test_an_unnamed_constant_without_an_output_is_a_graph_error(tmp_path):
    model = K.tiny_model()
    value = numpy_helper.from_array(np.zeros(2, np.float32), "")
    model.graph.node.append(helper.make_node("Constant", [], [], value=value))
    spec = K.valid_spec()
    spec.graph = K.stripped_graph(model)
    spec.required_features = C.FEATURE_CONSTANT_NAMES
    expect(tmp_path, spec, GraphError, "graph: Constant 'node:2/value' has no output to take its tensor's name from")
    spec.required_features = 0  # without the bit the name stays empty: a graph like any other
    assert moub_runtime.load(write(tmp_path, spec)).graph.node[2].attribute[0].t.name == ""


def test_the_writer_takes_only_graph_feature_bits():
    with pytest.raises(ValueError, match="only FEATURE_CONSTANT_NAMES"):
        writer.build(b"", [], [], graph_features=C.FEATURE_PACKS)
