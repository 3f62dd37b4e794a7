"""Never worse than lossless: where no lossy candidate holds the tolerance the converter writes the
model with every tensor exact, says so and exits 0, in a file no larger than ``zstd -19`` of the
.onnx; and a lossy choice larger than that file gives way to it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import moub_runtime
from moub_converters import convert

DATA = Path(__file__).resolve().parent.parent / "converters" / "data"
MODEL, VAL = DATA / "digits_cnn.onnx", DATA / "digits_val.npz"
FAST = dict(population=4, generations=1, merge_budget=0)
UNREACHABLE = dict(metric="l2", max_drop=1e-7)  # finer than the finest step the search takes


def _initializers(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def test_no_lossy_candidate_within_tolerance_writes_the_exact_model(tmp_path):
    result = convert(MODEL, data=VAL, **FAST, **UNREACHABLE)
    assert "no candidate" in result.report["lossless"]["reason"]
    assert result.report["loss"] == 0.0 and result.report["choice"]["name"] == "lossless"
    out = tmp_path / "exact.moub"
    result.write(out)
    decoded, original = moub_runtime.load(out), onnx.load(MODEL)
    assert _initializers(decoded) == _initializers(original)
    with np.load(VAL) as z:
        x = z["input"][:64]
    name = original.graph.input[0].name
    want = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    got = moub_runtime.InferenceSession(out).run(None, {name: x})[0]
    assert np.array_equal(got, want)
    assert "every tensor stored exactly" in result.closing_table()


def test_the_lossless_file_is_no_larger_than_zstd_19_of_the_onnx():
    zstandard = pytest.importorskip("zstandard")
    result = convert(MODEL, data=VAL, **FAST, **UNREACHABLE)
    raw = MODEL.read_bytes()
    assert len(result.moub_bytes) <= len(zstandard.ZstdCompressor(level=19).compress(raw))


def test_the_cli_writes_it_and_exits_0(tmp_path):
    out = tmp_path / "exact.moub"
    proc = subprocess.run([sys.executable, "-m", "moub_runtime.cli", "convert", str(MODEL), "-o", str(out), "--data", str(VAL),
                           "--metric", "l2", "--max-drop", "1e-7", "--population", "4", "--generations", "1",
                           "--merge-budget", "0", "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "every tensor stored exactly" in proc.stdout
