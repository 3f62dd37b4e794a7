"""``moub verify FILE --model ORIG --data D [--labels L]`` scores a written file the way the converter
judged it: by the metric it was converted with (each output head by its own), on data in any layout
``convert`` takes, against the tolerance the file records; bad scoring input is one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moub_converters import convert

import user_models

FAST = dict(population=4, generations=3, merge_budget=0)
MOUB = [sys.executable, "-m", "moub_runtime.cli"]


def _verify(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(MOUB + ["verify", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> tuple[user_models.UserModel, Path, Path, Path]:
    folder = tmp_path_factory.mktemp("verify")
    model = user_models.binary_classifier(folder)
    result = convert(model.path, data=model.search, labels=model.search_labels, **FAST)
    out = folder / "binary.moub"
    result.write(out)
    test = folder / "test.npz"
    np.savez(test, **model.test)
    labels = folder / "labels.npy"
    np.save(labels, model.test_labels)
    return model, out, test, labels


def test_verify_scores_held_out_data_by_the_files_own_metric_and_tolerance(binary):
    model, out, test, labels = binary
    result = _verify(out, "--model", model.path, "--data", test, "--labels", labels)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith(f"scored on {len(model.test_labels)} samples by logit-decision")
    assert lines[2].endswith(("within --max-drop 0.005", "OUTSIDE --max-drop 0.005"))


def test_verify_takes_a_named_metric_and_tolerance(binary):
    model, out, test, _ = binary
    result = _verify(out, "--model", model.path, "--data", test, "--metric", "l2", "--max-drop", "0.5")
    assert result.returncode == 0, result.stderr
    assert "by l2 (chosen with --metric)" in result.stdout and "within --max-drop 0.5" in result.stdout


def test_a_class_metric_on_a_single_logit_says_which_metric_fits(binary):
    model, out, test, labels = binary
    result = _verify(out, "--model", model.path, "--data", test, "--labels", labels, "--metric", "accuracy")
    assert result.returncode == 2 and result.stdout.startswith(f"{out}: structure")
    assert result.stderr.count("\n") == 1 and "--metric logit-decision" in result.stderr


def test_verify_reads_stateful_feeds_like_convert(tmp_path):
    """A recurrent state with its samples on axis 1 and a shared scalar: the layout options of convert."""
    model = user_models.streaming_vad(tmp_path)
    result = convert(model.path, data=model.search, **FAST)
    out = tmp_path / "vad.moub"
    result.write(out)
    test = tmp_path / "test.npz"
    np.savez(test, **model.test)
    verified = _verify(out, "--model", model.path, "--data", test, "--batch-axis", "state=1", "--shared", "sr")
    assert verified.returncode == 0, verified.stderr
    assert "by heads" in verified.stdout and "--max-drop 0.005" in verified.stdout


def test_scoring_options_need_the_model_and_data(binary):
    _, out, _, labels = binary
    result = _verify(out, "--labels", labels)
    assert result.returncode == 2 and "need --model and --data" in result.stderr


def test_rows_in_an_npy_or_float64_arrays(binary, tmp_path):
    """An .npy is not a feed (one line, exit 2); float64 arrays for a float32 input are cast, not refused."""
    model, out, _, _ = binary
    rows = tmp_path / "rows.npy"
    np.save(rows, model.test["x"])
    result = _verify(out, "--model", model.path, "--data", rows)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "rows.npy" in result.stderr
    wide = tmp_path / "wide.npz"
    np.savez(wide, x=model.test["x"].astype(np.float64))
    result = _verify(out, "--model", model.path, "--data", wide)
    assert result.returncode == 0 and "scored on" in result.stdout, result.stderr
