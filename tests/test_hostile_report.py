"""The reproductions of the hostile-file report, each asserting what the reader does now.

The files come from ``hostile_cases`` (built byte by byte with ``test_hostile_kit``), at sizes
that keep the suite fast; ``scripts/hostile_repro.py`` runs the report's full-size files in
fresh processes and measures their peak memory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import hostile_cases as H
import moub_runtime
import test_hostile_kit as K
from moub_format import GraphError
from moub_runtime import inspect as moub_inspect
from moub_runtime.cli import main as cli_main
from moub_runtime.tensor_walk import first_external_reference, iter_reachable_tensors

ROOT = Path(__file__).resolve().parent.parent


def write(folder: Path, data: bytes, name: str = "hostile.moub") -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def one_line_exit_2(argv: list[str], capsys) -> str:
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moub: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- 1. external data anywhere in the graph


@pytest.mark.parametrize("place", H.EXTERNAL_PLACES)
def test_the_walk_reaches_the_external_reference(place):
    model = H.external_data_model(place)
    found = first_external_reference(model)
    assert found is not None and found.tensor.external_data[0].value in (H.SECRET_NAME, "/etc/passwd", "../../../../etc/passwd")


def test_the_walk_reaches_every_kind_of_tensor():
    sparse = H._sparse_secret("S")
    holder = onnx.helper.make_node("Holder", [], ["h"], domain="x", t=onnx.numpy_helper.from_array(np.zeros(1, np.float32), "t"),
                                   tensors=[onnx.numpy_helper.from_array(np.zeros(1, np.float32), "ts")], sparse_tensor=sparse,
                                   sparse_tensors=[sparse])
    body = onnx.helper.make_graph([holder], "body", [], [], [onnx.numpy_helper.from_array(np.zeros(1, np.float32), "sub_init")],
                                  sparse_initializer=[sparse])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Loop", [], [], body=body)], "g", [], [],
                                   [onnx.numpy_helper.from_array(np.zeros(1, np.float32), "main_init")])
    model = onnx.helper.make_model(graph)
    function = onnx.helper.make_function("x", "F", [], [], [holder], [])
    default = onnx.helper.make_attribute("d", onnx.numpy_helper.from_array(np.zeros(1, np.float32), "default"))
    function.attribute_proto.append(default)
    model.functions.append(function)
    model.training_info.add().initialization.CopyFrom(body)
    wheres = sorted(item.where for item in iter_reachable_tensors(model))
    # graph: 1 initializer; body (in the Loop, and as a training graph): 1 initializer, a sparse
    # initializer (values, indices), the holder's t, 1 of tensors, sparse_tensor, 1 of sparse_tensors
    per_body = 1 + 2 + 1 + 1 + 2 + 2
    assert len(wheres) == 1 + 2 * per_body + (1 + 1 + 2 + 2) + 1, wheres
    assert "init:main_init" in wheres and "node:0/body/init:sub_init" in wheres
    assert "node:0/body/sparse:S/values" in wheres and "func:0/attr:d" in wheres
    assert "training:0/initialization/node:0/sparse_tensors[0]/indices" in wheres


@pytest.mark.parametrize("place", H.EXTERNAL_PLACES)
def test_external_data_outside_initializers_is_refused_everywhere(tmp_path, place, capsys, monkeypatch):
    path = write(tmp_path, H.external_data_file(place))
    (tmp_path / H.SECRET_NAME).write_bytes(b"TOP-SECRET-BYTES")
    monkeypatch.chdir(tmp_path)
    for action in (moub_runtime.load, moub_runtime.InferenceSession):
        with pytest.raises(GraphError, match="refers to external data"):
            action(path)
    problems = moub_inspect.verify_file(path)
    assert len(problems) == 1 and "refers to external data" in problems[0]
    line = one_line_exit_2(["decode", str(path), "-o", str(tmp_path / "out.onnx")], capsys)
    assert "a .moub must be self-contained" in line and not (tmp_path / "out.onnx").exists()


def test_the_converter_refuses_external_data_outside_initializers(tmp_path):
    model = H.external_data_onnx(tmp_path / "leaky.onnx")
    (tmp_path / H.SECRET_NAME).write_bytes(b"TOP-SECRET-BYTES")
    result = subprocess.run([sys.executable, "-m", "moub_runtime.cli", "convert", str(model), "-o", str(tmp_path / "out.moub"),
                             "--data", str(ROOT / "converters" / "data" / "digits_val.npz"), "--quiet"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "tensor 'sparse:S/values' refers to external data ('secret.txt') that was not loaded" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "out.moub").exists()


def test_the_writer_refuses_a_graph_with_external_data_anywhere():
    from moub_converters.encode import encode_model

    model = H.external_data_model("constantofshape_value")
    with pytest.raises(ValueError, match="'node:2/value' refers to external data"):
        encode_model(model, [], {})

