"""A short coverage-guided fuzzing run of the reader (tests/fuzz/fuzz_reader.py) in every
``make test``; that file's docstring gives the longer run. Skipped where atheris does not
install (it ships wheels for x86-64 Linux and macOS, not for every platform this project runs on)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

HARNESS = Path(__file__).resolve().parent / "fuzz" / "fuzz_reader.py"
RUNS = 1500


def test_a_short_fuzzing_run_finds_no_crash(tmp_path):
    result = subprocess.run(
        [sys.executable, str(HARNESS), f"-runs={RUNS}", "-seed=1", "-timeout=30", "-rss_limit_mb=2048",
         f"-artifact_prefix={tmp_path}/"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Done {RUNS} runs" in result.stderr, result.stderr[-2000:]
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("oom-*")) and not list(tmp_path.glob("timeout-*"))
