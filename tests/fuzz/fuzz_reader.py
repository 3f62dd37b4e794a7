"""Coverage-guided fuzzing of the .moub reader with atheris (libFuzzer).

Every input is written to a file and read as a device reads it: ``moub_runtime.load`` (open,
index, memory plan, graph, sites, decode) and ``moub verify``'s path. The promise checked: any
bytes end in a ``MoubFormatError`` or a valid model, never another exception (NumPy's runtime
warnings, such as an overflow in a cast, count as exceptions here), a hang or an
allocation beyond the memory budget (set to FUZZ_BUDGET, and the process runs under
libFuzzer's ``-rss_limit_mb``). The seed corpus is the valid files of the hostile kit (tensors,
packs, offsets, compact vectors, packed tables, LZMA) and the golden files of every version.

Short run (``make test`` runs one: ``tests/test_fuzz.py``)::

    .venv/bin/python tests/fuzz/fuzz_reader.py -runs=2000

Longer run, e.g. ten minutes on two cores, keeping what it finds in a corpus folder::

    mkdir -p /tmp/moub-fuzz && .venv/bin/python tests/fuzz/fuzz_reader.py /tmp/moub-fuzz \\
        -max_total_time=600 -jobs=2 -workers=2 -timeout=20 -rss_limit_mb=3072

A crash writes ``crash-<sha1>`` with the input; replay it with
``.venv/bin/python tests/fuzz/fuzz_reader.py crash-<sha1>``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

with atheris.instrument_imports(include=["moub_format", "moub_runtime"]):
    import moub_format
    import moub_runtime
    from moub_runtime import inspect as moub_inspect

FUZZ_BUDGET = 256 << 20   # a file may make the reader materialise at most this much
LIMITS = moub_format.ReaderLimits(memory_budget=FUZZ_BUDGET)
SCRATCH = Path(tempfile.mkdtemp(prefix="moub-fuzz-"))
INPUT = SCRATCH / "input.moub"


def seeds() -> dict[str, bytes]:
    """Valid files of every feature: what mutations start from."""
    import test_hostile_kit as K
    from moub_format import constants as C

    compact = K.valid_pack_spec()
    compact.packs = [K.compact(compact.packs[0])]
    compact.required_features |= C.FEATURE_COMPACT_PACKS
    packed = K.valid_pack_spec()
    packed.tables = [K.packed_table(packed.tables[0])]
    packed.required_features |= C.FEATURE_PACKED_TABLES
    specs = {"tensors": K.valid_spec(), "pack": K.valid_pack_spec(), "offsets": K.valid_offset_pack_spec(),
             "compact": compact, "packed-table": packed}
    files = {name: K.build(spec) for name, spec in specs.items()}
    for golden in sorted((TESTS / "golden").glob("*.moub")):
        files[golden.stem] = golden.read_bytes()
    return files


def resealed(data: bytes) -> bytes | None:
    """``data`` with every checksum and digest recomputed over what it now holds (blob
    checksums, payload digest, index digest), or None when its index does not verify: a
    mutation of a codebook, a dims vector or a chunk table then reaches the checks behind
    the digests instead of stopping at them."""
    import hashlib

    from moub_format import fbverify
    from moub_format.writer import index_digest_position

    try:
        _, root = fbverify.verify_tree(memoryview(data), moub_format.DEFAULT_LIMITS, "fuzz")
        start = root["payload_offset"]
        if not 0 < start <= len(data) or root["index_digest"] is None:
            return None
        out = bytearray(data)
        blobs = [root["graph"]] + [t["data"] for t in root["tensors"] or []] + [p["data"] for p in root["packs"] or []]
        for blob in blobs:
            if blob is None or blob["checksum"] is None or blob["checksum"]["digest"] is None:
                continue
            position, size = blob["checksum"]["digest@"], blob["checksum"]["digest"].size
            if size == 32:
                stored = data[start + blob["offset"] : start + blob["offset"] + blob["length"]]
                out[position : position + 32] = hashlib.sha256(stored).digest()
        payload = root["payload_digest"]
        if payload is not None and payload["digest"] is not None and payload["digest"].size == 32:
            out[payload["digest@"] : payload["digest@"] + 32] = hashlib.sha256(bytes(out[start:])).digest()
        position = index_digest_position(bytes(out[:start]))
        out[position : position + 32] = bytes(32)
        out[position : position + 32] = hashlib.sha256(bytes(out[:start])).digest()
        return bytes(out)
    except Exception:  # the fixer reads hostile bytes with the generated accessors: anything may go wrong
        return None


def read(data: bytes) -> None:
    INPUT.write_bytes(data)
    try:
        moub_runtime.load(INPUT, LIMITS)
    except moub_format.MoubFormatError:
        pass
    try:
        moub_inspect.verify_file(INPUT, LIMITS)
    except moub_format.MoubFormatError:
        pass


def read_like_a_device(data: bytes) -> None:
    """The input as it is, then with its checksums and digests made to match."""
    read(data)
    fixed = resealed(data)
    if fixed is not None and fixed != data:
        read(fixed)


def main() -> None:
    corpus = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    if not corpus or all(Path(arg).is_dir() for arg in corpus):
        seed_folder = SCRATCH / "seeds"
        seed_folder.mkdir(exist_ok=True)
        for name, data in seeds().items():
            (seed_folder / name).write_bytes(data)
        sys.argv.append(str(seed_folder))
    warnings.simplefilter("error", RuntimeWarning)
    atheris.Setup(sys.argv, read_like_a_device)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
