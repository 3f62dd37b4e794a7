"""Every committed golden file stays readable and decodes to the same tensors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import moub_runtime

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.moub")), ids=lambda p: p.name)
def test_golden_file_decodes_unchanged(path):
    expected = json.loads(path.with_suffix(".json").read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected["file_sha256"]
    got = {p: hashlib.sha256(a.tobytes()).hexdigest() for p, a in moub_runtime.decode_tensors(path)}
    assert got == expected["tensors"]
    moub_runtime.load(path)


def test_writer_still_produces_the_golden_bytes():
    """Canonical writer: today's code rebuilds the current-version golden byte for byte."""
    import modelzoo
    from moub_converters.encode import encode_model
    from moub_format import FORMAT_MAJOR, FORMAT_MINOR

    path = GOLDEN / f"everything_v{FORMAT_MAJOR}_{FORMAT_MINOR}.moub"
    model = modelzoo.everything_model()
    codebook, assignments = modelzoo.equal_width_assignments(model, k=40)
    assert encode_model(model, [codebook], assignments, {"purpose": "golden"}, chunk_elements=300) == path.read_bytes()
