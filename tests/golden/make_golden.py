"""Regenerate the golden files (only when the format version changes: old goldens stay).

Run: .venv/bin/python tests/golden/make_golden.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

import modelzoo  # noqa: E402

import moub_runtime  # noqa: E402
from moub_converters.encode import encode_model  # noqa: E402
from moub_format import FORMAT_MAJOR, FORMAT_MINOR  # noqa: E402
from moub_format.writer import write_atomic  # noqa: E402


def main() -> None:
    name = f"everything_v{FORMAT_MAJOR}_{FORMAT_MINOR}"
    model = modelzoo.everything_model()
    codebook, assignments = modelzoo.equal_width_assignments(model, k=40)
    path = HERE / f"{name}.moub"
    write_atomic(path, encode_model(model, [codebook], assignments, {"purpose": "golden"}, chunk_elements=300))
    digests = {p: hashlib.sha256(a.tobytes()).hexdigest() for p, a in moub_runtime.decode_tensors(path)}
    (HERE / f"{name}.json").write_text(json.dumps({"file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "tensors": digests}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
