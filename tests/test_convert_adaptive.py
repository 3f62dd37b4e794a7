"""``--mode adaptive``: per-tensor steps by sensitivity, packs, on the demo model and synthetic weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import moub_runtime
from moub_converters import convert
from moub_format import MoubFile
from moub_converters.bias_correction import BiasCorrector
from moub_converters.calibration import Calibration
from moub_converters.error_feedback import ErrorFeedback
from moub_converters.data import load_dataset
from moub_converters.intake import load_source, pool_weights
from moub_converters import step_layout
from moub_converters.replay import Replay
from moub_converters.step_layout import PackedQuantization, chunk_elements, layout
from moub_converters.options import ConvertOptions
from moub_converters.packing import plan_packs, total_bits
from moub_converters.selection import tolerance
from moub_converters.uniform import SiteStats, allocate_steps, site_arrays, site_stats
from moub_runtime.inspect import summarize
from moub_runtime.sites import tensor_sites

DATA = Path(__file__).resolve().parent.parent / "converters" / "data"
MODEL, VAL, TEST = DATA / "digits_cnn.onnx", DATA / "digits_val.npz", DATA / "digits_test.npz"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    result = convert(MODEL, data=VAL, mode="adaptive", max_drop=0.01, seed=0)
    path = tmp_path_factory.mktemp("adaptive") / "digits.moub"
    result.write(path)
    return result, path


def test_decoded_weights_are_exactly_the_chosen_quantizers(converted):
    result, path = converted
    source = load_source(MODEL)
    pool = pool_weights(source.model, result.report["settings"]["min_elements"])
    facts = result.report["search"]
    recipe = result.report["choice"]["recipe"]
    stats = site_stats(pool)
    dataset = load_dataset(VAL, source.model)
    half = dataset.take(np.arange(0, dataset.n_samples, 2))
    calib = Calibration(BiasCorrector.measure(source.model, pool, half), ErrorFeedback.measure(source.model, pool, half))
    assert calib.corrector.summary() == facts["bias_correction"] and calib.corrector.rules
    assert calib.feedback.summary() == facts["error_feedback"] and calib.feedback.layers
    lay = layout(pool, stats, np.asarray(facts["log2_optimal_step"]), recipe["x"], recipe["gamma"], calib)
    expected = site_arrays(pool, lay.levels, lay.steps)
    decoded = tensor_sites(moub_runtime.load(path))
    from_packs = PackedQuantization.from_layout(pool, lay)
    assert all(pack.indices.dtype == np.int32 for pack in from_packs.packs)
    packed = from_packs.site_arrays(pool)
    for site in pool.sites:
        got = np.frombuffer(decoded[site.path].tensor.raw_data, dtype=expected[site.path].dtype)
        assert got.tobytes() == expected[site.path].tobytes() == packed[site.path].tobytes(), site.path
    # every float tensor of >= 16 elements is quantized (biases too), each to its own step
    assert len(pool.sites) == 7 and len({float(s) for s in lay.steps}) == len(pool.sites)  # 10-element bias: lossless


def test_replay_rebuilds_the_file_from_its_report_and_other_steps_from_it(converted, tmp_path):
    """Replay (what the bench's swept row uses) at the report's recipe writes the converted file
    byte for byte; a coarser step scale a smaller file on the same tensors, a finer one a larger."""
    result, path = converted
    recipe = result.report["choice"]["recipe"]
    replay = Replay.from_report(load_source(MODEL).model, VAL, json.loads(json.dumps(result.report)))
    with MoubFile(path) as moub:
        metadata = dict(moub.index.metadata)

    assert replay.encode(recipe["x"], recipe["gamma"], metadata) == path.read_bytes()
    coarser, finer = (replay.encode(recipe["x"] + d, recipe["gamma"], metadata) for d in (1.0, -1.0))
    assert len(coarser) < path.stat().st_size < 0.9 * len(finer)
    (tmp_path / "coarser.moub").write_bytes(coarser)
    decoded = tensor_sites(moub_runtime.load(tmp_path / "coarser.moub"))
    assert {s.path for s in replay.pool.sites} <= set(decoded)


def test_chunk_size_gives_the_lane_decoder_enough_chunks(converted, tmp_path, monkeypatch):
    """Chunks of 1024..4096 elements, as many as the reader's lock-step decoder wants; models
    too small for it keep 4096. The demo (72k weights) writes 4096; told that 8 chunks make a
    lock step, the same decision writes 1024-element chunks that decode to the same weights,
    and the search's size estimate still matches the file."""
    sizes = (72_000, 131_071, 131_072, 784_214, 1_171_580, 2_670_000, 5_000_000)
    assert [chunk_elements(n) for n in sizes] == [4096, 4096, 1024, 1024, 1024, 2048, 4096]
    result, path = converted
    with MoubFile(path) as moub:
        assert {p.chunk_elements for p in moub.index.packs} == {4096}
    recipe = result.report["choice"]["recipe"]
    replay = Replay.from_report(load_source(MODEL).model, VAL, json.loads(json.dumps(result.report)))
    estimate_4096 = replay.layout(recipe["x"], recipe["gamma"]).bits
    monkeypatch.setattr(step_layout, "MIN_LANES", 8)
    assert chunk_elements(replay.pool.n_weights) == 1024
    with MoubFile(path) as moub:
        metadata = dict(moub.index.metadata)
        chunks_4096 = sum(len(p.chunk_bits) for p in moub.index.packs)
    small = tmp_path / "small_chunks.moub"
    small.write_bytes(replay.encode(recipe["x"], recipe["gamma"], metadata))
    with MoubFile(small) as moub:
        assert {p.chunk_elements for p in moub.index.packs} == {1024}
        chunks_1024 = sum(len(p.chunk_bits) for p in moub.index.packs)
    assert chunks_1024 > 3 * chunks_4096
    before, after = tensor_sites(moub_runtime.load(path)), tensor_sites(moub_runtime.load(small))
    for site in replay.pool.sites:
        assert after[site.path].tensor.raw_data == before[site.path].tensor.raw_data, site.path
    # the file grows by about what the search's size model charges per chunk (entry + padding)
    grown = 8 * (small.stat().st_size - path.stat().st_size)
    charged = replay.layout(recipe["x"], recipe["gamma"]).bits - estimate_4096
    assert charged == 36 * (chunks_1024 - chunks_4096)
    assert 0.5 * charged < grown < 1.5 * charged, (grown, charged)


def test_replay_refuses_a_report_of_another_mode(converted):
    result, _ = converted
    report = json.loads(json.dumps(result.report))
    report["settings"]["mode"] = "paper"
    with pytest.raises(ValueError, match="not adaptive"):
        Replay.from_report(load_source(MODEL).model, VAL, report)


def test_file_uses_packs_and_lzma_and_meets_the_tolerance(converted):
    result, path = converted
    summary = summarize(path)
    assert summary.format_version == "1.4" and summary.packs
    with MoubFile(path) as moub:
        assert all(p.compact for p in moub.index.packs)  # 32-bit member vectors (format 1.3)
    assert result.report["file"]["bytes"] == path.stat().st_size
    assert result.report["loss"] <= 0.01
    # the size the search optimised is the size the file has, within a few percent
    weights = result.report["file"]["weight_bytes"]
    estimate = result.report["choice"]["bits_per_weight"] * result.report["pool"]["pooled_weights"] / 8
    assert abs(estimate - weights) / weights < 0.05, (estimate, weights)


def test_held_back_accuracy_and_beats_paper_mode(converted):
    result, path = converted
    data = np.load(TEST)
    original = onnx.load(MODEL)
    import onnxruntime as ort

    ref = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    got = moub_runtime.InferenceSession(path)
    acc0 = float(np.mean(ref.run(None, {"input": data["input"]})[0].argmax(1) == data["labels"]))
    acc1 = float(np.mean(got.run(None, {"input": data["input"]})[0].argmax(1) == data["labels"]))
    assert acc0 - acc1 <= 0.02, (acc0, acc1)  # 360 held-back digits: within 7 samples of the original
    paper = convert(MODEL, data=VAL, mode="paper", max_drop=0.01, seed=0)
    assert result.ratio > paper.ratio


def test_same_inputs_same_bytes_and_report():
    first = convert(MODEL, data=VAL, mode="adaptive", max_drop=0.01, seed=3)
    second = convert(MODEL, data=VAL, mode="adaptive", max_drop=0.01, seed=3)
    assert first.moub_bytes == second.moub_bytes
    assert first.report_json() == second.report_json()


def test_cli_adaptive_mode(tmp_path):
    out = tmp_path / "d.moub"
    report = tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-m", "moub_runtime.cli", "convert", str(MODEL), "-o", str(out), "--data", str(VAL),
                          "--mode", "adaptive", "--max-drop", "0.01", "--report", str(report), "--quiet"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    stages = json.loads(report.read_text())["stages"]
    assert [s["stage"] for s in stages] == ["per-tensor steps", "+Huffman packs"]
    assert stages[-1]["file_bytes"] == out.stat().st_size


def test_cli_default_mode_with_progress(tmp_path):
    """Without --quiet the progress display sees every result, sensitivity runs included (they
    have no loss: this once ended in an internal error)."""
    out = tmp_path / "d.moub"
    run = subprocess.run([sys.executable, "-m", "moub_runtime.cli", "convert", str(MODEL), "-o", str(out), "--data", str(VAL)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "ratio" in run.stdout and summarize(out).packs


def test_steps_follow_spread_at_gamma_0_and_sensitivity_at_gamma_1():
    stats = SiteStats(np.array([1000, 4000, 250]), np.log2(np.array([0.1, 0.02, 1.5])), np.array([1.0, 0.2, 9.0]))
    sens = np.array([-3.0, -9.0, -1.0])
    at0 = allocate_steps(stats, sens, -4.0, 0.0).astype(np.float64)
    assert np.allclose(at0, 2.0 ** -4 * np.exp2(stats.log2_sigma), rtol=1e-6)  # a step proportional to each sigma
    at1 = allocate_steps(stats, sens, -4.0, 1.0).astype(np.float64)
    assert np.allclose(np.log2(at1) - sens, np.log2(at1[0]) - sens[0], atol=1e-6)
    finer = allocate_steps(stats, sens, -5.0, 1.0).astype(np.float64)
    assert np.allclose(at1 / finer, 2.0, rtol=1e-6)


def test_packing_centres_offset_tensors_and_covers_every_site_once():
    rng = np.random.default_rng(0)
    levels = [np.rint(rng.standard_normal(5000) * 40).astype(np.int64),   # big: a pack of its own
              np.rint(rng.standard_normal(64) * 3).astype(np.int64),      # small ones share a pack
              np.rint(900 + rng.standard_normal(64) * 3).astype(np.int64),  # a variance-like vector far from 0
              np.rint(rng.standard_normal(32) * 5).astype(np.int64)]
    plans = plan_packs(levels)
    members = sorted(i for p in plans for i in p.members)
    assert members == [0, 1, 2, 3]
    shared = next(p for p in plans if 2 in p.members)
    offset = shared.offsets[shared.members.index(2)]
    assert abs(offset - 900) <= 2 and shared.count < 400  # uncentred, the grid would span -155..905
    assert total_bits(plans, np.array([q.size for q in levels]), 4096) > 0


def test_a_tensor_of_few_far_apart_levels_gets_an_explicit_codebook(tmp_path):
    """A pack of one tensor whose levels are few and far apart lists them (an explicit codebook)
    rather than spanning them with a grid, which needs a code length per integer in between
    (PP-OCRv4 det: 16 levels over 726,035 grid values). Same decoded bits, a smaller file,
    and a model onnxruntime runs; the dense tensor keeps its grid."""

    from moub_converters.encode import encode_model
    from moub_converters.step_layout import Layout, PackedQuantization
    from moub_converters.uniform import quantize_pool
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    b = np.sort(rng.uniform(1.0, 70.0, 16)).astype(np.float32)  # far from 0, spread out
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    pool = pool_weights(model, 16)
    steps = np.array([0.05 if s.path.endswith("w") else 1e-4 for s in pool.sites], dtype=np.float32)
    levels = quantize_pool(pool, steps)
    sizes = np.array([q.size for q in levels])
    plans = plan_packs(levels)
    sparse = next(p for p in plans if pool.sites[p.members[0]].path.endswith("b"))
    dense = next(p for p in plans if pool.sites[p.members[0]].path.endswith("w"))
    assert sparse.levels is not None and sparse.count == 16 and dense.levels is None
    assert int(levels[sparse.members[0]].max() - levels[sparse.members[0]].min()) > 500_000
    grid_plans = [p.as_grid() for p in plans]
    paths = {}
    for name, chosen in (("explicit", plans), ("grid", grid_plans)):
        quant = PackedQuantization.from_layout(pool, Layout(steps, levels, chosen, total_bits(chosen, sizes, 4096)))
        assert quant.bins_used() == sum(p.count for p in chosen)  # what the report states as "bins"
        paths[name] = tmp_path / f"{name}.moub"
        paths[name].write_bytes(encode_model(model, quant.codebooks, {}, {}, packs=quant.packs, **quant.build_options))
    assert total_bits(plans, sizes, 4096) + 8 * 500 < total_bits(grid_plans, sizes, 4096)
    assert paths["explicit"].stat().st_size + 500 < paths["grid"].stat().st_size
    expected = site_arrays(pool, levels, steps)
    for path in paths.values():
        decoded = tensor_sites(moub_runtime.load(path))
        for site in pool.sites:
            assert decoded[site.path].tensor.raw_data == expected[site.path].tobytes(), (path.name, site.path)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    (got,) = moub_runtime.InferenceSession(paths["explicit"]).run(None, {"x": x})
    want = x @ expected[pool.sites[0].path].reshape(64, 16) + expected[pool.sites[1].path].reshape(16)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5)
    with MoubFile(paths["explicit"]) as moub:
        assert sorted(moub.index.codebook_size(i) for i in range(len(moub.index.codebooks)))[0] == 16


@pytest.mark.parametrize("units, max_drop, lost_allowed", [(6000, 0.01, 59), (300, 0.01, 2), (500, 0.01, 4), (180, 0.005, 0), (50, 0.005, 0)])
def test_tolerance_judges_lost_units_by_the_jeffreys_estimate(units, max_drop, lost_allowed):
    limit = tolerance("agreement", max_drop, units)
    assert round(limit * units) == lost_allowed
    assert tolerance("cosine", max_drop, units) == max_drop


def test_where_the_data_cannot_resolve_max_drop_the_limit_is_the_rate_the_margin_estimate_guards():
    from moub_converters.guards import choice_limit

    assert choice_limit("logit-decision", 0.005, 142, 284) == 0.005  # none lost of 284 still fits 1.05%
    assert choice_limit("agreement", 0.005, 142, 2000) == 0.0  # resolved: the Jeffreys count, no unit may be lost


def test_untrusted_sensitivities_get_the_typical_step():
    """No measurable effect, or a small tensor extrapolated far coarser: both get the size-weighted
    median step in sigma units (the PP-OCRv4 detector lost 6% to such tensors otherwise)."""
    from moub_converters.sensitivity import TEST_STEP, log2_optimal_steps

    sizes = np.array([100_000, 50_000, 60_000, 144, 24, 20_000])  # SMALL_TENSOR: 1024
    stats = SiteStats(sizes, np.array([-3.0, -4.0, -2.0, -2.5, 24.0, -3.0]), np.ones(6))
    relative = np.array([-1.0, 0.5, 1.0, 0.0, 5.0, 4.0])  # log2(step / sigma) each tensor should get
    test = np.exp2(stats.log2_sigma) * TEST_STEP
    distortions = sizes * test**2 / np.exp2(2 * (stats.log2_sigma + relative))
    distortions[3] = 0.0  # saturated: no effect at the test step
    got = log2_optimal_steps(stats, distortions) - stats.log2_sigma
    typical = 0.5  # half of the 230,168 weights lie at or below 0.5
    assert got[[0, 1, 2, 5]] == pytest.approx(relative[[0, 1, 2, 5]])  # measured, large: trusted
    assert got[3] == pytest.approx(typical)      # unmeasured
    assert got[4] == pytest.approx(typical)      # small and extrapolated coarser: capped


def test_fallbacks_are_only_larger_than_every_confirm_failure():
    """If the confirmed choice misses --max-drop on all the data, the converter may try others:
    never one smaller than a candidate that already failed on the confirm half."""
    from moub_converters.candidates import Candidate
    from moub_converters.selection import fallbacks

    ranked = [Candidate(f"c{i}", "search", 1.0, 0.0, True, float(i), 2, {}) for i in range(8)]
    trials = [{"name": "c0", "passed": False}, {"name": "c7", "passed": True}, {"name": "c3", "passed": False},
              {"name": "c5", "passed": True}, {"name": "c4", "passed": True}]
    assert [c.name for c in fallbacks(ranked, [ranked[4]], trials)] == ["c5", "c6", "c7"]
    assert [c.name for c in fallbacks(ranked, [], [{"name": "c7", "passed": False}])] == []


def _gap_mode(threshold_x: float, confirm_threshold_x: float, calls: list):
    """An AdaptiveMode whose evaluations pass on the search half below ``threshold_x`` and on
    the confirm half below ``confirm_threshold_x`` (finer steps are never worse)."""
    from types import SimpleNamespace

    from moub_converters.modes import adaptive

    mode = adaptive.AdaptiveMode()
    mode.limits = {"search": 0.01, "confirm": 0.01}

    def result(x: float, gamma: float, stage: str, threshold: float) -> dict:
        calls.append((stage, x))
        loss = 0.0 if x < threshold else 0.05
        return {"name": f"x={x:+.4f} gamma={gamma:.3f}", "stage": stage, "quality": 1 - loss, "loss": loss,
                "complete": True, "stopped": None, "units": 100, "bins": 10, "bits_per_weight": 8 - x,
                "recipe": {"x": round(x, 9), "gamma": round(gamma, 9)}}

    problem = SimpleNamespace(run=lambda tasks, max_loss, stage: [result(d.x, d.gamma, stage, threshold_x)
                                                                       for d, _ in tasks])
    ctx = SimpleNamespace(map=lambda fn, tasks: [result(t[0], t[1], t[5], confirm_threshold_x) for t in tasks])
    return mode, problem, ctx


def _searched(x: float, gamma: float = 0.75) -> "Candidate":
    from moub_converters.candidates import Candidate

    return Candidate(f"x={x:+.4f} gamma={gamma:.3f}", "search", 1.0, 0.0, True, 8 - x, 10, {"x": x, "gamma": gamma})


def test_gap_between_the_confirmed_choice_and_the_failure_below_is_bisected_on_both_halves():
    """rapidocr cls: the confirm half failed x=-3.25 and the next finished candidate was the
    bracket's x=-5.0; the grid between them is bisected, each point on the search half first."""
    calls: list = []
    mode, problem, ctx = _gap_mode(threshold_x=-3.3, confirm_threshold_x=-3.8, calls=calls)
    failed, safe = _searched(-3.25), _searched(-5.0)
    trials = [{"name": failed.name, "rule": "confirm half", "passed": False},
              {"name": safe.name, "rule": "confirm half", "passed": True}]
    confirmed, tried = mode._fill_gap(problem, [failed, safe], [safe], trials, [], ctx)
    assert confirmed[0].recipe["x"] == -3.875  # the coarsest grid step (1/8 octave) that passes the confirm half
    assert [c.recipe["x"] for c in tried] == [-4.125, -3.75, -4.0, -3.875]
    assert [x for stage, x in calls if stage == "confirm"] == [-4.125, -3.75, -4.0, -3.875]
    assert [t["passed"] for t in trials[2:]] == [True, False, True, True]


def test_gap_fill_respects_gamma_the_search_half_and_the_budget():
    from moub_converters.modes.adaptive import CONFIRM_BUDGET

    calls: list = []
    mode, problem, ctx = _gap_mode(threshold_x=-5.0, confirm_threshold_x=0.0, calls=calls)
    failed, safe = _searched(-3.25), _searched(-5.0)
    trials = [{"name": failed.name, "rule": "confirm half", "passed": False},
              {"name": safe.name, "rule": "confirm half", "passed": True}]
    confirmed, tried = mode._fill_gap(problem, [failed, safe], [safe], list(trials), [], ctx)
    assert confirmed == [safe] and all(stage != "confirm" for stage, _ in calls)  # failed the search half: no confirm run
    assert [c.recipe["x"] for c in tried] == [-4.125, -4.625, -4.875]
    other_gamma = _searched(-3.25, gamma=1.0)
    assert mode._fill_gap(problem, [other_gamma, safe], [safe], [{**trials[0], "name": other_gamma.name}, trials[1]], [], ctx) == ([safe], [])
    full = trials + [{"name": f"t{i}", "rule": "confirm half", "passed": True} for i in range(CONFIRM_BUDGET - 2)]
    assert mode._fill_gap(problem, [failed, safe], [safe], full, [], ctx) == ([safe], [])


def test_expected_flip_rate_on_the_demo_models_outputs():
    """Zero for the original weights, larger for coarser steps, the same on probabilities as on
    their logarithms, and the mean over the samples' margins of the share of changes that reach them."""
    from moub_converters.evaluate import Evaluator, original_arrays
    from moub_converters.metrics import expected_flip_rate

    source = load_source(MODEL)
    pool = pool_weights(source.model)
    stats = site_stats(pool)
    evaluator = Evaluator(source.model, pool, load_dataset(VAL, source.model))
    reference = evaluator.outputs(original_arrays(source.model, pool))[0]
    assert expected_flip_rate(reference, reference) == 0.0

    def outputs(x: float) -> np.ndarray:
        steps = allocate_steps(stats, np.zeros(len(pool.sites)), x, 0.0)
        levels = [np.rint(pool.values[s.start : s.stop] / steps[i]).astype(np.int64) for i, s in enumerate(pool.sites)]
        return evaluator.outputs(site_arrays(pool, levels, steps))[0]

    rates = [expected_flip_rate(reference, outputs(x)) for x in (-2.0, 0.0, 1.5)]
    assert 0.0 < rates[0] < rates[1] < rates[2] <= 1.0
    coarse = outputs(0.0)
    order = np.sort(reference, axis=1)
    margin = order[:, -1] - order[:, -2]
    rows = np.arange(len(reference))
    top, runner = reference.argmax(1), np.argsort(reference, axis=1)[:, -2]
    change = (coarse[rows, runner] - coarse[rows, top]) - (reference[rows, runner] - reference[rows, top])
    assert rates[1] == pytest.approx(np.mean([(change >= m).mean() for m in margin]))

    def softmax(y: np.ndarray) -> np.ndarray:
        e = np.exp(y - y.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    assert expected_flip_rate(softmax(reference), softmax(coarse)) == pytest.approx(
        expected_flip_rate(np.log(softmax(reference)), np.log(softmax(coarse))))


def _coarsen_mode(expected_at, flips_at, wave: int = 2):
    """An AdaptiveMode whose coarsening trials see ``expected_at(x)`` on both halves of 100
    samples each and ``flips_at(x)`` flips on each half."""
    from types import SimpleNamespace

    from moub_converters.modes import adaptive
    from moub_converters.options import ConvertOptions

    calls: list = []

    def result(x: float, gamma: float) -> dict:
        calls.append(x)
        half = {"flips": flips_at(x), "units": 100, "expected": expected_at(x)}
        return {"name": f"x={x:+.4f} gamma={gamma:.3f}", "bins": 10, "bits_per_weight": 8 - x,
                "recipe": {"x": round(x, 9), "gamma": round(gamma, 9)}, "search": dict(half), "confirm": dict(half)}

    ctx = SimpleNamespace(map=lambda fn, tasks: [result(t[0], t[1]) for t in tasks], session=SimpleNamespace(metric="agreement"))
    return adaptive.AdaptiveMode(), ctx, ConvertOptions(max_drop=0.01, wave=wave), calls


def test_coarsening_walks_while_the_estimate_and_the_pooled_count_hold():
    chosen = _searched(-4.0)
    mode, ctx, opts, calls = _coarsen_mode(lambda x: 0.004 if x <= -3.5 else 0.02, lambda x: 0)
    passed, trials = mode._coarsen(chosen, [], opts, ctx)
    assert [c.recipe["x"] for c in passed] == [-3.875, -3.75, -3.625, -3.5]  # coarsest last
    assert all(c.complete and c.stage == "coarsen" for c in passed)
    assert [t["passed"] for t in trials] == [True, True, True, True, False]  # the first failure ends the walk
    assert calls == [-3.875, -3.75, -3.625, -3.5, -3.375, -3.25]  # the rest of the last wave is not reported
    # the pooled count (200 samples at --max-drop 0.01: 1 flip) stops it even where the estimate holds
    mode, ctx, opts, _ = _coarsen_mode(lambda x: 0.0, lambda x: 0 if x <= -3.75 else 1)
    passed, trials = mode._coarsen(chosen, [], opts, ctx)
    assert [c.recipe["x"] for c in passed] == [-3.875, -3.75] and trials[-1]["flips"] == [1, 1]
    # the same walk with waves of 1 and 3: the same candidates and report
    for wave in (1, 3):
        mode, ctx, opts, _ = _coarsen_mode(lambda x: 0.004 if x <= -3.5 else 0.02, lambda x: 0, wave)
        assert mode._coarsen(chosen, [], opts, ctx)[1] == mode._coarsen(chosen, [], ConvertOptions(max_drop=0.01), ctx)[1]


def test_coarsening_on_the_demo_with_agreement():
    """The converter's own run: the choice is the coarsest step the walk passed (or the confirmed
    one), and every passed step kept the estimate within --max-drop on both halves."""
    result = convert(MODEL, data=VAL, mode="adaptive", metric="agreement", max_drop=0.01, seed=0)
    report = json.loads(result.report_json())
    trials = report["search"]["coarsen"]
    assert trials and all(max(t["expected"]) <= 0.01 for t in trials if t["passed"])
    assert all(t["passed"] for t in trials[:-1])
    passed = [t for t in trials if t["passed"]]
    chosen = report["choice"]["name"]
    confirmed = [t["name"] for t in report["search"]["confirm"] if t["passed"]]
    assert chosen == (passed[-1]["name"] if passed else confirmed[-1])
    # an accuracy conversion (the demo's default metric) has no such walk
    assert "coarsen" not in json.loads(convert(MODEL, data=VAL, mode="adaptive", max_drop=0.01, seed=0).report_json())["search"]


def test_the_session_computes_once_and_sends_workers_only_its_inputs():
    """What a conversion computes once (halves, calibration, statistics, originals) lives on its
    session: computed on first use, kept, and left out when the session is sent to a worker."""
    import pickle

    from moub_converters.evaluate import Evaluator, Scorer, reference_outputs
    from moub_converters.session import ConversionSession

    source = load_source(MODEL)
    pool = pool_weights(source.model, 16)
    dataset = load_dataset(VAL, source.model)
    evaluator = Evaluator(source.model, pool, dataset)
    reference = reference_outputs(evaluator, source.model, "digits")
    session = ConversionSession(source.model, pool, dataset, "accuracy", reference, 1.0, ConvertOptions(max_drop=0.01))
    session.use_scorer(Scorer(evaluator, "accuracy", reference, dataset.labels, 1.0))
    search, confirm = session.half("search"), session.half("confirm")
    assert search is session.half("search") and search.dataset.n_samples + confirm.dataset.n_samples == dataset.n_samples
    assert np.array_equal(np.asarray(search.dataset.inputs["input"]), np.asarray(dataset.inputs["input"])[::2])
    assert (search.metric, confirm.metric) == ("accuracy", "agreement")  # the confirm half judges by agreement
    assert session.calibration is session.calibration and session.calibration.feedback.layers
    assert session.site_stats is session.site_stats and session.originals is session.originals
    sent = pickle.loads(pickle.dumps(session))
    assert sent._halves == {} and sent._calibration is None and sent._scorer is None and sent._originals is None
    assert sent.model.SerializeToString() == source.model.SerializeToString()
    assert sent.calibration.summary() == session.calibration.summary()  # measured again, the same
