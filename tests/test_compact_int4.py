"""Compact sessions holding MatMul/Gemm weights as 4-bit levels: the packing ONNX defines, which
weights qualify, onnxruntime's 4-bit MatMulNBits fusion, outputs against the normal session,
``moub decode --compact``/``moub inspect``, hostile files, and ``--ram int4`` on a torch model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import moub_runtime
import packing
from moub_converters.encode import encode_model
from moub_format import MoubFormatError, ReaderLimits
from moub_format.writer import write_atomic
from moub_runtime.compact import (EIGHT_BIT_MATMUL_REASON, MATMUL_NBITS_BLOCK, ZERO_POINT_4, CompactTensor, FOUR_BIT_TYPES, four_bit_weights, level_type,
                                  matmul_nbits_weight, plan_compact)
from moub_runtime.conv_layout import convs_run_in_nchwc
from moub_runtime.inspect import summarize
from moub_runtime.loader import MATMULNBITS_ACCURACY_KEY, MATMULNBITS_FLOAT32, consumed_names
from moub_runtime.validation import open_checked
from test_compact import RELATIVE_BOUND, _attributes, _weights_from_compact

FLOAT = onnx.TensorProto.FLOAT
WIDTHS = (64, 128, 128, 10)


def _mlp(opset: int, transposed_middle: bool = False) -> tuple[onnx.ModelProto, list[int]]:
    """Three Linear layers with ReLU on a ``[2, 4, 64]`` input (MatMul + Add, weights ``[K, N]``);
    ``transposed_middle``: a ``[4, 64]`` input, the middle layer a Gemm with transB = 1."""
    rng = np.random.default_rng(0)
    shape = [4, WIDTHS[0]] if transposed_middle else [2, 4, WIDTHS[0]]
    nodes, inits, previous = [], [], "x"
    for i in range(3):
        w = rng.uniform(-1, 1, (WIDTHS[i], WIDTHS[i + 1])).astype(np.float32)
        inits.append(numpy_helper.from_array((rng.standard_normal(WIDTHS[i + 1]) * 0.1).astype(np.float32), f"b{i}"))
        out = f"a{i}" if i < 2 else "y"
        if transposed_middle and i == 1:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
            nodes.append(helper.make_node("Gemm", [previous, f"w{i}", f"b{i}"], [out], transB=1))
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [out])]
        if i < 2:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            previous = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", FLOAT, shape)],
                              [helper.make_tensor_value_info("y", FLOAT, shape[:-1] + [WIDTHS[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    return model, shape


def _write_mlp(tmp_path: Path, opset: int, transposed_middle: bool = False) -> tuple[Path, list[int]]:
    """The MLP with each weight its own pack at step std/4 (levels within about +-7: 4 bits),
    the biases one shared pack."""
    model, shape = _mlp(opset, transposed_middle)
    groups = [["init:w0"], ["init:w1"], ["init:w2"], ["init:b0", "init:b1", "init:b2"]]
    codebooks, packs = packing.uniform_packs(model, groups, divisor=4.0)
    path = tmp_path / f"mlp{opset}.moub"
    write_atomic(path, encode_model(model, codebooks, {}, {"moub.source": "mlp"}, packs=packs))
    return path, shape


def _fused(path: Path, tmp_path: Path) -> list[onnx.NodeProto]:
    """The nodes of the compact session's model as onnxruntime optimized it."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    moub_runtime.InferenceSession(path, sess_options=options, compact=True)
    return list(onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)


def _bits(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "bits")


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("k, n", [(1, 1), (7, 3), (128, 2), (129, 5), (300, 17)])
def test_matmul_nbits_weight_is_onnxruntimes_layout(k, n, transposed):
    """B of a MatMulNBits: per column, K levels in blocks, two a byte (the first low), the last
    block padded with the zero point; onnxruntime multiplies by exactly those weights."""
    rng = np.random.default_rng(k * n)
    levels = rng.integers(0, 16, (k, n)).astype(np.uint8)
    planned = CompactTensor(FOUR_BIT_TYPES[1], 3, 0, 15, None, k, n, transposed)
    packed = matmul_nbits_weight(np.ascontiguousarray(levels.T) if transposed else levels, planned)
    blocks = -(-k // MATMUL_NBITS_BLOCK)
    assert packed.shape == (n, blocks, MATMUL_NBITS_BLOCK // 2) and packed.ctypes.data % 64 == 0
    unpacked = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)
    assert np.array_equal(unpacked[:, :k], levels.T) and np.all(unpacked[:, k:] == 3)
    scale = np.float32(0.25)
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=MATMUL_NBITS_BLOCK, accuracy_level=1)
    zero = np.full(n * -(-blocks // 2), 3 * 17, dtype=np.uint8)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", FLOAT, [2, n])],
                              [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(np.full(n * blocks, scale), "s"),
                               numpy_helper.from_array(zero, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    x = rng.standard_normal((2, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = x @ ((levels.astype(np.float32) - 3) * scale)
    assert np.abs(y - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("low, high, expected", [(-8, 7, ("int4", 0)), (-7, 7, ("int4", 0)), (0, 15, ("int4", -8)),
                                                 (-15, 0, ("int4", 7)), (-1, 14, ("int4", -7)), (0, 16, ("int8", 0)),
                                                 (-9, 7, ("int8", 0)), (-20, -5, ("int8", 0)), (3, 18, ("int8", 0))])
def test_four_bit_types_come_first_for_a_16_value_window(low, high, expected):
    """16 consecutive levels fit a 4-bit type where its zero point can bring them there: the
    window starts within [-15, 0] (the converter's --ram int4 windows start within [-14, -1])."""
    kind, zero_point = level_type(low, high, four_bit=True)
    assert (kind.name, zero_point) == expected
    assert kind.low <= low + zero_point and high + zero_point <= kind.high
    assert level_type(low, high)[0].name in ("int8", "uint8")  # other weights: never 4 bits


def test_which_weights_qualify_for_four_bits():
    def node(op, inputs, **attributes):
        return helper.make_node(op, inputs, [f"out_{op}_{'_'.join(inputs)}"], **attributes)

    graph = helper.make_graph([
        node("MatMul", ["x", "b_matmul"]),
        node("MatMul", ["a_matmul", "x"]),                       # the weight as the first input: not fused
        node("Gemm", ["x", "b_gemm", "c"]),
        node("Gemm", ["x", "b_transposed", "c"], transB=1),       # held transposed, transB cleared
        node("Gemm", ["x", "b_scaled", "c"], alpha=2.0),
        node("MatMul", ["x", "shared"]), node("Add", ["x", "shared"]),
        node("MatMul", ["x", "batched"]),
        node("MatMul", ["x", "output"]),
        node("MatMul", ["x", "tied"]), node("MatMul", ["y", "tied"]),  # two readers: not fused
    ], "g", [], [helper.make_tensor_value_info("output", FLOAT, None)])
    shapes = {name: [64, 32] for name in ("b_matmul", "a_matmul", "b_gemm", "b_scaled", "shared", "output", "c", "tied")}
    shapes["b_transposed"] = [32, 64]   # [N, K]
    assert four_bit_weights(graph, {**shapes, "batched": [2, 64, 32]}) == {"b_matmul", "b_gemm", "b_transposed"}
    few_rows = {**shapes, "b_matmul": [8, 32], "b_transposed": [64, 8]}   # K = 8: padded to 128 (matmul_nbits_fits)
    assert four_bit_weights(graph, few_rows) == {"b_gemm"}


def _check_matmul_nbits(path: Path, shape: list[int], tmp_path: Path, transposed: set[str] = frozenset()) -> onnx.ModelProto:
    """The compact model of the MLP at ``path``: every weight a MatMulNBits over 4-bit levels,
    the normal decode's weights bit for bit (transposed where read with transB), which
    onnxruntime runs as built; the outputs equal the normal session's within the bound."""
    compact = moub_runtime.load(path, compact=True)
    onnx.checker.check_model(compact)
    nodes = [n for n in compact.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 3 and all(n.domain == "com.microsoft" and _attributes(n)["bits"] == 4 for n in nodes)
    assert not any(n.op_type in ("MatMul", "Gemm") for n in compact.graph.node)
    names = {t.name for t in compact.graph.initializer}
    assert not names & {"w0", "w1", "w2"}
    normal = {t.name: numpy_helper.to_array(t) for t in moub_runtime.load(path).graph.initializer}
    weights = _weights_from_compact(compact)
    for i in range(3):
        expected = normal[f"w{i}"].T if f"w{i}" in transposed else normal[f"w{i}"]
        assert weights[f"w{i}"].tobytes() == np.ascontiguousarray(expected).tobytes()
    fused = [n for n in _fused(path, tmp_path) if n.op_type == "MatMulNBits"]
    assert len(fused) == 3 and {_bits(n) for n in fused} == {4}
    x = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    expected = moub_runtime.InferenceSession(path).run(None, x)[0]
    got = moub_runtime.InferenceSession(path, compact=True).run(None, x)[0]
    assert np.abs(got - expected).max() <= RELATIVE_BOUND * np.abs(expected).max()
    return compact


@pytest.mark.parametrize("opset", [21, 17])
def test_matmul_weights_become_four_bit_matmul_nbits(opset, tmp_path):
    """Whatever the model's opset, each MatMul reading a 4-bit weight becomes onnxruntime's
    MatMulNBits (it does not depend on onnxruntime's fusions, whose order lets a Gemm take an
    activation first); the biases, read by Add, stay int8 behind a DequantizeLinear."""
    path, shape = _write_mlp(tmp_path, opset)
    compact = _check_matmul_nbits(path, shape, tmp_path)
    types = {t.name: t.data_type for t in compact.graph.initializer}
    assert all(types[f"b{i}_quantized"] == onnx.TensorProto.INT8 for i in range(3))
    summary = summarize(path).compact
    weights = sum(WIDTHS[i] * WIDTHS[i + 1] for i in range(3))
    assert summary["held"]["uint4"]["weights"] == weights
    blocks = [-(-WIDTHS[i] // MATMUL_NBITS_BLOCK) for i in range(3)]
    nbits = sum(WIDTHS[i + 1] * blocks[i] * (MATMUL_NBITS_BLOCK // 2 + 4) for i in range(3))
    zero_points = sum(WIDTHS[i + 1] * -(-blocks[i] // 2) for i in range(3) if "w%d_zero_point" % i in types)
    assert summary["held_weight_bytes"] == nbits + zero_points + sum(WIDTHS[1:])


def test_a_transposed_gemm_weight_becomes_matmul_nbits_with_its_bias(tmp_path):
    """A Gemm with transB = 1 (torch's 2-D Linear) on a 2-D input, followed by a Relu: its levels
    are stored as MatMulNBits' columns directly (no transpose needed), its C added after."""
    path, shape = _write_mlp(tmp_path, 21, transposed_middle=True)
    with open_checked(path) as checked:
        plan = plan_compact(checked, consumed_names(checked.model), "fast")
        held = {checked.members[o].tensor.name: p for o, p in plan.planned.items()}
    assert all(held[f"w{i}"].level.name == "uint4" for i in range(3))
    assert held["w1"].transposed and not held["w0"].transposed
    compact = _check_matmul_nbits(path, shape, tmp_path, transposed={"w1"})
    adds = [n for n in compact.graph.node if n.op_type == "Add" and "b1" in n.input]
    assert len(adds) == 1 and adds[0].output[0] == "a1"


def test_eight_bit_matmul_weights_are_held_per_row_and_not_fused(tmp_path):
    """``compact="smallest"`` holds 8-bit MatMul weights with one scale per row, which onnxruntime
    does not fuse into its 8-bit MatMulNBits (slower than float32 and larger in memory once it
    runs): the DequantizeLinear runs before a float MatMul, and the outputs are the normal session's."""
    model, shape = _mlp(17)
    groups = [["init:w0"], ["init:w1"], ["init:w2"], ["init:b0", "init:b1", "init:b2"]]
    codebooks, packs = packing.uniform_packs(model, groups, divisor=32.0)   # levels within about +-60: 8 bits
    path = tmp_path / "mlp8.moub"
    write_atomic(path, encode_model(model, codebooks, {}, {"moub.source": "mlp"}, packs=packs))
    with open_checked(path) as checked:
        plan = plan_compact(checked, consumed_names(checked.model), "smallest")
        held = {checked.members[o].tensor.name: p for o, p in plan.planned.items()}
    assert all(held[f"w{i}"].level.bits == 8 and held[f"w{i}"].axis == 0 for i in range(3))
    compact = moub_runtime.load(path, compact="smallest")
    onnx.checker.check_model(compact)
    normal = {t.name: numpy_helper.to_array(t) for t in moub_runtime.load(path).graph.initializer}
    for name, weight in _weights_from_compact(compact).items():
        assert weight.tobytes() == normal[name].tobytes(), name
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    moub_runtime.InferenceSession(path, sess_options=options, compact="smallest")
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node]
    assert "MatMulNBits" not in ops and ops.count("DequantizeLinear") >= 3
    x = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    expected = moub_runtime.InferenceSession(path).run(None, x)[0]
    got = moub_runtime.InferenceSession(path, compact="smallest").run(None, x)[0]
    assert np.abs(got - expected).max() <= RELATIVE_BOUND * np.abs(expected).max()


def test_fast_keeps_every_eight_bit_matmul_and_gemm_weight_float(tmp_path):
    """``compact=True`` ("fast") keeps float the 8-bit weight of a Gemm with transB = 1 as it keeps a
    MatMul's: onnxruntime fuses neither into a kernel as fast as float32, and a Linear layer uses each
    weight once per row, so dequantizing at every run doubles its time; "smallest" holds all three."""
    model, shape = _mlp(17, transposed_middle=True)
    groups = [["init:w0"], ["init:w1"], ["init:w2"], ["init:b0", "init:b1", "init:b2"]]
    codebooks, packs = packing.uniform_packs(model, groups, divisor=32.0)
    path = tmp_path / "mlp8.moub"
    write_atomic(path, encode_model(model, codebooks, {}, {"moub.source": "mlp"}, packs=packs))
    with open_checked(path) as checked:
        fast = plan_compact(checked, consumed_names(checked.model), "fast")
        smallest = plan_compact(checked, consumed_names(checked.model), "smallest")
        held = {checked.members[o].tensor.name: p for o, p in smallest.planned.items()}
    assert all(fast.kept[f"init:w{i}"] == EIGHT_BIT_MATMUL_REASON for i in range(3))
    assert held["w1"].transposed and all(held[f"w{i}"].level.bits == 8 for i in range(3))
    x = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    expected = moub_runtime.InferenceSession(path).run(None, x)[0]
    assert np.array_equal(moub_runtime.InferenceSession(path, compact=True).run(None, x)[0], expected)
    if convs_run_in_nchwc():  # where compact=True is "fast", inspect also gives "smallest"'s figure
        inspect = subprocess.run([sys.executable, "-m", "moub_runtime.cli", "inspect", str(path)], capture_output=True, text=True)
        assert "compact='smallest' holds every quantized weight it can" in inspect.stdout


def test_cli_decode_compact_and_inspect_count_four_bit_tensors(tmp_path):
    path, shape = _write_mlp(tmp_path, 17)
    out = tmp_path / "compact.onnx"
    moub = [sys.executable, "-m", "moub_runtime.cli"]
    run = subprocess.run(moub + ["decode", str(path), "-o", str(out), "--compact"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    decoded = onnx.load(out)
    onnx.checker.check_model(decoded)
    assert decoded.SerializeToString() == moub_runtime.load(path, compact=True).SerializeToString()
    x = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    options = ort.SessionOptions()  # as the compact session sets it: MatMulNBits in float32, not int8 activations
    options.add_session_config_entry(MATMULNBITS_ACCURACY_KEY, MATMULNBITS_FLOAT32)
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    expected = moub_runtime.InferenceSession(path).run(None, x)[0]
    assert np.abs(session.run(None, x)[0] - expected).max() <= RELATIVE_BOUND * np.abs(expected).max()
    inspect = subprocess.run(moub + ["inspect", str(path)], capture_output=True, text=True)
    assert "3 tensors (" in inspect.stdout and "as int4" in inspect.stdout or "as uint4" in inspect.stdout


def test_hostile_four_bit_files_fail_as_the_normal_path_does(tmp_path):
    """A flipped payload byte and a memory budget below the model: the compact session refuses
    each with the normal path's error, before building anything."""
    path, _ = _write_mlp(tmp_path, 17)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    broken = tmp_path / "broken.moub"
    broken.write_bytes(bytes(data))
    for source, limits in ((broken, ReaderLimits()), (path, ReaderLimits(memory_budget=4096))):
        errors = []
        for compact in (False, True):
            with pytest.raises(MoubFormatError) as caught:
                moub_runtime.InferenceSession(source, limits=limits, compact=compact)
            errors.append((type(caught.value), str(caught.value)))
        assert errors[0] == errors[1] and str(source) in errors[0][1]


@pytest.mark.slow
def test_convert_with_ram_int4_on_a_torch_token_mixer(tmp_path):
    """``--ram int4`` on a transformer-style torch model: every MatMul and Linear (Gemm) weight's
    levels within 16 values (held in 4 bits as MatMulNBits), the other weights within int8; the
    tolerance holds; the report gives the file and the resident weight bytes side by side."""
    import user_models
    from moub_converters import convert

    model = user_models.token_mixer(tmp_path)
    result = convert(str(model.path), data=model.search, mode="adaptive", metric="decision", max_drop=0.01, seed=0, ram="int4")
    path = tmp_path / "int4.moub"
    result.write(path)
    source = onnx.load(model.path)
    matmul = four_bit_weights(source.graph, {t.name: list(t.dims) for t in source.graph.initializer})
    assert len(matmul) == 3   # the embedding's 8 rows would be padded to 128 (matmul_nbits_fits): int8
    with open_checked(path) as checked:
        plan = plan_compact(checked, consumed_names(checked.model), "fast")
        held = {checked.members[o].tensor.name: p.level.name for o, p in plan.planned.items()}
    assert matmul and all(held[name] in ("int4", "uint4") for name in matmul)
    assert all(kind in ("int8", "uint8") for name, kind in held.items() if name not in matmul)
    summary = summarize(path).compact
    kept = summary["kept_float"]   # the embedding: 8-bit levels of a MatMul, float32 in compact=True (0061)
    assert list(kept) == [EIGHT_BIT_MATMUL_REASON] and kept[EIGHT_BIT_MATMUL_REASON]["tensors"] == 1
    resident = summary["held_weight_bytes"] + 4 * kept[EIGHT_BIT_MATMUL_REASON]["weights"]
    assert result.report["file"]["resident_weight_bytes"]["compact"] == resident
    assert result.report["loss"] <= 0.01 and "weights in RAM" in result.closing_table()

    fused = [n for n in _fused(path, tmp_path) if n.op_type == "MatMulNBits"]
    assert len(fused) == len(matmul) and {_bits(n) for n in fused} == {4}
    feeds = {"rows": model.test["rows"][:64]}
    expected = moub_runtime.InferenceSession(path).run(None, feeds)[0]
    got = moub_runtime.InferenceSession(path, compact=True).run(None, feeds)[0]
    assert np.abs(got - expected).max() <= RELATIVE_BOUND * np.abs(expected).max()
    decoded = tmp_path / "compact.onnx"
    subprocess.run([sys.executable, "-m", "moub_runtime.cli", "decode", str(path), "-o", str(decoded), "--compact"], check=True)
    onnx.checker.check_model(onnx.load(decoded))


def test_sites_of_different_windows_never_share_a_pack():
    """``--ram int4``'s packs: a 16-value window's sites share only with each other, so the grid a
    reader bounds each 4-bit member by stays 16 values wide; without windows the same sites share one pack."""
    from moub_converters.packing import plan_packs

    rng = np.random.default_rng(0)
    levels = [np.rint(rng.normal(0, 2.5, 300)).clip(-7, 8).astype(np.int32) for _ in range(6)]  # alike: they share
    windows = [16, 16, 16, 256, 256, 256]
    offsets = [0, 0, 0, 0, 0, 0]
    together = plan_packs(levels, offsets)
    assert any(set(p.members) & {0, 1, 2} and set(p.members) & {3, 4, 5} for p in together)
    for plan in plan_packs(levels, offsets, windows):
        assert len({windows[i] for i in plan.members}) == 1
        if windows[plan.members[0]] == 16:
            grid_values = plan.levels if plan.levels is not None else range(plan.first, plan.first + plan.count)
            assert max(grid_values) - min(grid_values) < 16


def test_a_weight_with_few_rows_is_not_padded_into_matmul_nbits():
    """MatMulNBits pads K to whole blocks of 128; a weight whose padding would more than double it
    (a hostile [1, N] weight: 64 bytes a weight) stays an 8-bit DequantizeLinear."""
    from moub_runtime.compact import matmul_nbits_fits

    assert not matmul_nbits_fits(0) and not matmul_nbits_fits(1) and not matmul_nbits_fits(63)
    assert matmul_nbits_fits(64) and matmul_nbits_fits(128) and matmul_nbits_fits(129) and matmul_nbits_fits(256)
    assert all(-(-k // MATMUL_NBITS_BLOCK) * MATMUL_NBITS_BLOCK <= 2 * k for k in range(1, 2000) if matmul_nbits_fits(k))
