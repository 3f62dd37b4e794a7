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


@pytest.mark.parametrize("form", ["bytes", "bytearray", "memoryview", "BytesIO", "open file"])
def test_a_file_in_memory_or_a_file_object_loads_like_its_path(packed, form):
    import io

    _, path = packed
    data = path.read_bytes()
    make = {"bytes": lambda: data, "bytearray": lambda: bytearray(data), "memoryview": lambda: memoryview(data),
            "BytesIO": lambda: io.BytesIO(data), "open file": lambda: open(path, "rb")}[form]
    expected = moub_runtime.load(path).SerializeToString()
    source = make()
    assert moub_runtime.load(source).SerializeToString() == expected
    if hasattr(source, "close"):
        source.close()
    feeds = modelzoo.sample_feeds()
    session = moub_runtime.InferenceSession(make())
    assert session.moub_path is None
    reference = moub_runtime.InferenceSession(path)
    for a, b in zip(reference.run(None, feeds), session.run(None, feeds)):
        assert np.array_equal(a, b)


def test_a_file_object_is_read_from_its_position(packed):
    import io

    _, path = packed
    stream = io.BytesIO(b"junk" + path.read_bytes())
    stream.seek(4)
    assert moub_runtime.load(stream).SerializeToString() == moub_runtime.load(path).SerializeToString()


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, -1])
def test_a_truncated_file_object_is_refused_like_the_truncated_file(packed, tmp_path, keep):
    import io

    from moub_format import MoubFormatError

    _, path = packed
    data = path.read_bytes()
    cut = data[: int(len(data) * keep) if isinstance(keep, float) else keep]
    truncated = tmp_path / "truncated.moub"
    truncated.write_bytes(cut)
    with pytest.raises(MoubFormatError) as from_path:
        moub_runtime.InferenceSession(truncated)
    with pytest.raises(MoubFormatError) as from_object:
        moub_runtime.InferenceSession(io.BytesIO(cut))
    assert type(from_object.value) is type(from_path.value)
    assert str(from_object.value) == str(from_path.value).replace(str(truncated), "<file object>")


def test_a_file_object_past_the_size_limit_is_refused_before_it_is_read_whole(packed):
    import io

    from moub_format import LimitError, ReaderLimits

    _, path = packed
    data = path.read_bytes()

    class Counting(io.BytesIO):
        served = 0

        def read(self, n=-1):
            piece = super().read(n)
            Counting.served += len(piece)
            return piece

    with pytest.raises(LimitError, match="exceeds the limit 1000"):
        moub_runtime.load(Counting(data), ReaderLimits(max_file_bytes=1000))
    assert Counting.served == 1001


def test_something_else_is_a_type_error():
    with pytest.raises(TypeError, match="path, bytes or a binary file object"):
        moub_runtime.load(42)


def test_each_package_reports_the_distribution_version():
    from importlib.metadata import version

    import moub_converters
    import moub_format

    expected = version("moub")
    assert moub_runtime.__version__ == moub_format.__version__ == moub_converters.__version__ == expected
    from moub_format.writer import PRODUCER

    assert PRODUCER == f"moub {expected}"


@pytest.mark.slow
def test_make_dist_builds_a_wheel_whose_base_install_is_the_runtime(tmp_path):
    """``make dist`` (run here into a temporary folder): a wheel with the runtime and its
    ONNX descriptor, whose required dependencies are the runtime's alone, and no build/
    folder left in the checkout."""
    import re
    import shutil
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None or shutil.which("make") is None:
        pytest.skip("git and make are needed")
    had_build = (repo / "build").exists()
    run = subprocess.run(["make", "-s", "dist", f"PY={sys.executable}", "STAMP=", f"DIST={tmp_path}"], cwd=repo,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (wheel,) = tmp_path.glob("moub-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {"moub_runtime/loader.py", "moub_runtime/onnx_descriptor.py", "moub_format/reader.py"} <= names
    required = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    names_required = {re.split(r"[<>=!; ]", line.split(":", 1)[1].strip())[0] for line in required}
    assert names_required == {"numpy", "flatbuffers", "bitarray", "protobuf", "onnx", "onnxruntime"}
    assert (repo / "build").exists() == had_build
