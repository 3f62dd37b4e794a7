"""Every truncation, seeded bit flips, the CLI on hostile files, and bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

import moub_runtime
import test_hostile_kit as K
from moub_format import MoubFormatError
from moub_format import constants as C
from moub_runtime.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


def _outcome(path: Path, reference: bytes) -> str:
    """'error' (a MoubFormatError), or 'identical' (decodes to the reference model)."""
    try:
        model = moub_runtime.load(path)
    except MoubFormatError:
        return "error"
    assert model.SerializeToString(deterministic=True) == reference, "a corrupted file decoded to a different model"
    return "identical"


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "valid.moub"
    path.write_bytes(K.build(K.valid_spec()))
    return path


def test_every_truncation_is_a_format_error(small_file, tmp_path):
    data = small_file.read_bytes()
    path = tmp_path / "cut.moub"
    for length in range(len(data)):
        path.write_bytes(data[:length])
        with pytest.raises(MoubFormatError):
            moub_runtime.load(path)


@pytest.fixture(params=["lanes", "bitarray"])
def decoder(request, monkeypatch):
    from moub_format import reader

    monkeypatch.setattr(reader, "MIN_LANES", 0 if request.param == "lanes" else 1 << 30)
    return request.param


def test_random_bit_flips_never_decode_silently(small_file, tmp_path):
    """Format 1.1 covers every byte: the index digest covers [0, payload_offset), blob
    checksums the blobs, the zero-padding rule the gaps. So every flip must be caught."""
    data = small_file.read_bytes()
    reference = moub_runtime.load(small_file).SerializeToString(deterministic=True)
    rng = np.random.default_rng(20240601)
    path = tmp_path / "flipped.moub"
    outcomes = {"error": 0, "identical": 0}
    flips = [(int(p), 1 << int(b)) for p, b in zip(rng.integers(0, len(data), 600), rng.integers(0, 8, 600))]
    flips += [(p, 0xFF) for p in range(0, len(data), 7)]  # a whole byte every 7 bytes, everywhere
    for position, mask in flips:
        corrupted = bytearray(data)
        corrupted[position] ^= mask
        path.write_bytes(bytes(corrupted))
        outcomes[_outcome(path, reference)] += 1
    assert outcomes == {"error": len(flips), "identical": 0}


def test_random_bursts_never_decode_silently(small_file, tmp_path, decoder):
    data = small_file.read_bytes()
    reference = moub_runtime.load(small_file).SerializeToString(deterministic=True)
    rng = np.random.default_rng(7)
    path = tmp_path / "burst.moub"
    for _ in range(150):
        corrupted = bytearray(data)
        start = int(rng.integers(0, len(data)))
        length = int(rng.integers(1, 16))
        corrupted[start : start + length] = rng.integers(0, 256, len(corrupted[start : start + length]), dtype=np.uint8).tobytes()
        if corrupted == bytearray(data):
            continue
        path.write_bytes(bytes(corrupted))
        assert _outcome(path, reference) == "error"


# ---------------------------------------------------------------- the CLI


def _hostile_files() -> dict[str, bytes]:
    """A file per failure family, at the index level and at the payload level."""
    valid = K.build(K.valid_spec())
    files: dict[str, bytes] = {"empty": b"", "truncated": valid[: len(valid) // 2], "not-moub": b"PK\x03\x04" * 8}
    files["identifier"] = valid[:4] + b"ONNX" + valid[8:]

    def spec_with(change) -> bytes:
        spec = K.valid_spec()
        change(spec)
        return K.build(spec)

    files["major"] = spec_with(lambda s: setattr(s, "format_major", 9))
    files["dtype"] = spec_with(lambda s: setattr(s.tensors[1], "dtype", 77))
    files["dims"] = spec_with(lambda s: setattr(s.tensors[1], "dims", [4194305, 4194305, 211106198978564]))
    files["alignment"] = spec_with(lambda s: (setattr(s, "alignment", 3), setattr(s, "layout_alignment", 64), setattr(s, "payload_offset", 1024)))
    files["kraft"] = spec_with(lambda s: setattr(s, "tables", [np.array([1, 1, 2, 0, 0], np.uint8)]))
    files["trailing"] = spec_with(lambda s: setattr(s, "trailing", bytes(64)))
    files["metadata"] = spec_with(lambda s: setattr(s, "metadata", [("b", "1"), ("a", "2")]))
    files["index-digest"] = valid[:100] + bytes([valid[100] ^ 1]) + valid[101:]
    # payload level: the index is fine, the bytes behind it are not
    files["tensor-checksum"] = spec_with(lambda s: setattr(s.tensors[1].data, "checksum", K.Checksum(digest=bytes(32))))
    files["graph"] = spec_with(lambda s: setattr(s, "graph", K.Blob(b"\xff" * 40)))
    files["graph-bomb"] = spec_with(lambda s: setattr(s.graph, "decoded_length", 50))
    files["padding-bits"] = spec_with(lambda s: setattr(s.tensors[1], "data", _dirty_padding(s.tensors[1])))
    files["stream"] = spec_with(lambda s: setattr(s.tensors[1], "chunk_bits", [s.tensors[1].chunk_bits[0] + 8, *s.tensors[1].chunk_bits[1:]]))
    # format 1.2: packs and grid codebooks
    def pack_with(change) -> bytes:
        spec = K.valid_pack_spec()
        change(spec)
        return K.build(spec)

    files["pack-grid"] = pack_with(lambda s: setattr(s, "codebooks", [K.Grid(1 << 24, 33)]))
    files["pack-scale"] = pack_with(lambda s: setattr(s.packs[0], "scales", [0.25, float("nan")]))
    files["pack-feature"] = pack_with(lambda s: setattr(s, "required_features", 1 << 7))
    files["pack-site"] = pack_with(lambda s: setattr(s.packs[0], "sites", [0, 9]))

    def packed_table(spec: K.Spec, edit) -> None:  # the table as a DEFLATE stream, then ``edit(stream)``
        spec.tables, spec.required_features = [K.packed_table(spec.tables[0])], C.FEATURE_PACKS | C.FEATURE_PACKED_TABLES
        spec.tables[0].packed_lengths = edit(spec.tables[0].packed_lengths)

    files["table-truncated"] = pack_with(lambda s: packed_table(s, lambda b: b[:-4]))
    files["table-corrupt"] = pack_with(lambda s: packed_table(s, lambda b: b"\xff" * 8))
    files["table-both"] = pack_with(lambda s: packed_table(s, lambda b: b) or setattr(s.tables[0], "code_lengths", np.ones(2, np.uint8)))
    return files


def _dirty_padding(tensor: K.Tensor) -> K.Blob:
    payload = bytearray(tensor.data.payload)
    position = 0
    for bits in tensor.chunk_bits:
        position += (bits + 7) // 8
        if bits % 8:
            payload[position - 1] |= 1
            break
    return K.Blob(bytes(payload))


PAYLOAD_LEVEL = {"tensor-checksum", "graph", "graph-bomb", "padding-bits", "pack-site"}


@pytest.mark.parametrize("name", sorted(_hostile_files()))
def test_cli_prints_one_line_and_exits_2(name, tmp_path, capsys, decoder):
    path = tmp_path / f"{name}.moub"
    path.write_bytes(_hostile_files()[name])
    for command in (["decode", str(path), "-o", str(tmp_path / "out.onnx")], ["verify", str(path)], ["inspect", str(path)]):
        code = cli_main(command)
        captured = capsys.readouterr()
        if command[0] == "inspect" and name in PAYLOAD_LEVEL:
            assert code in (0, 2), captured.err  # inspect reads the index only
            if code == 0:
                continue
        assert code == 2, (command, captured.err)
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("moub: ") and str(path) in lines[0], captured.err
        assert "Traceback" not in captured.err
        assert not (tmp_path / "out.onnx").exists()


def test_cli_in_a_real_process(tmp_path):
    files = _hostile_files()
    for name in ("truncated", "kraft", "tensor-checksum"):
        path = tmp_path / f"{name}.moub"
        path.write_bytes(files[name])
        for command in ("decode", "verify"):
            argv = [sys.executable, "-m", "moub_runtime.cli", command, str(path)] + (["-o", str(tmp_path / "o.onnx")] if command == "decode" else [])
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert result.returncode == 2, result.stderr
            assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


# ---------------------------------------------------------------- bounded memory

_CHILD = r"""
import json, resource, sys
import numpy, onnx, onnxruntime
import moub_runtime
from moub_format import LimitError, ReaderLimits

def vm_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

headroom = 256 << 20
resource.setrlimit(resource.RLIMIT_AS, (vm_size() + headroom, resource.RLIM_INFINITY))
results = {}
for path in sys.argv[1:]:
    try:
        moub_runtime.load(path, ReaderLimits(max_decoded_bytes=1 << 30))
        results[path] = "loaded"
    except LimitError as exc:
        results[path] = "LimitError"
    except MemoryError:
        results[path] = "MemoryError"
print(json.dumps(results))
"""


def _absurd_files(folder: Path) -> list[Path]:
    """Files declaring sizes far beyond what the process may allocate."""
    files = {}
    # two raw tensors of 2**28 floats (1 GiB each) in 256 KiB of zlib each: over the 1 GiB budget
    spec = K.valid_spec()
    blob = zlib.compress(np.random.default_rng(0).bytes(1 << 18), 0)[: (1 << 18)]
    big = [K.Tensor(f"init:X{i}", f"X{i}", 1, [1 << 28], C.ENCODING_RAW, K.Blob(blob, C.CODEC_ZLIB, decoded_length=1 << 30))
           for i in range(2)]
    spec.tensors = [spec.tensors[0], spec.tensors[1]] + big
    files["budget"] = K.build(spec)
    # a zlib bomb: 4 GiB declared from 256 KiB stored (ratio 16384 > 4096)
    spec = K.valid_spec()
    spec.tensors[0] = K.Tensor("init:B", "B", 1, [1 << 30], C.ENCODING_RAW, K.Blob(blob, C.CODEC_ZLIB, decoded_length=1 << 32))
    files["bomb"] = K.build(spec)
    # a Huffman tensor of 2**30 elements in 16 bytes
    spec = K.valid_spec()
    tensor = spec.tensors[1]
    tensor.dims, tensor.chunk_elements, tensor.chunk_bits, tensor.data = [1 << 30], 1 << 24, [128] + [0] * 63, K.Blob(bytes(16))
    files["huffman"] = K.build(spec)
    paths = []
    for name, data in files.items():
        path = folder / f"{name}.moub"
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_absurd_sizes_are_refused_before_allocation_under_rlimit_as(tmp_path):
    paths = _absurd_files(tmp_path)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_CHILD), *map(str, paths)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcomes == {str(p): "LimitError" for p in paths}
