"""Hostile integer Huffman tensors (format 1.4): codebooks that are not the tensor's integers.

An integer tensor restores its codebook's float32 values by a cast; a value that is not an
integer, or lies outside the element type, would be rounded or wrapped into some other
integer than the one stored. Each file here is the valid tiny int8 file with one thing
broken, and must be refused with the exact error naming the file, before any decoding.
"""

from __future__ import annotations

import copy
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import moub_runtime
import test_hostile_kit as K
from moub_format import CodebookError, MoubFormatError, StructureError, VersionError
from moub_format import constants as C
from moub_runtime.payload import clear_payload

LEVELS = np.array([-2, -1, 0, 1, 2], dtype=np.float32)  # the codebook: int8 levels as float32


def int8_model() -> onnx.ModelProto:
    """x[1,8] -> DequantizeLinear(Wq int8 [8,8], scale) -> MatMul -> y."""
    rng = np.random.default_rng(3)
    weight = LEVELS[rng.integers(0, LEVELS.size, (K.N_IN, K.N_OUT))].astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["Wq", "scale"], ["W"]), helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny-int8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K.N_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, K.N_OUT])],
        [numpy_helper.from_array(weight, "Wq"), numpy_helper.from_array(np.array(0.125, np.float32), "scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    return model


def valid_int8_spec(dtype: int = TensorProto.INT8) -> K.Spec:
    model = int8_model()
    weight = numpy_helper.to_array(model.graph.initializer[0])
    stripped = copy.deepcopy(model)
    clear_payload(stripped.graph.initializer[0])
    stripped.graph.initializer[0].data_type = dtype
    data = stripped.SerializeToString(deterministic=True)
    indices = np.searchsorted(LEVELS, weight.ravel().astype(np.float32)).astype(np.int64)
    return K.Spec(
        graph=K.Blob(zlib.compress(data, 9), C.CODEC_ZLIB, decoded_length=len(data)),
        codebooks=[LEVELS.copy()],
        tables=[K._lengths()],
        tensors=[K.huffman_tensor(indices, K._lengths(), path="init:Wq", name="Wq", dtype=dtype)],
        metadata=[("moub.purpose", "hostile integer tests")],
        required_features=C.FEATURE_INTEGER_TENSORS,
    )


def expect(tmp_path: Path, spec: K.Spec, error: type[MoubFormatError], *words: str) -> str:
    path = tmp_path / "hostile.moub"
    path.write_bytes(K.build(spec))
    with pytest.raises(MoubFormatError) as caught:
        moub_runtime.load(path)
    message = str(caught.value)
    assert type(caught.value) is error, f"{type(caught.value).__name__}: {message}"
    assert str(path) in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def test_the_valid_int8_file_decodes_to_its_integers(tmp_path):
    path = tmp_path / "valid.moub"
    path.write_bytes(K.build(valid_int8_spec()))
    restored = numpy_helper.to_array(moub_runtime.load(path).graph.initializer[0])
    expected = numpy_helper.to_array(int8_model().graph.initializer[0])
    assert restored.dtype == np.int8 and restored.tobytes() == expected.tobytes()


@pytest.mark.parametrize("value", [0.5, -1.25, 1e-3])
def test_a_fractional_codebook_value_is_refused(tmp_path, value):
    spec = valid_int8_spec()
    spec.codebooks[0][4] = value
    expect(tmp_path, spec, CodebookError, "codebook 0", "not an integer", "int8")


@pytest.mark.parametrize("value", [128.0, -129.0, 1e9])
def test_a_codebook_value_outside_int8_is_refused(tmp_path, value):
    spec = valid_int8_spec()
    spec.codebooks[0][0 if value < 0 else 4] = value
    expect(tmp_path, spec, CodebookError, "codebook 0", "int8 range -128..127")


def test_a_negative_value_in_a_uint8_codebook_is_refused(tmp_path):
    expect(tmp_path, valid_int8_spec(TensorProto.UINT8), CodebookError, "value -2", "uint8 range 0..255")


@pytest.mark.parametrize("first", [-129, 124])
def test_a_grid_beyond_int8_is_refused(tmp_path, first):
    spec = valid_int8_spec()
    spec.codebooks = [K.Grid(first, LEVELS.size)]
    spec.required_features |= C.FEATURE_PACKS
    expect(tmp_path, spec, CodebookError, "grid codebook 0", "int8 range")


def test_an_integer_huffman_tensor_without_its_feature_bit_is_refused(tmp_path):
    spec = valid_int8_spec()
    spec.required_features = 0
    expect(tmp_path, spec, StructureError, "integer Huffman tensors", "lacks 0x20")


def test_the_feature_bit_in_a_file_older_than_1_4_is_refused(tmp_path):
    spec = valid_int8_spec()
    spec.format_minor = 3
    expect(tmp_path, spec, VersionError, "format 1.3", "1.4")


def test_a_wider_integer_type_stays_refused(tmp_path):
    spec = valid_int8_spec(TensorProto.INT32)
    expect(tmp_path, spec, StructureError, "dtype 6", "int8, uint8, int16, uint16")
