"""Converter memory follows the model, not the data: a YOLO-shaped detector converts from 4000
images (197 MB of input, more than the converter may hold in memory under the limit) with two
worker processes, each in an address space capped at 1 GB plus three times the model's bytes
(``resource.setrlimit(RLIMIT_AS)``, inherited by the workers), the bound the converter keeps
whatever the number of samples: the samples are read from the file a batch at a time."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import user_models

resource = pytest.importorskip("resource")
SAMPLES = 4000
GIB = 1 << 30


def test_many_samples_convert_within_an_address_space_of_1_gb_plus_3_models(tmp_path):
    model = user_models.yolo_detector(tmp_path, SAMPLES)
    data = tmp_path / "search.npz"
    np.savez(data, **model.search)
    assert data.stat().st_size > 190e6
    limit = GIB + 3 * model.path.stat().st_size
    out = tmp_path / "yolo.moub"
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
        from moub_converters.cli import convert_main
        sys.exit(convert_main([{str(model.path)!r}, "-o", {str(out)!r}, "--data", {str(data)!r}, "--quiet",
                               "--population", "4", "--generations", "2", "--merge-budget", "0",
                               "--workers", "2"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size < model.path.stat().st_size / 4
