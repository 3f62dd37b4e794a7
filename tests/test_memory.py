"""Converter memory follows the model, not the data: with two worker processes, each in an address
space capped at 1 GB plus three times the model's bytes (``resource.setrlimit(RLIMIT_AS)``, inherited
by the workers), the bound the converter keeps whatever the number of samples,

- a YOLO-shaped detector converts from 4000 images (197 MB of input, more than the converter may
  hold in memory under the limit): the samples are read from the file a batch at a time;
- a segmentation-shaped network converts from 4000 images whose score maps (1.57 GB) exceed the
  whole limit: the original's outputs are written to a file and read back a batch at a time."""

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


def _convert_under_the_limit(model: user_models.UserModel, tmp_path: Path) -> Path:
    """Convert ``model`` from its search samples with two workers, every process capped at 1 GB plus
    three times the model's bytes of address space; the written file."""
    data = tmp_path / "search.npz"
    np.savez(data, **model.search)
    limit = GIB + 3 * model.path.stat().st_size
    out = tmp_path / "model.moub"
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
    return out


def test_many_samples_convert_within_an_address_space_of_1_gb_plus_3_models(tmp_path):
    model = user_models.yolo_detector(tmp_path, SAMPLES)
    assert model.search["images"].nbytes > 190e6
    out = _convert_under_the_limit(model, tmp_path)
    assert out.stat().st_size < model.path.stat().st_size / 4


def test_outputs_larger_than_the_limit_convert_within_it(tmp_path):
    model = user_models.segmenter(tmp_path, SAMPLES)
    maps = 24 * 64 * 64 * 4 * SAMPLES
    assert maps > GIB + 3 * model.path.stat().st_size
    out = _convert_under_the_limit(model, tmp_path)
    assert out.stat().st_size < model.path.stat().st_size / 2  # a lossy file (a small model: the header weighs)
