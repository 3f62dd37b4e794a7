"""``moub convert`` in a subprocess: every bad input gives one line on stderr, exit 2 and no
output file; the fixed-bins encoder and TorchScript input work end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import moub_runtime

DATA = Path(__file__).resolve().parent.parent / "converters" / "data"
MODEL, VAL = DATA / "digits_cnn.onnx", DATA / "digits_val.npz"
FAST = ["--population", "4", "--generations", "1", "--merge-budget", "0", "--quiet"]


def moub(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moub_runtime.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


def assert_bad_input(proc: subprocess.CompletedProcess, out: Path, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".") and "tmp" in p.name]


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def val():
    with np.load(VAL) as z:
        return z["input"], z["labels"]


def test_not_an_onnx_file(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    out = tmp_path / "out.moub"
    assert_bad_input(moub("convert", text, "-o", out, "--data", VAL, *FAST), out, "not an ONNX model")


def test_corrupt_protobuf(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    out = tmp_path / "out.moub"
    assert_bad_input(moub("convert", broken, "-o", out, "--data", VAL, *FAST), out, "broken.onnx")


def test_missing_model(tmp_path):
    out = tmp_path / "out.moub"
    assert_bad_input(moub("convert", tmp_path / "nope.onnx", "-o", out, "--data", VAL, *FAST), out, "no such file")


def test_data_that_is_not_an_npz(tmp_path):
    junk, out = tmp_path / "data.npz", tmp_path / "out.moub"
    junk.write_text("not arrays\n")
    assert_bad_input(moub("convert", MODEL, "-o", out, "--data", junk, *FAST), out, "not an .npz file")


def test_data_missing_an_input(tmp_path, val):
    data = _npz(tmp_path / "d.npz", pixels=val[0])
    out = tmp_path / "out.moub"
    assert_bad_input(moub("convert", MODEL, "-o", out, "--data", data, *FAST), out, "'pixels'")


def test_data_with_wrong_dtype(tmp_path, val):
    data = _npz(tmp_path / "d.npz", input=(val[0] * 16).astype(np.int64), labels=val[1])
    out = tmp_path / "out.moub"
    assert_bad_input(moub("convert", MODEL, "-o", out, "--data", data, *FAST), out, "int64", "float32")


def test_data_with_wrong_shape(tmp_path, val):
    data = _npz(tmp_path / "d.npz", input=val[0][:, :, :, :7].copy(), labels=val[1])
    out = tmp_path / "out.moub"
    assert_bad_input(moub("convert", MODEL, "-o", out, "--data", data, *FAST), out, "shape")


def test_labels_of_wrong_length(tmp_path, val):
    labels = tmp_path / "labels.npy"
    np.save(labels, val[1][:-3])
    data = _npz(tmp_path / "d.npz", input=val[0])
    out = tmp_path / "out.moub"
    assert_bad_input(moub("convert", MODEL, "-o", out, "--data", data, "--labels", labels, *FAST), out, "labels")


def test_model_onnxruntime_cannot_run(tmp_path):
    weight = numpy_helper.from_array(np.ones((64, 64), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("NoSuchOp", ["h"], ["y"], domain="moub.bogus")],
        "bogus", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("moub.bogus", 1)])
    path = tmp_path / "bogus.onnx"
    onnx.save(model, path)
    data = _npz(tmp_path / "d.npz", x=np.ones((4, 64), dtype=np.float32))
    out = tmp_path / "out.moub"
    assert_bad_input(moub("convert", path, "-o", out, "--data", data, *FAST), out, "onnxruntime cannot run")


def test_unwritable_output_paths(tmp_path):
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    out = not_a_folder / "out.moub"
    proc = moub("convert", MODEL, "-o", out, "--data", VAL, *FAST)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr
    folder_out = tmp_path / "a-folder"
    folder_out.mkdir()
    proc = moub("convert", MODEL, "-o", folder_out, "--data", VAL, *FAST)
    assert proc.returncode == 2 and "is a directory" in proc.stderr
    out = tmp_path / "out.moub"
    assert_bad_input(moub("convert", MODEL, "-o", out, "--data", VAL, "--report", tmp_path / "missing" / "r.json", *FAST), out, "r.json")


def test_no_data_without_bins_and_bad_options(tmp_path):
    out = tmp_path / "out.moub"
    assert_bad_input(moub("convert", MODEL, "-o", out, "--quiet"), out, "--bins")
    assert_bad_input(moub("convert", MODEL, "-o", out, "--data", VAL, "--max-drop", "2", "--quiet"), out, "--max-drop")
    assert_bad_input(moub("convert", MODEL, "-o", out, "--data", VAL, "--metric", "bleu", "--quiet"), out, "metric")


def test_fixed_bins_cli_round_trip(tmp_path, val):
    out, report = tmp_path / "k64.moub", tmp_path / "k64.json"
    proc = moub("convert", MODEL, "-o", out, "--bins", 64, "--report", report, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "ratio" in proc.stdout
    session = moub_runtime.InferenceSession(out)
    logits = session.run(None, {"input": val[0]})[0]
    assert np.mean(np.argmax(logits, axis=1) == val[1]) > 0.9
    assert report.exists()


def test_torchscript_input(tmp_path):
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))
    torch.manual_seed(0)
    pt = tmp_path / "cnn.pt"
    torch.jit.script(module.eval()).save(str(pt))
    out = tmp_path / "cnn.moub"
    proc = moub("convert", pt, "--input-shape", "1,1,8,8", "-o", out, "--bins", 32, "--quiet")
    assert proc.returncode == 0, proc.stderr
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    got = moub_runtime.InferenceSession(out).run(None, {"input": x})[0]
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape == (5, 10)
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99
    missing = tmp_path / "no-shape.moub"
    assert_bad_input(moub("convert", pt, "-o", missing, "--bins", 32, "--quiet"), missing, "--input-shape")


def test_the_options_are_declared_once_for_the_cli_and_the_api():
    """``moub convert``'s flags and ``convert()``'s keywords both come from ConvertOptions' fields:
    the same names, defaults and per-mode defaults."""
    import dataclasses
    import inspect

    from moub_converters import convert
    from moub_converters.cli import build_convert_parser
    from moub_converters.options import ConvertOptions

    fields = {f.name: f for f in dataclasses.fields(ConvertOptions)}
    keywords = inspect.signature(convert).parameters
    assert set(fields) <= set(keywords) and not any(p.kind is p.VAR_KEYWORD for p in keywords.values())
    assert all(keywords[name].default == f.default for name, f in fields.items())
    flags = {a.dest: a for a in build_convert_parser()._actions}
    for name, f in fields.items():
        if f.metadata["flag"]:
            assert flags[name].option_strings == [f.metadata["flag"]] and flags[name].default == f.default, name
            assert name in convert.__doc__
    args = build_convert_parser().parse_args(["m.onnx", "-o", "o.moub", "--no-error-feedback", "--max-drop", "0.02"])
    assert (args.error_feedback, args.bias_correction, args.max_drop, args.min_elements) == (False, True, 0.02, None)
    assert ConvertOptions(mode="adaptive").min_elements == 16
    assert ConvertOptions(mode="paper").min_elements == ConvertOptions(mode="adaptive", bins=64).min_elements == 1024
    assert ConvertOptions(mode="adaptive", min_elements=300).min_elements == 300
    assert "bias_correction" not in ConvertOptions(mode="paper").settings()
    assert {"workers", "strategy"}.isdisjoint(ConvertOptions().settings()) and "error_feedback" in ConvertOptions().settings()
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_dorp'"):
        convert(MODEL, data=VAL, max_dorp=0.01)


def test_convert_into_a_closed_pipe_keeps_its_file_and_exits_2_quietly(tmp_path):
    """The file is written before anything is printed; a reader that went away is no internal error."""
    import os

    out = tmp_path / "out.moub"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "moub_runtime.cli", "convert", str(MODEL), "-o", str(out), "--data",
                               str(VAL), *FAST], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (2, "")
    moub_runtime.load(out)
