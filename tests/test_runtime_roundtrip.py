"""Round trips through the container and runtime on models with weights everywhere."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import modelzoo
import moub_runtime
from moub_converters.encode import dequantize, encode_model
from moub_format import dtypes
from moub_format.writer import write_atomic
from moub_runtime.payload import clear_payload
from moub_runtime.sites import tensor_sites


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    model = modelzoo.everything_model()
    codebook, assignments = modelzoo.equal_width_assignments(model, k=48)
    path = tmp_path_factory.mktemp("rt") / "everything.moub"
    write_atomic(path, encode_model(model, [codebook], assignments, {"source": "modelzoo"}))
    return model, codebook, assignments, path


def _bytes_of(tensor: onnx.TensorProto) -> bytes:
    return tensor.SerializeToString(deterministic=True)


def test_quantized_weights_decode_bit_for_bit(packed):
    model, codebook, assignments, path = packed
    loaded = tensor_sites(moub_runtime.load(path))
    assert set(assignments) <= set(loaded)
    for site_path, assignment in assignments.items():
        tensor = loaded[site_path].tensor
        expected = dequantize(codebook, assignment.indices, tensor.data_type)
        stored = np.frombuffer(tensor.raw_data, dtype=dtypes.STORAGE_DTYPES[tensor.data_type])
        assert stored.tobytes() == expected.tobytes(), site_path
        assert tensor.data_type == tensor_sites(model)[site_path].tensor.data_type


def test_everything_else_is_byte_identical(packed):
    model, _, assignments, path = packed
    loaded = moub_runtime.load(path)
    original_sites, loaded_sites = tensor_sites(model), tensor_sites(loaded)
    for site_path, site in original_sites.items():
        if site_path not in assignments:
            assert _bytes_of(loaded_sites[site_path].tensor) == _bytes_of(site.tensor), site_path
    # With quantized payloads removed on both sides, the whole models are identical:
    # nodes, opsets, functions, doc strings and metadata_props.
    a, b = onnx.ModelProto(), onnx.ModelProto()
    a.CopyFrom(model)
    b.CopyFrom(loaded)
    for m in (a, b):
        for site_path, site in tensor_sites(m).items():
            if site_path in assignments:
                clear_payload(site.tensor)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    assert {p.key: p.value for p in loaded.metadata_props} == {"author": "moub tests", "purpose": "round trip"}
    assert len(loaded.functions) == 1


def test_onnxruntime_runs_decoded_model_and_session_agrees(packed):
    model, _, _, path = packed
    feeds = modelzoo.sample_feeds()
    decoded = ort.InferenceSession(moub_runtime.load(path).SerializeToString(), providers=["CPUExecutionProvider"])
    direct = moub_runtime.InferenceSession(path)
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, via_session, ref in zip(decoded.run(None, feeds), direct.run(None, feeds), original.run(None, feeds)):
        np.testing.assert_array_equal(got, via_session)
        assert got.shape == ref.shape
    y_ref, y = original.run(None, feeds)[0], decoded.run(None, feeds)[0]
    cosine = float((y_ref * y).sum() / np.linalg.norm(y_ref) / np.linalg.norm(y))
    assert cosine > 0.95, "48 equal-width bins should keep this small model close"


def test_streaming_decode_yields_each_tensor_once(packed):
    _, codebook, assignments, path = packed
    seen = dict(moub_runtime.decode_tensors(path))
    for site_path, assignment in assignments.items():
        assert seen[site_path].tobytes() == dequantize(codebook, assignment.indices, dtypes_of(seen, site_path)).tobytes()


def dtypes_of(seen, site_path):
    # storage dtype back to the ONNX enum for dequantize
    kind = seen[site_path].dtype
    return {np.dtype("<f4"): 1, np.dtype("<f2"): 10, np.dtype("<u2"): 16, np.dtype("<f8"): 11}[kind]


def test_same_input_same_bytes():
    model = modelzoo.everything_model()
    codebook, assignments = modelzoo.equal_width_assignments(model, k=33)
    first = encode_model(model, [codebook], assignments, {"k": "33"})
    second = encode_model(modelzoo.everything_model(), [codebook], dict(reversed(list(assignments.items()))), {"k": "33"})
    assert first == second


def test_external_data_model_round_trips(tmp_path):
    model = modelzoo.everything_model()
    source = tmp_path / "ext" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(model, source, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=512)
    assert (source.parent / "weights.bin").exists()
    reloaded = onnx.load(source)  # the converter reads external data the same way
    codebook, assignments = modelzoo.equal_width_assignments(reloaded, k=16)
    out = tmp_path / "ext.moub"
    write_atomic(out, encode_model(reloaded, [codebook], assignments))
    decoded = moub_runtime.load(out)
    for site in tensor_sites(decoded).values():
        assert site.tensor.data_location != onnx.TensorProto.EXTERNAL
    moub_runtime.InferenceSession(out).run(None, modelzoo.sample_feeds())


def test_cli_decode_to_a_missing_folder_says_so_in_one_line(packed, tmp_path):
    _, _, _, path = packed
    out = tmp_path / "nowhere" / "decoded.onnx"
    result = subprocess.run([sys.executable, "-m", "moub_runtime.cli", "decode", str(path), "-o", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"moub: {out}: folder {out.parent} does not exist"]
    assert not out.parent.exists()


def test_cli_decode_inspect_verify(packed, tmp_path):
    model, _, _, path = packed
    moub = [sys.executable, "-m", "moub_runtime.cli"]
    out = tmp_path / "decoded.onnx"
    assert subprocess.run(moub + ["decode", str(path), "-o", str(out)], capture_output=True).returncode == 0
    onnx.checker.check_model(onnx.load(out))
    inspect = subprocess.run(moub + ["inspect", str(path), "--json"], capture_output=True, text=True)
    assert inspect.returncode == 0 and '"bits_per_weight"' in inspect.stdout
    data = tmp_path / "feeds.npz"
    np.savez(data, **modelzoo.sample_feeds())
    original = tmp_path / "orig.onnx"
    onnx.save_model(model, original)
    verify = subprocess.run(moub + ["verify", str(path), "--model", str(original), "--data", str(data)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert "OK" in verify.stdout and "cosine" in verify.stdout


def test_runtime_import_pulls_no_converter_torch_or_pymoo():
    code = (
        "import sys, moub_runtime, moub_runtime.cli, moub_runtime.inspect, moub_runtime.compare\n"
        "bad = [m for m in ('torch', 'pymoo', 'moub_converters', 'matplotlib') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_large_models_are_saved_with_external_data(packed, tmp_path):
    """``moub decode`` of a model over 2 GB writes external data; the threshold is lowered here."""
    from moub_runtime import save_onnx

    _, _, _, path = packed
    reference = moub_runtime.load(path)
    feeds = modelzoo.sample_feeds()
    expected = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    out = tmp_path / "big" / "decoded.onnx"
    out.parent.mkdir()
    for _ in range(2):  # a second save replaces the pair: the same data file name (named by its content), no leftovers
        model = moub_runtime.load(path)
        save_onnx(model, out, external_threshold=1000)
        names = sorted(p.name for p in out.parent.iterdir())
        assert len(names) == 2 and names[0] == "decoded.onnx" and re.fullmatch(r"decoded\.onnx\.[0-9a-f]{16}\.data", names[1])
        data = out.parent / names[1]
        size = data.stat().st_size
    assert out.stat().st_size < size
    external = [s.tensor for s in tensor_sites(onnx.load(out, load_external_data=False)).values()
                if s.tensor.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 8  # initializers, subgraph initializers and Constant values alike
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {data.name}
    onnx.checker.check_model(str(out))
    reloaded = onnx.load(out)
    for site_path, site in tensor_sites(reference).items():
        assert onnx.numpy_helper.to_array(tensor_sites(reloaded)[site_path].tensor).tobytes() == \
            onnx.numpy_helper.to_array(site.tensor).tobytes(), site_path
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threshold", [1000, None])
def test_decode_to_onnx_streams_a_large_model_to_its_data_file(packed, tmp_path, threshold):
    """``moub decode``: with the threshold lowered, every stored tensor goes to the data file as
    it is decoded (no whole model in memory); the files load and run like ``load``'s model."""
    from moub_runtime import decode_to_onnx

    _, _, _, path = packed
    reference = moub_runtime.load(path)
    out = tmp_path / "out" / "decoded.onnx"
    out.parent.mkdir()
    for _ in range(2):  # a second decode replaces both files
        if threshold is None:
            decode_to_onnx(path, out)
        else:
            decode_to_onnx(path, out, external_threshold=threshold)
    names = sorted(p.name for p in out.parent.iterdir())
    if threshold is None:
        assert names == ["decoded.onnx"]
        assert out.read_bytes() == reference.SerializeToString()
        return
    assert len(names) == 2 and names[0] == "decoded.onnx" and re.fullmatch(r"decoded\.onnx\.[0-9a-f]{16}\.data", names[1])
    skeleton = onnx.load(out, load_external_data=False)
    external = [s.tensor for s in tensor_sites(skeleton).values() if s.tensor.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 8 and all(t.name for t in external)
    onnx.checker.check_model(str(out))
    reloaded = onnx.load(out)
    for site_path, site in tensor_sites(reference).items():
        assert onnx.numpy_helper.to_array(tensor_sites(reloaded)[site_path].tensor).tobytes() == \
            onnx.numpy_helper.to_array(site.tensor).tobytes(), site_path
    feeds = modelzoo.sample_feeds()
    expected = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_decode_to_onnx_leaves_nothing_behind_on_a_bad_file(packed, tmp_path):
    from moub_format.errors import MoubFormatError
    from moub_runtime import decode_to_onnx

    _, _, _, path = packed
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the last payload blob: its checksum fails while decoding
    bad = tmp_path / "bad.moub"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out" / "decoded.onnx"
    out.parent.mkdir()
    with pytest.raises(MoubFormatError):
        decode_to_onnx(bad, out, external_threshold=1000)
    assert list(out.parent.iterdir()) == []


def test_small_models_are_saved_whole(packed, tmp_path):
    from moub_runtime import save_onnx

    _, _, _, path = packed
    out = tmp_path / "small.onnx"
    save_onnx(moub_runtime.load(path), out)
    assert [p.name for p in tmp_path.iterdir()] == ["small.onnx"]
    assert onnx.load(out).SerializeToString() == moub_runtime.load(path).SerializeToString()


def test_session_frees_decoded_weights_only_when_it_owns_the_options(packed):
    from moub_runtime.loader import ort_copies_external_initializers

    _, _, _, path = packed
    feeds = modelzoo.sample_feeds()
    own = moub_runtime.InferenceSession(path)
    given = moub_runtime.InferenceSession(path, sess_options=ort.SessionOptions())
    np.testing.assert_array_equal(own.run(None, feeds)[0], given.run(None, feeds)[0])
    assert given._moub_arrays  # the caller's options object points at them: they stay
    assert all(a.ctypes.data % 64 == 0 for a in given._moub_arrays)
    if ort_copies_external_initializers():
        assert own._moub_arrays == [] and own._moub_weights == []
        with pytest.raises(NotImplementedError, match="cannot switch providers"):
            own.set_providers(["CPUExecutionProvider"])
        np.testing.assert_array_equal(own.run(None, feeds)[0], given.run(None, feeds)[0])
    else:  # onnxruntime reads the decoded arrays in place: the session holds them
        assert own._moub_arrays
        own.set_providers(["CPUExecutionProvider"])  # re-creates the session from the same arrays
        np.testing.assert_array_equal(own.run(None, feeds)[0], given.run(None, feeds)[0])


def test_onnxruntime_uses_decoded_weights_in_place_where_it_can():
    """onnxruntime 1.32 borrows in-memory initializer files (no second copy of the weights);
    releases without the binding or the config entry copy them, and the loader knows it."""
    from moub_runtime.loader import _has_in_memory_files, ort_copies_external_initializers

    version = tuple(int(p) for p in ort.__version__.split(".")[:2])
    if _has_in_memory_files() and version >= (1, 32):
        assert not ort_copies_external_initializers()
    if not _has_in_memory_files():
        assert ort_copies_external_initializers()


def test_callers_options_keep_the_weights_alive_as_long_as_they_live(packed):
    """A caller's options object points at the decoded arrays (onnxruntime's API keeps raw
    pointers there): they must outlive the session while the options can build another."""
    import gc
    import weakref

    _, _, _, path = packed
    feeds = modelzoo.sample_feeds()
    expected = moub_runtime.InferenceSession(path).run(None, feeds)[0]
    options = ort.SessionOptions()
    session = moub_runtime.InferenceSession(path, sess_options=options)
    arrays = [weakref.ref(a.base if a.base is not None else a) for a in session._moub_arrays]
    del session
    gc.collect()
    assert all(r() is not None for r in arrays)
    from moub_runtime.loader import _has_in_memory_files

    if _has_in_memory_files():
        again = moub_runtime.InferenceSession(path, sess_options=options)  # a second session from the same options
        np.testing.assert_array_equal(again.run(None, feeds)[0], expected)
        del again
    else:  # OrtValues of the same names cannot be added twice: a clear error, not onnxruntime's
        with pytest.raises(ValueError, match="new SessionOptions for each session"):
            moub_runtime.InferenceSession(path, sess_options=options)
    del options
    gc.collect()
    assert all(r() is None for r in arrays)


def test_decode_threads_and_shift_fallback_agree_bit_for_bit(packed, monkeypatch):
    """Decoding on several threads, in small windows, with the lane decoder's shift
    fallback (platforms where a uint64 shift by 64 is not 0) all give the same bytes."""
    from moub_format import MoubFile, lanes, reader

    _, _, _, path = packed

    def decode(**kwargs) -> dict[str, bytes]:
        with MoubFile(path, **kwargs) as moub:
            return {info.path: array.tobytes() for info, array in moub.iter_tensors()}

    reference = decode()
    monkeypatch.setattr(reader, "MIN_LANES", 0)
    monkeypatch.setattr(reader, "CONCURRENT_CHECK_BYTES", 0)  # checksums beside decoding
    monkeypatch.setattr(lanes, "BLOCK_STEPS", 3)  # many blocks, copied out by a helper thread
    assert decode(decode_workers=2, batch_elements=1 << 25) == reference
    monkeypatch.setattr(reader, "MIN_LANES_PER_WORKER", 1)  # lanes split between threads
    assert decode(decode_workers=3, batch_elements=1 << 25) == reference
    assert decode(batch_elements=700) == reference
    monkeypatch.setattr(lanes, "SHIFTS_SATURATE", not lanes.SHIFTS_SATURATE)
    assert decode(decode_workers=2) == reference


def test_mixed_chunk_lengths_do_not_blow_up_the_output_buffer(tmp_path, monkeypatch):
    """One tensor of 2**16-element chunks beside hundreds of 3-element tensors: the small
    ones decode in their own group, so no row of 2**16 elements is allocated for each."""
    from moub_format import MoubFile, reader
    from moub_format.writer import HuffmanTensor, build

    rng = np.random.default_rng(5)
    codebook = np.linspace(-1, 1, 16, dtype=np.float32)
    tensors = [HuffmanTensor("init:big", "big", 1, (1 << 17,), rng.integers(0, 16, 1 << 17), 0)]
    tensors += [HuffmanTensor(f"init:t{i}", f"t{i}", 1, (3,), rng.integers(0, 16, 3), 0) for i in range(300)]
    path = tmp_path / "mixed.moub"
    path.write_bytes(build(b"", [codebook], tensors, chunk_elements=1 << 16))
    sizes = []
    allocate = reader._aligned_empty

    def recording(shape, dtype, alignment=64):
        array = allocate(shape, dtype, alignment)
        sizes.append(array.size)
        return array

    monkeypatch.setattr(reader, "_aligned_empty", recording)
    monkeypatch.setattr(reader, "MIN_LANES", 0)  # the lane decoder even for few lanes
    with MoubFile(path, batch_elements=1 << 25) as moub:
        decoded = {info.path: array for info, array in moub.iter_tensors()}
    for spec in tensors:
        assert decoded[spec.path].tobytes() == codebook[spec.indices].tobytes()
    assert max(sizes) <= 2 * ((1 << 17) + 300 * 16)


def test_onnxruntime_without_in_memory_files_gets_ortvalues(packed, monkeypatch):
    """Releases before the in-memory files binding (the pyproject floor, 1.19) get the
    weights as OrtValues through add_external_initializers: same outputs."""
    from moub_runtime import loader

    _, _, _, path = packed
    feeds = modelzoo.sample_feeds()
    expected = moub_runtime.InferenceSession(path).run(None, feeds)
    monkeypatch.setattr(loader, "_has_in_memory_files", lambda: False)
    loader.ort_copies_external_initializers.cache_clear()
    try:
        copies = loader.ort_copies_external_initializers()
        for options in (None, ort.SessionOptions()):
            session = moub_runtime.InferenceSession(path, sess_options=options, decode_workers=1)
            assert session._moub_weights or (copies and options is None)
            for got, want in zip(session.run(None, feeds), expected):
                np.testing.assert_array_equal(got, want)
        with pytest.raises(ValueError, match="new SessionOptions for each session"):
            moub_runtime.InferenceSession(path, sess_options=options)
    finally:
        loader.ort_copies_external_initializers.cache_clear()


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_stream_is_a_checksum_error_even_when_hashed_beside_decoding(packed, tmp_path, monkeypatch, workers):
    """With several decode_workers the checksums are computed on other threads while
    the lanes decode; a corrupt stream must still be reported as a checksum mismatch."""
    from moub_format import ChecksumError, MoubFile, reader
    from moub_format import constants as C

    _, _, _, path = packed
    monkeypatch.setattr(reader, "CONCURRENT_CHECK_BYTES", 0)
    monkeypatch.setattr(reader, "MIN_LANES", 0)
    data = bytearray(path.read_bytes())
    with MoubFile(path) as moub:
        victim = max((t for t in moub.index.tensors if t.encoding == C.ENCODING_HUFFMAN), key=lambda t: t.data.length)
        position = moub.index.payload_offset + victim.data.offset + victim.data.length // 2
    data[position] ^= 0x5A
    bad = tmp_path / "bad.moub"
    bad.write_bytes(bytes(data))
    with MoubFile(bad, decode_workers=workers) as moub:
        with pytest.raises(ChecksumError, match="checksum mismatch"):
            for _ in moub.iter_tensors():
                pass
