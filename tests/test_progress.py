"""Progress a person can plan by: every phase announces its total work, the events a
``progress`` callback sees are documented (``progress.py``) and counted against those totals,
and a log (stderr not a terminal) gets timestamped lines within 80 columns with an ETA."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

from moub_converters import convert
from moub_converters.progress import ConsoleProgress

DATA = Path(__file__).resolve().parent.parent / "converters" / "data"
MODEL, VAL = DATA / "digits_cnn.onnx", DATA / "digits_val.npz"


def test_the_callback_sees_each_phase_with_its_total_and_the_work_within_it():
    events: list[dict] = []
    result = convert(MODEL, data=VAL, progress=events.append)
    phases = [e for e in events if "total" in e]
    names = [e["phase"] for e in phases]
    assert names[:5] == ["sensitivity", "bracket", "search", "refine", "confirm"] and names[-2:] == ["write", "layers"]
    work: dict[str, int] = {}
    current = None
    for e in events:
        if "total" in e:
            current = e["phase"]
        work[current] = work.get(current, 0) + ("result" in e) + e.get("done", 0)
    for e in phases:
        if e["total"] is not None:
            assert 0 < work[e["phase"]] <= e["total"], (e, work)
    assert work["sensitivity"] == len(result.report["layers"])  # one run per quantized tensor
    assert work["layers"] == 2 * result.report["layer_error"]["groups"] + 1
    results = [e["result"] for e in events if "result" in e]
    assert sum("loss" in r for r in results) == result.evaluations - work["sensitivity"]
    assert {"name", "bits_per_weight", "loss", "complete", "stopped"} <= set(next(r for r in results if "loss" in r))
    assert any(e.get("generation") for e in events)


def test_plain_lines_on_a_stream_that_is_no_terminal():
    ticks = iter(range(0, 10_000, 4))  # each reading of the clock: 4 seconds later
    stream = io.StringIO()
    bar = ConsoleProgress(0.01, stream=stream, interval=10.0, now=lambda: float(next(ticks)), wall=lambda: 0.0)
    bar({"phase": "search", "total": 20})
    for i in range(10):
        bar({"result": {"name": f"c{i}", "bits_per_weight": 3.0 - i / 10, "loss": 0.001 * i, "complete": True}})
    bar({"phase": "confirm", "total": 10})
    bar.close()
    lines = stream.getvalue().splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d  ", line) and len(line) <= 80 for line in lines), lines
    assert lines[0].split()[1:3] == ["search", "0/20"]
    middle = [line for line in lines if "search" in line][1:]
    assert middle and all("eta" in line for line in middle)
    assert "best 2.000 b/w, loss 0.0100" in lines[-3] or "best 2.100 b/w, loss 0.0090" in "".join(lines)
    assert "confirm" in lines[-1]


def test_a_redirected_log_gets_the_progress(tmp_path):
    log = tmp_path / "progress.log"
    with open(log, "w") as stderr:
        proc = subprocess.run([sys.executable, "-m", "moub_runtime.cli", "convert", MODEL, "--data", VAL,
                               "-o", tmp_path / "d.moub"], stderr=stderr, stdout=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0
    lines = log.read_text().splitlines()
    assert len(lines) >= 10 and all(len(line) <= 80 for line in lines)
    assert all(re.match(r"\d\d:\d\d:\d\d  \w+ +\d+(/\d+)? +\d\d:\d\d eta ", line) for line in lines), lines
    assert any(re.search(r"loss \d\.\d{4}$", line) for line in lines)
