"""Every committed golden file stays readable and decodes to the same tensors."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

import moub_runtime
from moub_format import FORMAT_MAJOR, FORMAT_MINOR, MoubFile
from moub_format import constants as C

GOLDEN = Path(__file__).parent / "golden"


def _make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.moub")), ids=lambda p: p.name)
def test_golden_file_decodes_unchanged(path):
    expected = json.loads(path.with_suffix(".json").read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected["file_sha256"]
    got = {p: hashlib.sha256(a.tobytes()).hexdigest() for p, a in moub_runtime.decode_tensors(path)}
    assert got == expected["tensors"]
    moub_runtime.load(path)


def test_every_version_has_a_golden():
    assert {p.name for p in GOLDEN.glob("*.moub")} >= {f"everything_v1_{minor}.moub" for minor in range(FORMAT_MINOR + 1)}


def test_writer_still_produces_the_golden_bytes():
    """Canonical writer: today's code rebuilds the current-version golden byte for byte."""
    path = GOLDEN / f"everything_v{FORMAT_MAJOR}_{FORMAT_MINOR}.moub"
    assert _make_golden().golden_bytes() == path.read_bytes()


def test_the_current_golden_uses_every_feature_of_its_version():
    with MoubFile(GOLDEN / f"everything_v{FORMAT_MAJOR}_{FORMAT_MINOR}.moub") as moub:
        index = moub.index
        assert index.required_features == (C.FEATURE_PACKS | C.FEATURE_LZMA | C.FEATURE_PACKED_TABLES
                                           | C.FEATURE_COMPACT_PACKS | C.FEATURE_CONSTANT_NAMES
                                           | C.FEATURE_INTEGER_TENSORS)
        assert any(t.encoding == C.ENCODING_HUFFMAN and t.dtype == 3 for t in index.tensors)  # int8
        assert len(index.packs) == 2 and any(index.grids) and not all(index.grids)
        assert all(p.compact for p in index.packs)
        packed = [index.table_is_packed(t) for t in range(len(index.tables))]
        assert any(packed) and not all(packed)
        assert index.graph.codec == C.CODEC_LZMA
        assert any(t.data.codec == C.CODEC_LZMA for t in index.tensors)
        assert any(t.encoding == C.ENCODING_HUFFMAN for t in index.tensors)
        assert index.alignment == 8
