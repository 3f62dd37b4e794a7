"""The streamed writer and the windowed raw-tensor reader: the same bytes and values as
the in-memory paths, in pieces (files beyond 4 GiB: ``benchmarks/bigfile.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import modelzoo
import packing
from moub_converters.encode import encode_model, write_model
from moub_format import MoubFile, huffman, reader, writer
from moub_format import constants as C
from moub_format.errors import ChecksumError
from moub_format.writer import OWN, SMALLEST, HuffmanTensor, RawTensor

GROUPS = [["init:W_shared", "init:W_half", "node:0/value"], ["init:W_bf16", "init:W_double"]]


def _raw_file_parts(data) -> tuple[bytes, list[writer.GridCodebook], list]:
    """A graph-free file of one raw tensor and one Huffman tensor (the writer does not parse graphs)."""
    rng = np.random.default_rng(3)
    indices = rng.integers(0, 40, 5000)
    tensors = [
        RawTensor("init:a_raw", "a_raw", 2, (len(memoryview(data).cast("B")),), data),  # 2 = UINT8
        HuffmanTensor("init:b_coded", "b_coded", 1, (indices.size,), indices, 0),
    ]
    return b"not parsed by the writer", [writer.GridCodebook(-20, 40)], tensors


def test_write_streams_the_bytes_build_returns(tmp_path):
    model = modelzoo.everything_model()
    codebooks, packs = packing.uniform_packs(model, GROUPS, divisor=16.0, table=OWN)
    options = {"graph_codec": C.CODEC_LZMA, "raw_codec": SMALLEST}
    built = encode_model(model, codebooks, {}, {"source": "streamed"}, packs=packs, **options)
    path = tmp_path / "streamed.moub"
    size = write_model(path, model, codebooks, {}, {"source": "streamed"}, packs=packs, **options)
    assert size == len(built) and path.read_bytes() == built
    assert [p.name for p in tmp_path.iterdir()] == ["streamed.moub"]  # no temporary file left


def test_a_raw_tensor_given_as_an_array_or_a_view_is_not_copied_and_writes_the_same_bytes(tmp_path):
    table = np.arange(3 * 4096, dtype=np.int64).astype(np.uint8)
    as_bytes = writer.build(*_raw_file_parts(table.tobytes()))
    assert writer.build(*_raw_file_parts(table)) == as_bytes
    assert writer.build(*_raw_file_parts(memoryview(table))) == as_bytes
    pieces = writer.assemble(*_raw_file_parts(table))
    assert any(isinstance(p, memoryview) and p.obj is table for p in pieces)  # the caller's buffer itself
    path = tmp_path / "raw.moub"
    assert writer.write(path, *_raw_file_parts(table)) == len(as_bytes) and path.read_bytes() == as_bytes


def test_a_write_that_fails_midway_leaves_no_file(tmp_path):
    def pieces():
        yield b"head"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        writer.write_atomic(tmp_path / "out.moub", pieces())
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=600), st.integers(1, 400), st.sampled_from([1, 7, 64]))
def test_symbol_counts_are_bincounts(values, minlength, slice_elements):
    old = huffman.ENCODE_SLICE_ELEMENTS
    huffman.ENCODE_SLICE_ELEMENTS = slice_elements  # counts across many slices
    try:
        indices = np.asarray(values, dtype=np.uint16)
        assert np.array_equal(writer.symbol_counts(indices, minlength), np.bincount(indices, minlength=minlength))
    finally:
        huffman.ENCODE_SLICE_ELEMENTS = old


@pytest.fixture()
def small_windows(monkeypatch):
    monkeypatch.setattr(reader, "RAW_COPY_WINDOW", 4096)


def test_raw_tensors_copied_in_windows_decode_the_same(tmp_path, small_windows):
    table = (np.arange(10 * 4096 + 123, dtype=np.int64) * 7).astype(np.uint8)  # windows, then a ragged end
    path = tmp_path / "raw.moub"
    writer.write(path, *_raw_file_parts(table))
    with MoubFile(path) as moub:
        (raw,) = [t for t in moub.index.tensors if t.path == "init:a_raw"]
        assert np.array_equal(moub.decode_tensor(raw), table)
        assert np.array_equal(moub.decode_tensor(raw), table)  # pages let go of come back on a second read


def test_a_corrupt_byte_in_a_late_window_is_caught(tmp_path, small_windows):
    table = np.zeros(10 * 4096, dtype=np.uint8)
    path = tmp_path / "raw.moub"
    writer.write(path, *_raw_file_parts(table))
    with MoubFile(path) as moub:
        (raw,) = [t for t in moub.index.tensors if t.path == "init:a_raw"]
        late = moub.index.payload_offset + raw.data.offset + 9 * 4096 + 5
    data = bytearray(path.read_bytes())
    data[late] ^= 1
    path.write_bytes(bytes(data))
    with MoubFile(path) as moub:
        (raw,) = [t for t in moub.index.tensors if t.path == "init:a_raw"]
        with pytest.raises(ChecksumError, match="init:a_raw.*checksum mismatch"):
            moub.decode_tensor(raw)


def test_the_bigfile_model_runs_from_windows_of_its_raw_table(tmp_path, small_windows):
    """benchmarks/bigfile.py at 40 KB: a raw uint8 table copied in 10 windows, a pack after it."""
    from benchmarks import bigfile

    path = tmp_path / "big.moub"
    written = bigfile.write_file(path, 40 * 4096 / 2**30)
    result = bigfile.check_file(path, written["rows"], written["weights"])
    assert result["matches"] and result["pack_start"] > 40 * 4096
