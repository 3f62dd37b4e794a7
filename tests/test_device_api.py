"""The device-side API: a session without the onnx package, files given as a path, bytes or a
binary file object, and the packages' versions."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

import modelzoo
import moub_runtime
from moub_converters.encode import encode_model
from moub_format.writer import write_atomic


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    model = modelzoo.everything_model()
    codebook, assignments = modelzoo.equal_width_assignments(model, k=48)
    path = tmp_path_factory.mktemp("device") / "everything.moub"
    write_atomic(path, encode_model(model, [codebook], assignments, {"source": "modelzoo"}))
    return model, path


def test_a_session_imports_no_onnx(packed):
    """``import moub_runtime`` and a ready session in a fresh interpreter leave ``onnx`` out
    of sys.modules: its import costs several times onnxruntime's on a device."""
    _, path = packed
    code = (
        "import sys, moub_runtime\n"
        f"session = moub_runtime.InferenceSession({str(path)!r})\n"
        "assert session.get_inputs()\n"
        "print([m for m in sys.modules if m == 'onnx' or m.startswith('onnx.')])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_embedded_descriptor_describes_the_installed_onnx():
    """Every message and field the runtime's own ONNX classes know has the same number,
    type and label in the installed onnx (regenerate: tools/generate_onnx_descriptor.py)."""
    from moub_runtime import onnx_proto

    def fields(descriptor):
        return {f.name: (f.number, f.type, f.label if hasattr(f, "label") else None) for f in descriptor.fields}

    for name in ("ModelProto", "GraphProto", "NodeProto", "TensorProto", "AttributeProto", "ValueInfoProto",
                 "SparseTensorProto", "FunctionProto", "TrainingInfoProto", "TypeProto", "StringStringEntryProto"):
        ours = onnx_proto._POOL.FindMessageTypeByName(f"onnx.{name}")
        theirs = getattr(onnx, name).DESCRIPTOR
        assert fields(ours).items() <= fields(theirs).items(), name


def test_the_light_classes_parse_and_serialize_like_onnx(packed):
    """The same bytes parse to the same message and serialize back to the same bytes."""
    from moub_runtime import onnx_proto

    model, _ = packed
    data = model.SerializeToString(deterministic=True)
    light = onnx_proto.ModelProto.FromString(data)
    assert light.SerializeToString(deterministic=True) == data
    assert len(light.graph.initializer) == len(model.graph.initializer)


def test_load_still_returns_onnx_modelproto(packed):
    _, path = packed
    assert isinstance(moub_runtime.load(path), onnx.ModelProto)


def test_session_outputs_unchanged(packed):
    _, path = packed
    import onnxruntime as ort

    feeds = modelzoo.sample_feeds()
    reference = ort.InferenceSession(moub_runtime.load(path).SerializeToString(), providers=["CPUExecutionProvider"])
    for a, b in zip(reference.run(None, feeds), moub_runtime.InferenceSession(path).run(None, feeds)):
        assert np.array_equal(a, b)
