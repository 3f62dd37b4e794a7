"""Converter intake and the fixed-bins encoder: weights everywhere, dtypes, external data,
pass-through of what is not a weight, and bit-exact decode through moub_runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import modelzoo
import moub_runtime
from moub_converters import convert
from moub_converters.encode import dequantize
from moub_converters.errors import ModelError
from moub_converters import binning
from moub_converters.intake import REASON_NON_FINITE, REASON_NON_FLOAT, REASON_SMALL, load_source, pool_weights
from moub_format import dtypes
from moub_runtime.sites import tensor_sites

K = 40


def _stored(tensor: onnx.TensorProto) -> np.ndarray:
    return np.frombuffer(tensor.raw_data, dtype=dtypes.STORAGE_DTYPES[tensor.data_type])


def test_pool_covers_every_site_kind_once():
    model = modelzoo.everything_model()
    pool = pool_weights(model, min_elements=1024)
    by_name = {s.name: s for s in pool.sites}
    # main-graph initializers (shared one once), Constant node, If/Loop subgraphs, function Constant
    assert set(by_name) == {"W_shared", "W_half", "W_bf16", "W_double", "C", "W_then", "W_loop", "fn_weight"}
    assert sum(1 for s in pool.sites if s.name == "W_shared") == 1
    assert {by_name[n].dtype for n in ("W_half", "W_bf16", "W_double")} == {TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    assert pool.n_weights == 8 * modelzoo.N * modelzoo.N
    assert pool.passthrough["init:small_bias"] == REASON_SMALL
    assert pool.passthrough["init:trips"] == REASON_NON_FLOAT
    assert pool.passthrough["init:table"] == REASON_NON_FLOAT
    # pooled values are the tensors' own values, widened to float32 exactly
    sites = tensor_sites(model)
    for site in pool.sites:
        expected = modelzoo.tensor_as_float32(sites[site.path].tensor).ravel()
        np.testing.assert_array_equal(pool.values[site.start : site.stop], expected)


def test_a_tensor_with_non_finite_values_stays_out_of_the_pool_and_the_rest_close_up():
    model = modelzoo.everything_model()
    sites = tensor_sites(model)
    bad = sites["init:W_half"].tensor
    values = numpy_helper.to_array(bad).copy()
    values[3, 5] = np.inf
    bad.CopyFrom(numpy_helper.from_array(values, bad.name))
    pool = pool_weights(model, min_elements=1024)
    assert pool.passthrough["init:W_half"] == REASON_NON_FINITE
    assert "W_half" not in {s.name for s in pool.sites}
    assert pool.n_weights == 7 * modelzoo.N * modelzoo.N == pool.values.size
    assert [(s.start, s.stop) for s in pool.sites] == [(i * modelzoo.N**2, (i + 1) * modelzoo.N**2) for i in range(7)]
    for site in pool.sites:
        expected = modelzoo.tensor_as_float32(sites[site.path].tensor).ravel()
        np.testing.assert_array_equal(pool.values[site.start : site.stop], expected)
    # reasons are listed in site order, as the report shows them
    order = [path for path in tensor_sites(model) if path in pool.passthrough]
    assert list(pool.passthrough) == order


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 70000), st.integers(0, 2**32 - 1), st.sampled_from([1, 7, 1000]))
def test_binning_a_slice_at_a_time_is_binning_in_one_pass(n, k, seed, slice_elements):
    values = (np.random.default_rng(seed).standard_normal(n) * 3).astype(np.float32)
    whole = binning.uniform_binning(values, k)  # every pool here fits in one slice
    old = binning.SLICE_ELEMENTS
    binning.SLICE_ELEMENTS = slice_elements
    try:
        sliced = binning.uniform_binning(values, k)
    finally:
        binning.SLICE_ELEMENTS = old
    assert sliced.indices.dtype == whole.indices.dtype
    for field in ("codebook", "indices", "counts", "sums", "lows", "highs"):
        assert np.array_equal(getattr(sliced, field), getattr(whole, field)), field  # the same bits


def test_fixed_bins_round_trip_is_bit_exact(tmp_path):
    model = modelzoo.everything_model()
    result = convert(model, bins=K, min_elements=256)
    path = tmp_path / "everything.moub"
    assert result.write(path) == path.stat().st_size == len(result.moub_bytes)
    # an independent equal-width binning (tests/modelzoo.py) gives the same codebook and indices
    codebook, assignments = modelzoo.equal_width_assignments(model, K, min_elements=256)
    decoded = tensor_sites(moub_runtime.load(path))
    original = tensor_sites(model)
    for site_path, assignment in assignments.items():
        tensor = decoded[site_path].tensor
        assert tensor.data_type == original[site_path].tensor.data_type  # fp16/bf16/fp64 restored
        assert _stored(tensor).tobytes() == dequantize(codebook, assignment.indices, tensor.data_type).tobytes(), site_path
    # everything not pooled is byte-identical
    for site_path, site in original.items():
        if site_path not in assignments:
            assert decoded[site_path].tensor.SerializeToString(deterministic=True) == site.tensor.SerializeToString(deterministic=True)
    feeds = modelzoo.sample_feeds()
    got = moub_runtime.InferenceSession(path).run(None, feeds)
    assert got[0].shape == (1, modelzoo.N)
    assert result.report["choice"]["bins"] == codebook.size
    assert [r["stage"] for r in result.report["stages"]] == ["binning", "+Huffman"]
    assert result.report["stages"][-1]["file_bytes"] == len(result.moub_bytes)


def test_external_data_is_resolved_and_counted(tmp_path):
    model = modelzoo.everything_model()
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(model, folder / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=512)
    source = load_source(folder / "model.onnx")
    assert source.original_bytes == (folder / "model.onnx").stat().st_size + (folder / "weights.bin").stat().st_size
    result = convert(folder / "model.onnx", bins=16, min_elements=256)
    inline = convert(modelzoo.everything_model(), bins=16, min_elements=256)  # save_model moved model's data out
    # same weights, same quantization: identical tensors (the provenance differs: sha256 of the files)
    out = tmp_path / "ext.moub"
    result.write(out)
    a = dict(moub_runtime.decode_tensors(out))
    out2 = tmp_path / "inline.moub"
    inline.write(out2)
    b = dict(moub_runtime.decode_tensors(out2))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    moub_runtime.InferenceSession(out).run(None, modelzoo.sample_feeds())


def test_external_data_missing_is_a_model_error(tmp_path):
    model = modelzoo.everything_model()
    onnx.save_model(model, tmp_path / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=512)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelError, match="external data"):
        load_source(tmp_path / "model.onnx")


def _resize_model(n: int) -> onnx.ModelProto:
    """A Resize whose float scales tensor is big enough to be pooled if it were a weight."""
    scales = numpy_helper.from_array(np.ones(4, dtype=np.float32) * 2, "scales")
    weight = numpy_helper.from_array(np.linspace(-1, 1, n * n, dtype=np.float32).reshape(1, 1, n, n), "W")
    clip_min = numpy_helper.from_array(np.array(-0.5, dtype=np.float32), "lo")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "W"], ["a"]),
            helper.make_node("Clip", ["a", "lo", ""], ["c"]),
            helper.make_node("Resize", ["c", "", "scales"], ["y"], mode="nearest"),
        ],
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 2 * n, 2 * n])],
        [scales, weight, clip_min],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_shape_scale_and_bound_inputs_are_not_weights():
    pool = pool_weights(_resize_model(8), min_elements=1)
    assert [s.name for s in pool.sites] == ["W"]
    assert pool.passthrough["init:scales"].startswith("not a weight (Resize input 2)")
    assert pool.passthrough["init:lo"].startswith("not a weight (Clip input 1)")


@pytest.mark.parametrize("mode", ["paper", "adaptive"])
def test_resize_model_converts_with_scales_untouched(tmp_path, mode):
    """The Resize also doubles the batch axis: output rows are not samples (the adaptive mode's
    data halves and sensitivity subsets run the original again instead of slicing rows)."""
    model = _resize_model(32)
    x = np.random.default_rng(0).standard_normal((20, 1, 32, 32)).astype(np.float32)
    result = convert(model, data={"x": x}, mode=mode, min_elements=1, max_drop=0.01, population=6, generations=3,
                     merge_budget=4, batch_size=8)
    assert result.report["metric"] == "l2"  # a map, not class scores: its relative L2 error
    path = tmp_path / "r.moub"
    result.write(path)
    decoded = tensor_sites(moub_runtime.load(path))
    assert numpy_helper.to_array(decoded["init:scales"].tensor).tolist() == [2.0, 2.0, 2.0, 2.0]
    assert result.report["loss"] <= 0.01
