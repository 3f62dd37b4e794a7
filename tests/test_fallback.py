"""Between lossy and lossless: where no candidate holds the tolerance because a few tensors break it
at any step, the converter keeps those tensors exact and still searches the rest, in a file smaller
than the lossless one; where every tensor is that sensitive it writes the lossless file as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import moub_runtime
from moub_converters import convert
from moub_converters.fallback import REASON_KEPT_EXACT, exact_sets, sensitivity_order
from moub_converters.front_point import write_point
from moub_converters.intake import pool_weights
from moub_converters.lossless import lossless_bytes
from moub_converters.uniform import RAM_LEVEL_LIMITS, site_stats

FAST = dict(population=4, generations=1, merge_budget=0)
MAX_DROP = 0.001
GAIN = 1e8        # a rounding error of 1e-7 in a cancelling branch moves a logit by about 10
SAMPLES = 400


def _cancelling_model(sensitive: tuple[str, ...], seed: int = 0) -> onnx.ModelProto:
    """A three-layer MLP (64 -> 256 -> 256 -> 10) whose logits get ``GAIN * (h @ W - h @ W_exact)`` for every
    W named in ``sensitive``; ``W_exact`` is W's own values as int32 times 2^-20 (integers stay exact), so the
    branch is zero in the original and any rounding of W is amplified. "A" is an extra 64 x 10 weight read
    only by such a branch."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, shape: tuple[int, int], scale: float) -> None:
        values = rng.normal(0, scale, shape).astype(np.float32)
        if name in sensitive:
            k = np.rint(values.astype(np.float64) * 2**20).astype(np.int32)
            values = (k.astype(np.float64) * 2.0**-20).astype(np.float32)
            inits.append(numpy_helper.from_array(k, f"{name}_int"))
        inits.append(numpy_helper.from_array(values, name))

    def cancelling(name: str, x: str) -> str:
        nodes.extend([helper.make_node("MatMul", [x, name], [f"{name}_y"]),
                      helper.make_node("Cast", [f"{name}_int"], [f"{name}_float"], to=TensorProto.FLOAT),
                      helper.make_node("Mul", [f"{name}_float", "scale"], [f"{name}_exact"]),
                      helper.make_node("MatMul", [x, f"{name}_exact"], [f"{name}_y_exact"]),
                      helper.make_node("Sub", [f"{name}_y", f"{name}_y_exact"], [f"{name}_d"]),
                      helper.make_node("Slice", [f"{name}_d", "zero", "ten", "one"], [f"{name}_d10"]),
                      helper.make_node("Mul", [f"{name}_d10", "gain"], [f"{name}_g"])])
        return f"{name}_g"

    for name, shape, scale in (("W1", (64, 256), 0.2), ("W2", (256, 256), 0.1), ("W3", (256, 10), 0.1), ("A", (64, 10), 0.2)):
        weight(name, shape, scale)
    for name, value in (("scale", np.float32(2.0**-20)), ("gain", np.float32(GAIN)), ("zero", np.array([0], np.int64)),
                        ("ten", np.array([10], np.int64)), ("one", np.array([1], np.int64))):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
    nodes += [helper.make_node("MatMul", ["x", "W1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
              helper.make_node("MatMul", ["r1", "W2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
              helper.make_node("MatMul", ["r2", "W3"], ["logits0"])]
    inputs = {"W1": "x", "W2": "r1", "W3": "r2", "A": "x"}
    total = "logits0"
    for i, name in enumerate(sensitive):
        nodes.append(helper.make_node("Add", [total, cancelling(name, inputs[name])], [f"logits{i + 1}"]))
        total = f"logits{i + 1}"
    nodes.append(helper.make_node("Identity", [total], ["logits"]))
    graph = helper.make_graph(nodes, "cancelling", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> tuple:
    x = np.random.default_rng(1).normal(0, 1, (SAMPLES, 64)).astype(np.float32)
    path = tmp_path_factory.mktemp("fallback") / "x.npz"
    np.savez(path, x=x)
    return path, x


@pytest.fixture(scope="module")
def one_sensitive(tmp_path_factory) -> onnx.ModelProto:
    model = _cancelling_model(("A",))
    path = tmp_path_factory.mktemp("fallback") / "one_sensitive.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def kept_exact_result(one_sensitive, samples):
    return convert(one_sensitive, data=samples[0], max_drop=MAX_DROP, **FAST)


def _outputs(path, x: np.ndarray, runtime=ort.InferenceSession) -> np.ndarray:
    return runtime(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_one_tensor_breaking_every_step_is_kept_exact_and_the_rest_searched(one_sensitive, samples, kept_exact_result,
                                                                            tmp_path):
    x, result = samples[1], kept_exact_result
    kept = result.report["kept_exact"]
    assert "A" in kept["tensors"] and "no candidate stays within" in kept["reason"]
    assert "lossless" not in result.report
    assert len(result.moub_bytes) < 0.5 * kept["lossless_bytes"]
    assert len(result.moub_bytes) < 0.5 * len(lossless_bytes(onnx.load(one_sensitive), {}))
    out = tmp_path / "mixed.moub"
    result.write(out)
    # the sensitive tensor decodes bit for bit; the big ones are quantized
    decoded = {t.name: numpy_helper.to_array(t) for t in moub_runtime.load(out).graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(one_sensitive).graph.initializer}
    assert decoded["A"].tobytes() == original["A"].tobytes()
    assert decoded["W2"].tobytes() != original["W2"].tobytes()
    # within --max-drop on all the data, decoded by moub_runtime
    want, got = _outputs(one_sensitive, x), moub_runtime.InferenceSession(out).run(None, {"x": x})[0]
    agreement = float(np.mean(want.argmax(1) == got.argmax(1)))
    assert agreement >= 1.0 - MAX_DROP
    table = result.closing_table()
    assert "kept exact" in table and "A" in table and "every tensor stored exactly" not in table
    assert result.report["pool"]["passthrough_reasons"][REASON_KEPT_EXACT] == kept["count"]


def test_the_fallback_gives_the_same_bytes_twice(one_sensitive, samples, kept_exact_result):
    again = convert(one_sensitive, data=samples[0], max_drop=MAX_DROP, **FAST, workers=2)
    assert again.moub_bytes == kept_exact_result.moub_bytes


def test_the_report_rebuilds_the_file_byte_for_byte(one_sensitive, samples, kept_exact_result):
    """``write_point`` searches nothing: it takes the pool less the report's kept-exact paths."""
    rebuilt = write_point(one_sensitive, samples[0], kept_exact_result.report)
    assert rebuilt.moub_bytes == kept_exact_result.moub_bytes


def test_every_tensor_sensitive_still_writes_the_lossless_file(samples, tmp_path):
    data, x = samples
    path = tmp_path / "all_sensitive.onnx"
    onnx.save(_cancelling_model(("W1", "W2", "W3", "A")), path)
    result = convert(path, data=data, max_drop=MAX_DROP, **FAST)
    assert result.report["choice"]["name"] == "lossless" and "kept_exact" not in result.report
    reason = result.report["lossless"]["reason"]
    assert "no candidate stays within" in reason and "keeping the most sensitive tensors exact" in reason
    trials = result.report["lossless"]["kept_exact_trials"]
    assert trials and all(t["outcome"] != "written" for t in trials)
    out = tmp_path / "exact.moub"
    result.write(out)
    assert np.array_equal(moub_runtime.InferenceSession(out).run(None, {"x": x})[0], _outputs(path, x))


def test_the_paper_mode_writes_the_lossless_file(one_sensitive, samples):
    data, _ = samples
    result = convert(one_sensitive, data=data, max_drop=MAX_DROP, mode="paper", min_elements=16, population=4,
                     generations=1, merge_budget=0)
    assert result.report["choice"]["name"] == "lossless" and "kept_exact" not in result.report


def test_sensitivity_order_counts_the_int8_floor():
    """A tensor with one outlier gets a coarse step under --ram int8 (its window spans the outlier):
    at the same measured sensitivity it ranks first there, by size otherwise."""
    rng = np.random.default_rng(0)
    weights = {"plain": rng.normal(0, 1, (64, 64)).astype(np.float32),
               "outlier": rng.normal(0, 1, (128, 64)).astype(np.float32)}
    weights["outlier"][0, 0] = 1000.0
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "plain"], ["h"]),
                               helper.make_node("MatMul", ["h", "outlier_t"], ["y"]),
                               helper.make_node("Transpose", ["outlier"], ["outlier_t"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    pool = pool_weights(helper.make_model(graph), 16)
    distortions = np.array([1e-3, 1e-3])
    plain, outlier = [site.name for site in pool.sites].index("plain"), [site.name for site in pool.sites].index("outlier")
    assert sensitivity_order(site_stats(pool), distortions)[0] == plain  # per weight: the smaller tensor
    assert sensitivity_order(site_stats(pool, RAM_LEVEL_LIMITS["int8"]), distortions)[0] == outlier


def test_exact_sets_grow_by_share_and_hold_at_least_one_tensor():
    sizes = np.array([10, 600, 30, 360])
    assert exact_sets(sizes, [0, 2, 3, 1], (0.05, 0.2, 0.5)) == [[0, 2], [0, 2, 3]]
    assert exact_sets(sizes, [1, 0], (0.05,)) == [[1]]


def test_a_pool_without_sites_keeps_the_others_values():
    rng = np.random.default_rng(0)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(rng.normal(0, 1, (32, 32)).astype(np.float32), n) for n in "ab"])
    pool = pool_weights(helper.make_model(graph), 16)
    narrowed = pool.without([0], REASON_KEPT_EXACT)
    assert [s.name for s in narrowed.sites] == [pool.sites[1].name] and narrowed.sites[0].start == 0
    assert np.array_equal(narrowed.values, pool.values[pool.sites[1].start : pool.sites[1].stop])
    assert narrowed.passthrough[pool.sites[0].path] == REASON_KEPT_EXACT


def test_the_demo_digits_cnn_under_ram_int8_gives_its_small_tensors_the_int16_window(tmp_path):
    """A real model: at rel-l2 0.0005 the int8 window's floor steps hold no candidate (best loss 0.0016).
    Rather than keeping tensors exact, the converter gives the most sensitive ones the int16 window
    (two bytes each in a compact session instead of four): every tensor but the 65,536-weight
    classifier, which is still searched within int8; the file holds the tolerance, is under a
    fifth of the lossless one, its compact session holds those tensors as int16, and the report
    rebuilds it byte for byte."""
    from moub_runtime.compact import plan_compact
    from moub_runtime.loader import consumed_names
    from moub_runtime.validation import open_checked

    data = Path(__file__).resolve().parent.parent / "converters" / "data"
    model, val = data / "digits_cnn.onnx", data / "digits_val.npz"
    result = convert(model, data=val, metric="rel-l2", max_drop=0.0005, ram="int8")
    wide = result.report["widened_to_int16"]
    assert "classifier.1.weight" not in wide["tensors"] and "--ram int8 limits the finest step" in wide["reason"]
    assert "kept_exact" not in result.report and "lossless" not in result.report
    assert "int16 window" in result.closing_table()
    assert len(result.moub_bytes) < 0.2 * len(lossless_bytes(onnx.load(model), {}))
    out = tmp_path / "digits.moub"
    result.write(out)
    with np.load(val) as z:
        x = z["input"]
    name = onnx.load(model).graph.input[0].name
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    got = moub_runtime.InferenceSession(out).run(None, {name: x})[0]
    rel_l2 = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)  # the metric: per sample, averaged
    assert float(rel_l2.mean()) <= 0.0005
    with open_checked(out) as checked:
        plan = plan_compact(checked, consumed_names(checked.model), "smallest")
        held = {checked.members[o].tensor.name: p.level.name for o, p in plan.planned.items()}
    assert {held[name] for name in wide["tensors"]} <= {"int16", "uint16", "int8", "uint8"}
    assert "int16" in {held[name] for name in wide["tensors"]}
    assert held["classifier.1.weight"] in ("int8", "uint8")
    assert write_point(model, val, result.report).moub_bytes == result.moub_bytes


def _with_outliers(model: onnx.ModelProto, names: tuple[str, ...], sigmas: float = 6.0) -> onnx.ModelProto:
    """``model`` with one weight of each tensor in ``names`` set to ``sigmas`` times the tensor's
    standard deviation: 16 levels over its range are too coarse for the rest, 256 are not."""
    for tensor in model.graph.initializer:
        if tensor.name in names:
            values = numpy_helper.to_array(tensor).copy()
            values.flat[0] = sigmas * values.std()
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return model


def test_ram_int4_gives_weights_16_levels_cannot_hold_the_int8_window(samples, tmp_path):
    """``--ram int4`` where no MatMul weight holds the tolerance in 16 levels: before keeping any
    tensor exact, the converter gives the most sensitive 4-bit weights 256 levels back (a byte each
    in a compact session), here all three; the file holds the tolerance, the report says which,
    and the report rebuilds the file byte for byte."""
    from moub_runtime.compact import plan_compact
    from moub_runtime.loader import consumed_names
    from moub_runtime.validation import open_checked

    data, x = samples
    path = tmp_path / "outliers.onnx"
    onnx.save(_with_outliers(_cancelling_model(()), ("W1", "W2", "W3")), path)
    result = convert(path, data=data, max_drop=0.05, ram="int4", **FAST)
    wide = result.report["widened_to_int8"]
    assert sorted(wide["tensors"]) == ["W1", "W2", "W3"] and wide["share_of_four_bit"] == 1.0
    assert "lossless" not in result.report and "kept_exact" not in result.report
    assert [t["widened_to_int8"] for t in wide["trials"]][-1] == 3
    assert "int8 window" in result.closing_table()
    out = tmp_path / "widened.moub"
    result.write(out)
    want, got = _outputs(path, x), moub_runtime.InferenceSession(out).run(None, {"x": x})[0]
    assert float(np.mean(want.argmax(1) == got.argmax(1))) >= 1.0 - 0.05
    with open_checked(out) as checked:
        plan = plan_compact(checked, consumed_names(checked.model), "smallest")
        held = {checked.members[o].tensor.name: p.level.name for o, p in plan.planned.items()}
    assert {held[name] for name in ("W1", "W2", "W3")} <= {"int8", "uint8"}
    assert write_point(path, data, result.report).moub_bytes == result.moub_bytes


def test_four_bit_sets_grow_by_share_of_the_four_bit_weights():
    from moub_converters.fallback import four_bit_sets, widened

    pool = pool_weights(_cancelling_model(("A",)), 1024)
    pool = widened(pool, [])  # unchanged
    four = [i for i, site in enumerate(pool.sites) if site.path in pool.four_bit]
    assert {pool.sites[i].name for i in four} == {"W1", "W2", "W3"}   # A is read by two MatMuls
    order = list(reversed(range(len(pool.sites))))
    sets = four_bit_sets(pool, order)
    assert sets[-1] == sorted(four) and all(set(a) < set(b) for a, b in zip(sets, sets[1:]))
    assert all(pool.sites[i].path in pool.four_bit for s in sets for i in s)
    assert widened(pool, sets[0]).four_bit == pool.four_bit - {pool.sites[i].path for i in sets[0]}


def test_fallback_variants_widen_windows_before_keeping_tensors_exact():
    """Without ``--ram`` only exact sets; under ``--ram int8`` first the most sensitive tensors given
    the int16 window in growing shares up to all of them, then exact sets with the rest at int16;
    under ``--ram int4`` the 4-bit weights' int8 window comes first and stays for the later steps."""
    from moub_converters.api import _fallback_variants

    pool = pool_weights(_cancelling_model(("A",)), 1024)
    distortions = np.arange(1.0, len(pool.sites) + 1.0)
    everything = list(range(len(pool.sites)))
    plain = _fallback_variants(pool, distortions, "float")
    assert all(not widen and not sixteen and exact for widen, sixteen, exact in plain)
    int8 = _fallback_variants(pool, distortions, "int8")
    sixteen = [s for w, s, e in int8 if not e]
    assert sixteen and sixteen[-1] == everything and all(set(a) < set(b) for a, b in zip(sixteen, sixteen[1:]))
    assert all(s == everything and e for w, s, e in int8[len(sixteen):]) and not any(w for w, _, _ in int8)
    int4 = _fallback_variants(pool, distortions, "int4")
    four = [w for w, s, e in int4 if not s and not e]
    assert four and all(w == four[-1] for w, s, e in int4[len(four):])
