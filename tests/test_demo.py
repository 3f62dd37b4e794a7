"""``moub demo``: the bundled model converted, loaded back by the runtime and tested on
held-back data, with the closing table, the report and the plot written."""

from __future__ import annotations

import json

from moub_converters.cli import demo_main


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo_main(["-o", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "held-back test split" in printed and "ratio" in printed and "wall time" in printed
    report = json.loads((out / "report.json").read_text())
    test = report["demo_test"]
    assert test["samples"] == 360
    assert test["accuracy_original"] - test["accuracy_compressed"] <= 0.005
    assert test["within_max_drop"] is True
    assert report["stages"][-1]["file_bytes"] == (out / "digits.moub").stat().st_size
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "within max drop" in printed


def test_demo_output_folder_must_be_creatable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert demo_main(["-o", str(blocker / "sub"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create" in err[0]
