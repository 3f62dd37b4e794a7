"""Sample data read from its file a batch at a time: the same samples as in memory, in the same
order, whatever way numpy stored them, and a worker receives where they are, not the values."""

from __future__ import annotations

import gc
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moub_converters.data import load_dataset
from moub_converters.errors import OutputError
from moub_converters.stored import RowWriter, StoredArray, TemporaryFolder

import user_models


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stored-data")


def _batches(dataset) -> list[dict[str, np.ndarray]]:
    return [{k: np.array(v) for k, v in feeds.items()} for _, feeds in dataset.batches()]


def _same_batches(a, b) -> None:
    left, right = _batches(a), _batches(b)
    assert len(left) == len(right)
    for x, y in zip(left, right):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k])


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_a_data_file_reads_the_same_samples_as_the_arrays_in_memory(folder, tmp_path, save):
    model = user_models.streaming_vad(folder)
    proto = onnx.load(model.path)
    path = tmp_path / "data.npz"
    save(path, **model.search)
    from_file = load_dataset(path, proto)
    in_memory = load_dataset(dict(model.search), proto)
    assert isinstance(from_file.inputs["input"], StoredArray)
    assert isinstance(from_file.inputs["state"], StoredArray) and from_file.axis("state") == 1  # samples on axis 1
    assert from_file.n_samples == in_memory.n_samples
    _same_batches(from_file, in_memory)
    picked = from_file.spread(5)
    _same_batches(from_file.take(picked), in_memory.take(picked))
    _same_batches(from_file.take(np.arange(1, from_file.n_samples, 2)),
                  in_memory.take(np.arange(1, in_memory.n_samples, 2)))


def _regressor_data(folder: Path, tmp_path: Path, save) -> tuple[Path, object]:
    """The regressor's search samples written by ``save`` (np.savez or np.savez_compressed), loaded."""
    model = user_models.regressor(folder)
    path = tmp_path / "data.npz"
    save(path, **model.search)
    return path, load_dataset(path, onnx.load(model.path))


def test_a_worker_receives_where_the_data_is_not_the_data(folder, tmp_path):
    path, dataset = _regressor_data(folder, tmp_path, np.savez)
    payload = pickle.dumps(dataset, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(payload) < path.stat().st_size / 4
    _same_batches(pickle.loads(payload), dataset)


def test_an_inflated_copy_lives_as_long_as_the_data(folder, tmp_path):
    path, dataset = _regressor_data(folder, tmp_path, np.savez_compressed)
    half = dataset.take(np.arange(0, dataset.n_samples, 2))
    copy = Path(dataset.inputs["x"].path)
    assert copy.exists() and copy.parent != path.parent
    del dataset
    gc.collect()
    assert copy.exists() and _batches(half)  # the half still reads from it
    del half
    gc.collect()
    assert not copy.parent.exists()


def test_a_cast_and_a_fortran_array_read_like_numpy(folder, tmp_path):
    model = user_models.regressor(folder)
    proto = onnx.load(model.path)
    x = np.asfortranarray(model.search["x"].astype(np.float64))
    path = tmp_path / "data.npz"
    np.savez(path, x=x)
    dataset = load_dataset(path, proto)
    assert dataset.inputs["x"].dtype == np.float32 and any("float64" in n for n in dataset.notes)
    _same_batches(dataset, load_dataset({"x": x}, proto))


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), axis_seed=st.integers(0, 3),
       fortran=st.booleans(), picks=st.lists(st.integers(0, 4), max_size=8), start=st.integers(0, 5))
def test_reads_match_numpy_for_any_layout(tmp_path_factory, shape, axis_seed, fortran, picks, start):
    values = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    values = np.asfortranarray(values) if fortran else values
    path = tmp_path_factory.mktemp("npy") / "a.npy"
    np.save(path, values)
    header = path.stat().st_size - values.nbytes  # the values end the file
    axis = axis_seed % len(shape)
    stored = StoredArray(str(path), header, values.dtype, tuple(shape), fortran).along(axis)
    assert np.array_equal(np.asarray(stored), values)
    rows = np.array([p % shape[axis] for p in picks], np.int64)
    chosen = stored.select(rows)
    expect = np.take(values, rows, axis=axis)
    assert chosen.shape == expect.shape and np.array_equal(np.asarray(chosen), expect)
    stop = start + 2
    sliced = np.take(expect, np.arange(min(start, rows.size), min(stop, rows.size)), axis=axis)
    assert np.array_equal(chosen.read(start, stop), sliced)


def test_page_sized_samples_run_one_at_a_time(tmp_path):
    """Two samples per run, except where one sample's inputs take 4 MiB or more (a page-sized
    image), whose activations would set the converter's memory; --batch-size still wins."""
    from onnx import TensorProto, helper

    from moub_converters.data import DEFAULT_BATCH_SIZE, LARGE_SAMPLE_BYTES

    def image_model(side: int) -> onnx.ModelProto:
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, side, side])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, side, side])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    small, large = 64, 640  # 48 KiB and 4.7 MiB per sample
    assert 3 * large * large * 4 >= LARGE_SAMPLE_BYTES > 3 * small * small * 4
    for side, expected in ((small, DEFAULT_BATCH_SIZE), (large, 1)):
        path = tmp_path / f"x{side}.npz"
        np.savez(path, x=np.zeros((3, 3, side, side), np.float32))
        assert load_dataset(path, image_model(side)).batch_size == expected
        assert load_dataset(path, image_model(side), batch_size=3).batch_size == 3


def test_rows_written_batch_by_batch_read_back_as_one_array():
    """The original's outputs go to a file as the batches come: reading any rows, a selection or the
    pickled array (as a worker gets it) gives the concatenated batches' values."""
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3, 4)).astype(np.float32) for n in (2, 2, 1, 0, 2)]
    whole = np.concatenate(batches)
    folder = TemporaryFolder("moub-test-")
    writer = RowWriter(folder)
    for batch in batches:
        writer.append(batch)
    stored = writer.stored()
    assert stored.shape == whole.shape and stored.dtype == whole.dtype
    assert np.array_equal(np.asarray(stored), whole) and np.array_equal(stored[2:6], whole[2:6])
    assert np.array_equal(stored[::2], whole[::2])  # any other index reads the whole array first
    picked = np.array([0, 2, 4, 6])
    assert np.array_equal(np.asarray(stored.select(picked)), whole[picked])
    assert np.array_equal(np.asarray(pickle.loads(pickle.dumps(stored))), whole)
    with pytest.raises(ValueError, match="changes its shape"):
        writer2 = RowWriter(folder)
        writer2.append(whole)
        writer2.append(whole[:, :2])
    path = folder.path
    del stored, writer, writer2, folder
    gc.collect()
    assert not path.exists()  # the folder goes with the last array reading it


def test_a_temporary_folder_that_cannot_be_written_is_an_output_error(tmp_path):
    folder = TemporaryFolder()
    folder.path = tmp_path / "removed"  # made once, then gone
    with pytest.raises(OutputError, match="set TMPDIR"):
        RowWriter(folder)
