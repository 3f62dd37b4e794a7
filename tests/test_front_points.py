"""Size targets and front points on the demo model: a ``--target-bytes`` file fits its target
and says whether it is within --max-drop; any evaluated candidate of a saved search is written
from the report without searching again, its choice byte for byte; the closing table says why
smaller candidates within the tolerance were passed over."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import moub_runtime
from moub_converters import convert
from moub_converters.front_point import write_point
from moub_converters.passed_over import KINDS
from moub_format import MoubFile
from moub_runtime.sites import tensor_sites

DATA = Path(__file__).resolve().parent.parent / "converters" / "data"
MODEL, VAL = DATA / "digits_cnn.onnx", DATA / "digits_val.npz"


def moub(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moub_runtime.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("front")
    proc = moub("convert", MODEL, "--data", VAL, "-o", folder / "a.moub", "--report", folder / "a.json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return folder, json.loads((folder / "a.json").read_text()), proc.stdout


def _weights(path: Path) -> dict[str, bytes]:
    return {p: s.tensor.raw_data for p, s in tensor_sites(moub_runtime.load(path)).items()}


def _metadata(path: Path) -> dict[str, str]:
    with MoubFile(path) as moub_file:
        return dict(moub_file.index.metadata)


def test_the_reports_choice_is_written_again_byte_for_byte(searched, tmp_path):
    folder, report, _ = searched
    out = tmp_path / "again.moub"
    proc = moub("convert", MODEL, "--data", VAL, "-o", out, "--from-report", folder / "a.json")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (folder / "a.moub").read_bytes()
    assert "evaluations                    0" in proc.stdout


def test_paper_mode_front_point_from_its_report(tmp_path):
    result = convert(MODEL, data=VAL, mode="paper", population=4, generations=2)
    again = write_point(MODEL, VAL, json.loads(result.report_json()))
    assert again.moub_bytes == result.moub_bytes


def test_a_target_writes_the_least_loss_that_fits_and_its_point_is_rewritten_from_the_report(searched, tmp_path):
    """A target between the tolerance's choice and the smallest candidate: the file fits, the
    closing table says whether it is within --max-drop, and its point, written from the
    tolerance run's report, holds the same weights (only the settings and front differ)."""
    folder, report, _ = searched
    target = report["file"]["bytes"] - 400
    out, out_report = tmp_path / "t.moub", tmp_path / "t.json"
    proc = moub("convert", MODEL, "--data", VAL, "-o", out, "--report", out_report, "--target-bytes", target, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size <= target
    written = json.loads(out_report.read_text())
    assert written["target"] == {"bytes": target, "file_bytes": out.stat().st_size,
                                 "within_max_drop": written["loss"] <= 0.005}
    verdict = "within" if written["target"]["within_max_drop"] else "OUTSIDE"
    assert f"least loss that fits: {verdict} max drop" in proc.stdout
    assert written["settings"]["target_bytes"] == target and "target_bytes" not in report["settings"]
    # no measured candidate whose file would fit lost less on the search data than the chosen one
    n = written["pool"]["pooled_weights"]
    chosen = next(c for c in written["candidates"] if c["name"] == written["choice"]["name"])
    other = written["file"]["bytes"] - chosen["bits_per_weight"] * n / 8  # beside the weights, as the converter learns it
    fitting = [c for c in written["candidates"] if c["complete"] and other + c["bits_per_weight"] * n / 8 <= target]
    assert fitting and all(c["loss"] >= chosen["loss"] for c in fitting)
    assert any(c["stage"] == "target" for c in written["candidates"])  # the finest step that fits, per gamma
    # the same point written from the report of the target run: byte for byte
    again = write_point(MODEL, VAL, out_report)
    assert again.moub_bytes == out.read_bytes()
    # ... and from the target run's report, another point: the tolerance run's choice, same weights as that file
    other = write_point(MODEL, VAL, out_report, point=report["choice"]["name"])
    (tmp_path / "other.moub").write_bytes(other.moub_bytes)
    assert _weights(tmp_path / "other.moub") == _weights(folder / "a.moub")
    meta, original = _metadata(tmp_path / "other.moub"), _metadata(folder / "a.moub")
    assert meta["moub.quality_compressed"] == original["moub.quality_compressed"]


def test_a_target_no_candidate_reaches_is_refused_without_output(tmp_path):
    out = tmp_path / "t.moub"
    proc = moub("convert", MODEL, "--data", VAL, "-o", out, "--target-bytes", 3000, "--quiet")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "fits 3,000 bytes" in proc.stderr and not out.exists()


@pytest.mark.parametrize("args, words", [
    (["--point", "x=+9"], "--from-report"),
    (["--from-report", "{report}", "--point", "no such point"], "no candidate named 'no such point'"),
    (["--from-report", "{report}", "--max-drop", "0.01"], "drop --max-drop"),
    (["--target-bytes", "5000", "--target-ratio", "3"], "not both"),
    (["--target-ratio", "0.5"], "--target-ratio"),
])
def test_bad_front_point_and_target_arguments(searched, tmp_path, args, words):
    folder, _, _ = searched
    out = tmp_path / "x.moub"
    args = [a.format(report=folder / "a.json") for a in args]
    proc = moub("convert", MODEL, "--data", VAL, "-o", out, "--quiet", *args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert words in proc.stderr and not out.exists()


def test_from_report_refuses_another_model(searched, tmp_path):
    folder, _, _ = searched
    other = tmp_path / "other.onnx"
    import onnx

    model = onnx.load(MODEL)
    model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))
    onnx.save(model, other)
    proc = moub("convert", other, "--data", VAL, "-o", tmp_path / "x.moub", "--from-report", folder / "a.json")
    assert proc.returncode == 2 and "not the model of" in proc.stderr


def test_the_closing_table_says_why_smaller_candidates_were_passed_over(searched):
    _, report, stdout = searched
    rows = report["passed_over"]
    choice = next(c for c in report["candidates"] if c["name"] == report["choice"]["name"])
    for row in rows:
        assert row["kind"] in KINDS and row["bits_per_weight"] < choice["bits_per_weight"] and row["loss"] <= 0.005
    if rows:
        assert f"passed over     {len(rows)} smaller candidates" in stdout
        for kind in {r["kind"] for r in rows}:
            assert KINDS[kind] in stdout
    table = stdout[stdout.index("passed over"):stdout.index("evaluations")] if rows else ""
    assert all(len(line) <= 80 for line in table.splitlines()), table


def test_paper_mode_target_ratio_fits(tmp_path):
    """The paper mode chooses among its evaluated bin counts: the file fits the ratio asked for."""
    result = convert(MODEL, data=VAL, mode="paper", population=4, generations=2, target_ratio=12.0)
    original = MODEL.stat().st_size
    assert len(result.moub_bytes) <= original // 12
    assert result.report["target"]["bytes"] == original // 12 and result.report["settings"]["target_ratio"] == 12.0
    assert result.report["target"]["within_max_drop"] == (result.report["loss"] <= 0.005)
