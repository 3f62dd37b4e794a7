"""The committed bindings and the verifier's schema mirror match schema/moub.fbs."""

from __future__ import annotations

import filecmp
import importlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from moub_format import fbverify

ROOT = Path(__file__).resolve().parent.parent


def test_committed_bindings_are_up_to_date():
    sys.path.insert(0, str(ROOT / "tools"))
    generate_schema = importlib.import_module("generate_schema")
    try:
        flatc = generate_schema.find_flatc()
    except SystemExit:
        pytest.skip("flatc is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([flatc, "--python", "-o", tmp, str(ROOT / "schema" / "moub.fbs")], check=True)
        fresh = Path(tmp) / "moub_format" / "fb"
        committed = ROOT / "moub_format" / "fb"
        names = sorted(p.name for p in fresh.glob("*.py") if p.name != "__init__.py")
        assert names == sorted(p.name for p in committed.glob("*.py") if p.name != "__init__.py")
        for name in names:
            assert filecmp.cmp(fresh / name, committed / name, shallow=False), f"{name} is stale: run make schema"


def test_verifier_mirror_matches_schema_slots():
    text = (ROOT / "schema" / "moub.fbs").read_text()
    for table, fields in fbverify.SCHEMA.items():
        body = re.search(rf"table {table} \{{(.*?)\}}", text, re.S).group(1)
        declared = [line.split(":")[0].strip() for line in body.splitlines() if ":" in line and not line.strip().startswith("//")]
        assert declared == [f.name for f in fields], table
