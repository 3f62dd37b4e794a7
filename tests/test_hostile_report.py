"""The reproductions of the hostile-file report, each asserting what the reader does now.

The files come from ``hostile_cases`` (built byte by byte with ``test_hostile_kit``), at sizes
that keep the suite fast; ``tools/hostile_repro.py`` runs the report's full-size files in
fresh processes and measures their peak memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import hostile_cases as H
import moub_runtime
import test_hostile_kit as K
from moub_format import ChecksumError, CodebookError, GraphError, LimitError, ReaderLimits, StructureError, VersionError
from moub_format import constants as C
from moub_runtime import inspect as moub_inspect
from moub_runtime.cli import main as cli_main
from moub_runtime.tensor_walk import first_external_reference, iter_reachable_tensors

ROOT = Path(__file__).resolve().parent.parent


def write(folder: Path, data: bytes, name: str = "hostile.moub") -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def one_line_exit_2(argv: list[str], capsys) -> str:
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moub: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- 1. external data anywhere in the graph


@pytest.mark.parametrize("place", H.EXTERNAL_PLACES)
def test_the_walk_reaches_the_external_reference(place):
    model = H.external_data_model(place)
    found = first_external_reference(model)
    assert found is not None and found.tensor.external_data[0].value in (H.SECRET_NAME, "/etc/passwd", "../../../../etc/passwd")


def test_the_walk_reaches_every_kind_of_tensor():
    sparse = H._sparse_secret("S")
    holder = onnx.helper.make_node("Holder", [], ["h"], domain="x", t=onnx.numpy_helper.from_array(np.zeros(1, np.float32), "t"),
                                   tensors=[onnx.numpy_helper.from_array(np.zeros(1, np.float32), "ts")], sparse_tensor=sparse,
                                   sparse_tensors=[sparse])
    body = onnx.helper.make_graph([holder], "body", [], [], [onnx.numpy_helper.from_array(np.zeros(1, np.float32), "sub_init")],
                                  sparse_initializer=[sparse])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Loop", [], [], body=body)], "g", [], [],
                                   [onnx.numpy_helper.from_array(np.zeros(1, np.float32), "main_init")])
    model = onnx.helper.make_model(graph)
    function = onnx.helper.make_function("x", "F", [], [], [holder], [])
    default = onnx.helper.make_attribute("d", onnx.numpy_helper.from_array(np.zeros(1, np.float32), "default"))
    function.attribute_proto.append(default)
    model.functions.append(function)
    model.training_info.add().initialization.CopyFrom(body)
    wheres = sorted(item.where for item in iter_reachable_tensors(model))
    # graph: 1 initializer; body (in the Loop, and as a training graph): 1 initializer, a sparse
    # initializer (values, indices), the holder's t, 1 of tensors, sparse_tensor, 1 of sparse_tensors
    per_body = 1 + 2 + 1 + 1 + 2 + 2
    assert len(wheres) == 1 + 2 * per_body + (1 + 1 + 2 + 2) + 1, wheres
    assert "init:main_init" in wheres and "node:0/body/init:sub_init" in wheres
    assert "node:0/body/sparse:S/values" in wheres and "func:0/attr:d" in wheres
    assert "training:0/initialization/node:0/sparse_tensors[0]/indices" in wheres


@pytest.mark.parametrize("place", H.EXTERNAL_PLACES)
def test_external_data_outside_initializers_is_refused_everywhere(tmp_path, place, capsys, monkeypatch):
    path = write(tmp_path, H.external_data_file(place))
    (tmp_path / H.SECRET_NAME).write_bytes(b"TOP-SECRET-BYTES")
    monkeypatch.chdir(tmp_path)
    for action in (moub_runtime.load, moub_runtime.InferenceSession):
        with pytest.raises(GraphError, match="refers to external data"):
            action(path)
    with pytest.raises(GraphError, match="refers to external data"):
        moub_inspect.verify_file(path)
    line = one_line_exit_2(["decode", str(path), "-o", str(tmp_path / "out.onnx")], capsys)
    assert "a .moub must be self-contained" in line and not (tmp_path / "out.onnx").exists()


def test_the_converter_refuses_external_data_outside_initializers(tmp_path):
    model = H.external_data_onnx(tmp_path / "leaky.onnx")
    (tmp_path / H.SECRET_NAME).write_bytes(b"TOP-SECRET-BYTES")
    result = subprocess.run([sys.executable, "-m", "moub_runtime.cli", "convert", str(model), "-o", str(tmp_path / "out.moub"),
                             "--data", str(ROOT / "converters" / "data" / "digits_val.npz"), "--quiet"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "tensor 'sparse:S/values' refers to external data ('secret.txt') that was not loaded" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "out.moub").exists()


def test_the_writer_refuses_a_graph_with_external_data_anywhere():
    from moub_converters.encode import encode_model

    model = H.external_data_model("constantofshape_value")
    with pytest.raises(ValueError, match="'node:2/value' refers to external data"):
        encode_model(model, [], {})



# ---------------------------------------------------------------- 2. amplification from small indexes


def test_vectors_shared_by_several_fields_are_refused(tmp_path):
    path = write(tmp_path, H.shared_values_file(codebooks=64, entries=1024))
    for action in (moub_runtime.load, moub_inspect.summarize, moub_inspect.verify_file):
        with pytest.raises(StructureError, match=r"codebooks\[\d+\]\.values: shares bytes with Model\.codebooks\[\d+\]\.values"):
            action(path)


def test_a_string_shared_by_two_fields_is_refused(tmp_path):
    # metadata value 1 names the bytes of metadata value 0: each field must own its string
    spec = K.valid_spec()
    spec.metadata = [("a", "x" * 64), ("b", "y" * 64)]
    data = bytearray(K.build(spec))
    vector = K.follow(bytes(data), K.model_field(bytes(data), "metadata"))
    entries = [K.follow(bytes(data), vector + 4 + 4 * i) for i in range(2)]
    fields = [K.field_pos(bytes(data), entry, 1) for entry in entries]
    targets = [K.follow(bytes(data), field) for field in fields]
    src, dst = (1, 0) if targets[0] > fields[1] else (0, 1)
    data[fields[src] : fields[src] + 4] = (targets[dst] - fields[src]).to_bytes(4, "little")
    path = write(tmp_path, K.reseal(data))
    with pytest.raises(StructureError, match="shares bytes with"):
        moub_runtime.load(path)


GIB = 1 << 30


def test_grid_codebooks_are_made_only_to_decode_and_counted_before(tmp_path):
    path = write(tmp_path, H.grid_tables_file(codebooks=11))
    budget = ReaderLimits(memory_budget=512 << 20)
    tracemalloc.start()
    summary = moub_inspect.summarize(path, budget)  # 12 index bytes per grid: inspect makes none of the values
    assert [cb["entries"] for cb in summary.codebooks] == [1 << 24] * 11 and summary.codebooks[0]["min"] == -(1 << 23)
    for action in (moub_runtime.load, moub_inspect.verify_file):
        with pytest.raises(LimitError, match=r"the per-symbol values of the codebooks in use \(grid codebooks made then\) "
                                             r"would take 1476395008 bytes.*memory budget of 536870912"):
            action(path, budget)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 << 20, peak  # before: 11 x 64 MiB of float32 grids (plus int64 ranges) at parse time


def test_deep_code_tables_are_counted_and_verify_agrees_with_load(tmp_path, capsys):
    path = write(tmp_path, H.deep_tables_file(tensors=160))  # over MIN_LANES: decoded as lanes, a 2^20 table each
    small = ReaderLimits(memory_budget=1 * GIB)
    for action in (moub_runtime.load, moub_inspect.verify_file, moub_runtime.InferenceSession):
        with pytest.raises(LimitError, match=r"the lookup tables of 160 code-length tables \(2\^L entries each\) would take 2684354560"):
            action(path, limits=small)
    line = one_line_exit_2(["decode", str(path), "-o", str(tmp_path / "out.onnx"), "--memory-budget", "1G"], capsys)
    assert "memory budget of 1073741824 bytes" in line
    few = write(tmp_path, H.deep_tables_file(tensors=3), "few.moub")
    enough = ReaderLimits(memory_budget=256 << 20)
    assert moub_inspect.verify_file(few, enough) == []
    model = moub_runtime.load(few, enough)
    assert len(model.graph.initializer) == 3


def test_the_default_budget_is_half_the_memory_the_process_may_use():
    from moub_format.budget import MEMORY_BUDGET_CAP, default_memory_budget

    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert default_memory_budget() <= min(MEMORY_BUDGET_CAP, physical // 2)
    child = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, resource.RLIM_INFINITY)); "
             "from moub_format.budget import default_memory_budget; print(default_memory_budget())")
    under_limit = int(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
    assert 0 < under_limit < 1 << 30


# ---------------------------------------------------------------- 3. the bytes are checked before the array exists


def test_a_raw_tensor_is_allocated_only_after_its_checksum(tmp_path):
    path = write(tmp_path, H.raw_bomb_file(decoded_bytes=1 << 36, stored_bytes=1 << 24))
    with pytest.raises(LimitError, match="the decoded model would take 68719476736 bytes"):
        moub_runtime.load(path)  # the default budget, half the memory available: refused before anything
    huge = ReaderLimits(memory_budget=1 << 40)
    with pytest.raises(ChecksumError, match="tensor 'init:X': checksum mismatch of the 16777216 stored bytes"):
        moub_runtime.load(path, huge)  # a 64 GiB array would have failed with ENOMEM: it is never asked for


# ---------------------------------------------------------------- 4. device-sized limits, streaming inflation


@pytest.fixture(scope="module")
def big_lzma_tensor(tmp_path_factory):
    return write(tmp_path_factory.mktemp("lzma"), H.lzma_tensor_file(decoded_bytes=256 << 20))


def test_a_budget_set_on_the_command_line_refuses_a_big_tensor(big_lzma_tensor, capsys):
    for command in ("verify", "inspect", "decode"):
        argv = [command, str(big_lzma_tensor), "--memory-budget", "200M"] + (["-o", "/nonexistent/x.onnx"] if command == "decode" else [])
        if command == "inspect":  # inspect reads the index only: within budget
            assert cli_main(argv) == 0
            capsys.readouterr()
            continue
        if command == "decode":
            argv[-1] = str(big_lzma_tensor.parent / "out.onnx")
        line = one_line_exit_2(argv, capsys)
        assert "the decoded model would take 268435456 bytes" in line and "memory budget of 209715200" in line


def test_a_compressed_tensor_inflates_straight_into_its_array(big_lzma_tensor):
    # peak memory of a full load: the 256 MiB array once (before: the inflated bytes and the array)
    code = ("import resource, sys, moub_runtime\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "from moub_format import MoubFile\n"
            "with MoubFile(sys.argv[1]) as moub:\n"
            "    [array] = [a for _, a in moub.iter_tensors()]\n"
            "    assert array.nbytes == 256 << 20 and not array[:1000].any()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)")
    result = subprocess.run([sys.executable, "-c", code, str(big_lzma_tensor)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) * 1024 < 1.3 * (256 << 20), result.stdout


def test_a_graph_bomb_is_counted_three_times(tmp_path, capsys):
    path = write(tmp_path, H.lzma_graph_file(doc_bytes=64 << 20))
    with pytest.raises(LimitError, match="the graph .inflated, parsed and serialized again. would take 201326"):
        moub_runtime.load(path, ReaderLimits(memory_budget=128 << 20))
    assert len(moub_runtime.load(path).doc_string) == 64 << 20  # valid, only big: the default budget takes it


# ---------------------------------------------------------------- 5. verify and load agree


def test_float16_overflow_is_refused_by_verify_and_load_alike(tmp_path, capsys):
    path = write(tmp_path, H.float16_overflow_file())
    for action in (moub_runtime.load, moub_inspect.verify_file, moub_runtime.InferenceSession):
        with pytest.raises(CodebookError, match="tensor 'init:W': codebook 0 value of magnitude 140000 overflows the tensor's "
                                                "element type float16"):
            action(path)
    for command in (["verify", str(path)], ["decode", str(path), "-o", str(tmp_path / "out.onnx")]):
        one_line_exit_2(command, capsys)


def test_a_bfloat16_value_that_rounds_to_infinity_is_refused(tmp_path):
    model = K.tiny_model()
    model.graph.initializer[0].data_type = TensorProto.BFLOAT16
    spec = K.valid_spec()
    spec.graph = K.stripped_graph(model)
    spec.codebooks = [np.array([-1, -0.5, 0, 0.5, np.finfo(np.float32).max], np.float32)]  # 3.4e38 rounds up to inf in bf16
    spec.tensors[1].dtype = TensorProto.BFLOAT16
    with pytest.raises(CodebookError, match="overflows the tensor's element type bfloat16"):
        moub_runtime.load(write(tmp_path, K.build(spec)))


def test_a_wrong_payload_digest_is_refused_by_verify_load_and_decode(tmp_path, capsys):
    path = write(tmp_path, H.wrong_payload_digest_file())
    for workers in (1, 2):  # checked first on one thread, beside the decoding on two
        with pytest.raises(ChecksumError, match="whole-payload digest mismatch"):
            moub_runtime.load(path, decode_workers=workers)
    with pytest.raises(ChecksumError, match="whole-payload digest mismatch"):
        moub_runtime.InferenceSession(path)
    assert len(moub_inspect.verify_file(path)) == 1
    one_line_exit_2(["decode", str(path), "-o", str(tmp_path / "out.onnx")], capsys)
    assert not (tmp_path / "out.onnx").exists()


# ---------------------------------------------------------------- 6. converter data read with caps


def test_an_npz_header_claiming_4_tib_is_refused_before_allocation(tmp_path, capsys):
    from moub_converters.data import load_dataset
    from moub_converters.errors import DataError

    path = H.npz_header_claims(tmp_path / "claims.npz")
    assert path.stat().st_size < 400
    model = onnx.load(ROOT / "converters" / "data" / "digits_cnn.onnx")
    tracemalloc.start()
    with pytest.raises(DataError, match=r"array 'input': its header declares shape \[1099511627776\] of uint8 "
                                         r"\(1099511627776 bytes\), the archive holds 0 bytes"):
        load_dataset(path, model)
    assert tracemalloc.get_traced_memory()[1] < 16 << 20
    tracemalloc.stop()


def test_an_npz_with_too_many_samples_is_refused_before_it_is_inflated(tmp_path):
    from moub_converters.data import MAX_SAMPLES, load_dataset
    from moub_converters.errors import DataError

    path = H.npz_zip_bomb(tmp_path / "many.npz", samples=MAX_SAMPLES + 1)  # 25.6 MB of zeros in ~25 KB
    model = onnx.load(ROOT / "converters" / "data" / "digits_cnn.onnx")
    tracemalloc.start()
    with pytest.raises(DataError, match=f"array 'input': {MAX_SAMPLES + 1} samples; the converter runs every candidate on every "
                                        f"sample and takes at most {MAX_SAMPLES}"):
        load_dataset(path, model)
    assert tracemalloc.get_traced_memory()[1] < 16 << 20
    tracemalloc.stop()
    with pytest.raises(DataError, match=f"data: {MAX_SAMPLES + 1} samples"):  # data given as arrays: the same cap
        load_dataset({"input": np.zeros((MAX_SAMPLES + 1, 1, 8, 8), np.float32)}, model)


def test_the_declared_bytes_of_all_arrays_are_capped(tmp_path):
    from moub_converters.data import check_declared_sizes
    from moub_converters.errors import DataError

    path = ROOT / "converters" / "data" / "digits_val.npz"
    check_declared_sizes(path)
    with pytest.raises(DataError, match="its arrays declare .* bytes or more .*the converter takes at most 10000 bytes"):
        check_declared_sizes(path, cap=10_000)


def test_moub_convert_refuses_the_4_tib_header_in_one_line(tmp_path):
    path = H.npz_header_claims(tmp_path / "claims.npz")
    result = subprocess.run([sys.executable, "-m", "moub_runtime.cli", "convert", str(ROOT / "converters" / "data" / "digits_cnn.onnx"),
                             "-o", str(tmp_path / "out.moub"), "--data", str(path), "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "header declares shape [1099511627776]" in result.stderr


# ---------------------------------------------------------------- 7. the smaller ones


@pytest.fixture
def two_versions(tmp_path):
    """Two valid .moub files of one model whose W and B (4 KiB each) go to the data file when
    decoded with a low threshold, and whose graphs say which version they are."""
    first, second = H.weight_versions()
    return write(tmp_path, first, "v1.moub"), write(tmp_path, second, "v2.moub")


def _pair(out: Path, versions: dict[bytes, str]) -> str:
    """'model vX, weights vY': what the model file says it is, and whose weights it loads."""
    model = onnx.load(out)
    weights = b"".join(onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer)
    return f"model {model.doc_string}, weights {versions.get(weights, 'of neither')}"


def _decode(source: Path, out: Path) -> None:
    moub_runtime.decode_to_onnx(source, out, external_threshold=100)  # W and B go to the data file


def _versions(files: tuple[Path, Path], out: Path) -> dict[bytes, str]:
    versions = {}
    for name, source in zip(("v1", "v2"), files):
        _decode(source, out)
        versions[b"".join(onnx.numpy_helper.to_array(t).tobytes() for t in onnx.load(out).graph.initializer)] = name
    assert len(versions) == 2
    return versions


def test_a_model_and_its_data_file_are_replaced_as_a_pair(two_versions, tmp_path, monkeypatch):
    from moub_runtime import onnx_output

    first, second = two_versions
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    versions = _versions(two_versions, out)
    _decode(first, out)
    assert _pair(out, versions) == "model v1, weights v1"
    real_write = onnx_output.write_atomic

    def crash(*args, **kwargs):  # the process dies after the new data file is in place, before the model is
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_output, "write_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        _decode(second, out)
    assert _pair(out, versions) == "model v1, weights v1"  # the old model still has its own data file
    assert len(list(out.parent.glob("model.onnx.*.data"))) == 2  # and the new one waits as an orphan
    monkeypatch.setattr(onnx_output, "write_atomic", real_write)
    _decode(second, out)
    assert _pair(out, versions) == "model v2, weights v2" and len(list(out.parent.glob("model.onnx.*.data"))) == 1
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_concurrent_decodes_to_one_path_end_with_one_complete_pair(two_versions, tmp_path):
    first, second = two_versions
    out = tmp_path / "race" / "model.onnx"
    out.parent.mkdir()
    versions = _versions(two_versions, out)
    code = "import sys, moub_runtime\nfor _ in range(15): moub_runtime.decode_to_onnx(sys.argv[1], sys.argv[2], external_threshold=100)\n"
    children = [subprocess.Popen([sys.executable, "-c", code, str(source), str(out)]) for source in (first, second, first, second)]
    assert [child.wait(timeout=300) for child in children] == [0, 0, 0, 0]
    assert _pair(out, versions) in ("model v1, weights v1", "model v2, weights v2")
    names = sorted(p.name for p in out.parent.iterdir())
    assert len(names) == 2 and names[0] == "model.onnx", names  # no temp file, no second data file


def test_temporary_names_are_unique_and_name_their_process(tmp_path):
    from moub_format.atomic import AtomicFile

    target = tmp_path / "x.onnx"
    with AtomicFile(target) as a, AtomicFile(target) as b:
        assert a.tmp != b.tmp and a.tmp.parent == tmp_path
        assert a.tmp.name.startswith(f".x.onnx.{os.getpid()}.") and a.tmp.name.endswith(".tmp")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import errno

    from moub_format import atomic

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.handle, name)

    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    path = write(tmp_path, K.build(K.valid_spec()))
    line = one_line_exit_2(["decode", str(path), "-o", str(tmp_path / "out.onnx")], capsys)
    assert line == f"moub: {tmp_path / 'out.onnx'}: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.moub"]


def test_inspect_shows_control_characters_escaped(tmp_path, capsys):
    path = write(tmp_path, H.terminal_control_file())
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert not any(ch in out for ch in "\x1b\x07\r"), repr(out)
    assert "written by moub 0.1.0\\x1b]0;owned\\x07\\x1b[2J\\x1b[H" in out
    assert "moub.purpose: ok\\r\\nfile.moub: structure, checksums" in out  # the forged line stays inside its own
    assert cli_main(["inspect", str(path), "--json"]) == 0
    assert "\x1b" not in capsys.readouterr().out


def test_error_messages_show_control_characters_escaped(tmp_path, capsys):
    spec = K.valid_spec()
    spec.tensors[1].path = "init:W\x1b[2J\u202e"
    spec.tensors.sort(key=lambda t: t.path)
    path = write(tmp_path, K.build(spec))
    line = one_line_exit_2(["verify", str(path)], capsys)
    assert "\x1b" not in line and "\u202e" not in line and "\\x1b[2J\\u202e" in line


def test_decode_refuses_to_write_onto_its_input(tmp_path, capsys):
    path = write(tmp_path, K.build(K.valid_spec()))
    before = path.read_bytes()
    (tmp_path / "link.moub").symlink_to(path)
    for target in (path, tmp_path / "link.moub"):
        line = one_line_exit_2(["decode", str(path), "-o", str(target)], capsys)
        assert "is the file being decoded" in line
    assert path.read_bytes() == before


def test_outputs_get_the_mode_a_plain_write_gives(tmp_path, two_versions):
    first, _ = two_versions
    old = os.umask(0o077)
    try:
        fresh = tmp_path / "fresh.onnx"
        moub_runtime.decode_to_onnx(first, fresh)
        assert fresh.stat().st_mode & 0o777 == 0o600  # 0o666 minus the umask, not a forced 0o644
        pair = tmp_path / "pair" / "model.onnx"
        pair.parent.mkdir()
        _decode(first, pair)
        assert {p.stat().st_mode & 0o777 for p in pair.parent.iterdir()} == {0o600}
    finally:
        os.umask(old)
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"old")
    existing.chmod(0o640)
    moub_runtime.decode_to_onnx(first, existing)
    assert existing.stat().st_mode & 0o777 == 0o640  # a rewrite keeps the file's mode


def test_a_site_with_negative_dims_is_refused(tmp_path):
    with pytest.raises(GraphError, match=r"graph tensor 'init:N' has negative dims \[-1\]"):
        moub_runtime.load(write(tmp_path, H.negative_dims_file()))


def test_a_stored_tensor_shadowed_by_a_second_initializer_is_refused(tmp_path):
    path = write(tmp_path, H.shadowed_weight_file())
    for action in (moub_runtime.load, moub_inspect.verify_file, moub_runtime.InferenceSession):
        with pytest.raises(GraphError, match="graph: 'W' is defined twice, by an initializer and by an initializer"):
            action(path)


def test_a_constant_node_shadowing_an_initializer_is_refused(tmp_path):
    with pytest.raises(GraphError, match=r"'W' is defined twice, by an initializer and by node 0 \(Constant\)"):
        moub_runtime.load(write(tmp_path, H.constant_shadow_file()))


def test_feature_bits_must_belong_to_the_declared_version(tmp_path):
    path = write(tmp_path, H.old_version_with_new_features_file())
    with pytest.raises(VersionError, match=r"format 1.0 sets feature 0x1 \(packs and grid codebooks\), which format 1.2 defined"):
        moub_runtime.load(path)
    spec = K.valid_spec()
    spec.format_minor, spec.required_features = 2, C.FEATURE_CONSTANT_NAMES
    with pytest.raises(VersionError, match=r"format 1.2 sets feature 0x10 .* which format 1.3 defined"):
        moub_runtime.load(write(tmp_path, K.build(spec), "b.moub"))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temp_files_of_killed_writes_are_removed_by_the_next_write(tmp_path):
    from moub_format.atomic import write_atomic

    target = tmp_path / "model.onnx"
    killer = ("import os, signal, sys\nfrom moub_format.atomic import write_atomic\n"
              "def pieces():\n    yield b'x' * 4096\n    os.kill(os.getpid(), signal.SIGKILL)\n"
              "write_atomic(sys.argv[1], pieces())\n")
    for _ in range(3):  # a kill cannot clean up after itself, but each write removes the last kill's file
        result = subprocess.run([sys.executable, "-c", killer, str(target)], timeout=60)
        assert result.returncode == -9
        assert len(list(tmp_path.glob(".model.onnx.*.tmp"))) == 1
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".model.onnx.{alive.pid}.{'0' * 16}.tmp"  # a write in progress in another process
        running.write_bytes(b"")
        other = tmp_path / f".other.onnx.{_dead_pid()}.{'1' * 16}.tmp"  # another target's
        other.write_bytes(b"")
        write_atomic(target, b"complete")
        assert target.read_bytes() == b"complete"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.onnx", running.name, other.name])
    finally:
        alive.kill()
        alive.wait()


# ---------------------------------------------------------------- every case under a 2 GiB address-space limit


_UNDER_LIMIT = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, resource.RLIM_INFINITY))
import moub_runtime
from moub_format import MoubFormatError
from moub_runtime.inspect import verify_file
outcomes = {}
for path in sys.argv[1:]:
    for name, action in (("load", moub_runtime.load), ("verify", verify_file)):
        try:
            problems = action(path)
            outcome = "problems" if name == "verify" and problems else "ok"
        except MoubFormatError as exc:
            outcome = type(exc).__name__
        except BaseException as exc:  # what must never happen: numpy's or the OS's exception for a file's content
            outcome = f"FOREIGN {type(exc).__name__}: {exc}"
        outcomes[f"{path.rsplit('/', 1)[-1]} {name}"] = outcome
print(json.dumps(outcomes))
"""


@pytest.fixture(scope="module")
def report_corpus(tmp_path_factory) -> dict[str, bytes | Path]:
    folder = tmp_path_factory.mktemp("corpus")
    files = {
        "shared-values": H.shared_values_file(),                    # the report's 4.2 MB file
        "grid-tables": H.grid_tables_file(11),                      # 18 KB, 1.4 GB of grids
        "deep-tables": H.deep_tables_file(300),                     # 300 tables of 2^20 entries
        "raw-bomb": H.raw_bomb_file(),                              # 16 MiB declaring 64 GiB, wrong checksum
        "tensor-1gib": H.lzma_tensor_file(1 << 30),                 # valid, 1 GiB
        "graph-1gib": H.lzma_graph_file(1 << 30),                   # valid, a 1 GiB graph
        "float16": H.float16_overflow_file(),
        "payload-digest": H.wrong_payload_digest_file(),
        "negative-dims": H.negative_dims_file(),
        "shadowed": H.shadowed_weight_file(),
        "old-version": H.old_version_with_new_features_file(),
        **{f"external-{place}": H.external_data_file(place) for place in H.EXTERNAL_PLACES},
    }
    return {name: write(folder, data, f"{name}.moub") for name, data in files.items()}


EXPECTED_UNDER_LIMIT = {
    "shared-values": "StructureError", "grid-tables": "LimitError", "deep-tables": "LimitError", "raw-bomb": "LimitError",
    "tensor-1gib": "LimitError", "graph-1gib": "LimitError", "float16": "CodebookError", "payload-digest": "ChecksumError",
    "negative-dims": "GraphError", "shadowed": "GraphError", "old-version": "VersionError",
    **{f"external-{place}": "GraphError" for place in H.EXTERNAL_PLACES},
}


def test_every_report_file_is_a_format_error_under_a_2_gib_address_space(report_corpus):
    result = subprocess.run([sys.executable, "-c", _UNDER_LIMIT, *map(str, report_corpus.values())],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {}
    for name, error in EXPECTED_UNDER_LIMIT.items():
        expected[f"{name}.moub load"] = error
        expected[f"{name}.moub verify"] = "problems" if name == "payload-digest" else error
    assert outcomes == expected


def test_the_older_corpus_under_a_2_gib_address_space(tmp_path):
    from test_hostile_fuzz import _hostile_files

    paths = [write(tmp_path, data, f"{name}.moub") for name, data in _hostile_files().items()]
    result = subprocess.run([sys.executable, "-c", _UNDER_LIMIT, *map(str, paths)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert not [k for k, v in outcomes.items() if v in ("ok",) or v.startswith("FOREIGN")], outcomes


def test_a_fifo_or_a_device_is_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "pipe.moub"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(StructureError, match="not a regular file"):
            moub_runtime.load(path)
        one_line_exit_2(["verify", str(path)], capsys)
