"""Models of the kinds users bring, not only image classifiers: the converter takes their samples as
feeds (a recurrent state with its batch on axis 1, a shared scalar, one feed per sequence), judges
outputs that are not class scores by their relative L2 error, and the file it writes holds that
promise on held-out samples it never saw."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import moub_runtime
from moub_converters import convert
from moub_converters.data import load_dataset
from moub_converters.errors import DataError
from moub_converters.evaluate import Scorer
from moub_converters.metrics import output_energy, quality

import user_models

FAST = dict(population=4, generations=3, merge_budget=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("user-models")


def _held_out_l2(moub_path: Path, original: Path, feeds) -> float:
    """Relative L2 error of every output of the written file against the original on ``feeds``."""
    compressed = moub_runtime.InferenceSession(moub_path)
    plain = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    err = energy = 0.0
    for feed in feeds if isinstance(feeds, list) else [feeds]:
        e, en = output_energy(compressed.run(None, feed), plain.run(None, feed))
        err, energy = err + e, energy + en
    return float(np.sqrt(err / energy))


def test_a_streaming_model_with_state_on_axis_1_and_a_shared_scalar(folder, tmp_path):
    model = user_models.streaming_vad(folder)
    result = convert(model.path, data=model.search, **FAST)
    notes = " ".join(result.report["data"]["notes"])
    assert "'sr'" in notes and "'state' on axis 1" in notes
    assert result.report["heads"] == [{"output": "output", "metric": "decision"}, {"output": "stateN", "metric": "l2"}]
    out = tmp_path / "vad.moub"
    result.write(out)
    assert result.report["loss"] <= 0.005
    assert _held_out_l2(out, model.path, model.test) <= 2 * 0.005


def test_a_sequence_model_fed_one_feed_per_sample(folder, tmp_path):
    model = user_models.sequence_lstm(folder)
    data = tmp_path / "feeds"
    data.mkdir()
    for i, feed in enumerate(model.search):
        np.savez(data / f"{i:03d}.npz", **feed)
    result = convert(model.path, data=data, **FAST)
    assert result.report["data"]["samples"] == len(model.search)
    out = tmp_path / "tagger.moub"
    result.write(out)
    assert _held_out_l2(out, model.path, model.test) <= 2 * 0.005


def test_a_regressor_is_judged_by_its_error_not_its_sign(folder, tmp_path):
    """One value per sample: a per-sample cosine only checks its sign; the relative L2 error holds."""
    model = user_models.regressor(folder)
    result = convert(model.path, data=model.search, **FAST)
    assert result.report["metric"] == "l2" and "regression" in result.report["metric_reason"]
    out = tmp_path / "regressor.moub"
    result.write(out)
    assert _held_out_l2(out, model.path, model.test) <= 2 * 0.005


def test_a_single_logit_binary_classifier_with_labels_keeps_its_decisions(folder, tmp_path):
    """One logit and 0/1 labels: judged by the decisions at 0, which held-out samples keep."""
    model = user_models.binary_classifier(folder)
    result = convert(model.path, data=model.search, labels=model.search_labels, **FAST)
    assert result.report["metric"] == "logit-decision"
    out = tmp_path / "binary.moub"
    result.write(out)
    compressed = moub_runtime.InferenceSession(out).run(None, model.test)[0]
    plain = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"]).run(None, model.test)[0]
    assert np.mean((compressed > 0) != (plain > 0)) <= 0.01


def test_sparse_independent_probabilities_are_judged_against_the_few_that_are_on(folder, tmp_path):
    """A tagger with 32 sigmoid outputs, about 9% on: a share of all 32 decisions would let a tenth
    of the tags that are on vanish; the changes are counted against the original's tags that are on."""
    model = user_models.sparse_tagger(folder)
    result = convert(model.path, data=model.search, **FAST)
    assert result.report["metric"] == "mask" and "rarer decision" in result.report["metric_reason"]
    out = tmp_path / "tagger.moub"
    result.write(out)
    compressed = moub_runtime.InferenceSession(out).run(None, model.test)[0] > 0.5
    plain = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"]).run(None, model.test)[0] > 0.5
    assert 0.05 < plain.mean() < 0.15
    assert np.sum(compressed != plain) / np.sum(plain) <= 3 * 0.005


def test_the_mask_loss_counts_changes_against_the_rarer_decision():
    reference = np.zeros((100, 50), np.float32)
    reference[:, 0] = 0.9  # 2% of the values on
    lost = reference.copy()
    lost[:50, 0] = 0.1  # half the values that were on go off: 1% of all values
    assert quality("decision", [lost], [reference], None) == pytest.approx(0.99)
    assert quality("mask", [lost], [reference], None) == pytest.approx(0.5)
    scorer = Scorer(None, "mask", [reference], None, 1.0, n_samples=100)
    score = scorer.accumulate((i, [lost[i:i + 10]]) for i in range(0, 100, 10))
    assert score.loss == pytest.approx(0.5) and score.quality == pytest.approx(0.5)
    early = scorer.accumulate(((i, [lost[i:i + 10]]) for i in range(0, 100, 10)), max_loss=0.05)
    assert not early.complete and early.loss > 0.05


def test_a_model_with_two_heads_scores_both(folder, tmp_path):
    model = user_models.multi_output(folder)
    result = convert(model.path, data=model.search, **FAST)
    assert result.report["metric"] == "heads"
    assert result.report["heads"] == [{"output": "logits", "metric": "agreement"}, {"output": "mass", "metric": "l2"}]
    out = tmp_path / "two.moub"
    result.write(out)
    compressed = moub_runtime.InferenceSession(out).run(None, model.search)
    plain = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"]).run(None, model.search)
    mass_error = np.sqrt(output_energy([compressed[1]], [plain[1]])[0] / output_energy([plain[1]], [plain[1]])[1])
    assert mass_error <= 0.005 + 1e-9  # each head within the tolerance on the data it was judged on
    assert np.mean(compressed[0].argmax(1) != plain[0].argmax(1)) <= 0.005
    only = convert(model.path, data=model.search, metric="agreement", outputs=("logits",), **FAST)
    assert only.report["settings"]["outputs"] == ["logits"]


def test_feeds_from_python_and_a_calibration_data_reader(folder):
    from onnxruntime.quantization import CalibrationDataReader

    model = user_models.regressor(folder)
    proto = onnx.load(model.path)
    rows = [{"x": model.search["x"][i : i + 1]} for i in range(12)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter(rows)

        def get_next(self):
            return next(self.left, None)

    for source in (rows, Reader()):
        dataset = load_dataset(source, proto)
        assert dataset.n_samples == 12 and dataset.feeds is not None
        assert sum(1 for _ in dataset.batches()) == 12


def test_safe_casts_and_extra_arrays_are_said_once(folder):
    model = user_models.regressor(folder)
    proto = onnx.load(model.path)
    dataset = load_dataset({"x": model.search["x"].astype(np.float64), "notes": np.zeros(3)}, proto)
    assert dataset.inputs["x"].dtype == np.float32
    assert any("float64" in n for n in dataset.notes) and any("'notes'" in n for n in dataset.notes)
    with pytest.raises(DataError, match="int64"):
        load_dataset({"x": np.zeros((4, 10), np.int64)}, proto)


def test_disagreeing_sample_counts_name_the_way_out(folder):
    model = user_models.streaming_vad(folder)
    proto = onnx.load(model.path)
    bad = dict(model.search, state=model.search["state"][:, :7])
    with pytest.raises(DataError, match="--batch-axis"):
        load_dataset(bad, proto)
    shared_state = dict(model.search, state=model.search["state"][:, :1])
    dataset = load_dataset(shared_state, proto, batch_axes={"state": None})
    assert dataset.axis("state") is None and dataset.n_samples == model.search["input"].shape[0]


def _moub(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moub_runtime.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_bad_data_is_one_line_and_exit_2(folder, tmp_path):
    model = user_models.regressor(folder)
    rows = tmp_path / "rows.npy"
    np.save(rows, model.search["x"])
    out = tmp_path / "out.moub"
    for args in (["--data", rows], ["--data", tmp_path / "missing.npz"],
                 ["--data", _save(tmp_path / "d.npz", x=model.search["x"]), "--score-output", "nope"],
                 ["--data", _save(tmp_path / "d.npz", x=model.search["x"]), "--batch-axis", "x"]):
        proc = _moub("convert", model.path, "-o", out, *args, "--quiet")
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists()


def _save(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_the_written_file_is_scored_on_held_out_data(folder, tmp_path):
    """--test: the chosen file scored on samples the search never saw, as the user will run it."""
    model = user_models.regressor(folder)
    test = _save(tmp_path / "test.npz", **model.test)
    result = convert(model.path, data=model.search, test=test, **FAST)
    held = result.report["test"]
    out = tmp_path / "r.moub"
    result.write(out)
    assert held["samples"] == model.test["x"].shape[0] and held["metric"] == "l2"
    assert held["loss"] == pytest.approx(_held_out_l2(out, model.path, model.test), abs=1e-6)
    assert held["within_max_drop"] == (held["loss"] <= 0.005)
    assert "held-out samples" in result.closing_table()


def test_a_max_drop_given_in_percent_is_refused_with_what_was_meant(tmp_path):
    from test_convert_cli import MODEL, VAL

    out = tmp_path / "out.moub"
    proc = _moub("convert", MODEL, "-o", out, "--data", VAL, "--max-drop", "1", "--quiet")
    assert proc.returncode == 2 and "did you mean 0.01" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_no_count_of_broken_samples_for_rows_that_are_not_samples(folder, tmp_path):
    """A tagger's rows are frames of many feeds: a bound on broken *samples* would be false."""
    model = user_models.sequence_lstm(folder)
    result = convert(model.path, data=model.search, metric="agreement", outputs=("tags",), **FAST)
    assert result.report["resolution"] is None and "check" not in result.closing_table()


def test_a_detector_head_is_judged_per_channel_on_its_own_scale():
    """Boxes in pixels beside class scores below 1 (a raw YOLO head ``[N, 4 + C, anchors]``): a
    relative L2 error over the whole output hardly sees the scores; each channel on its own scale does."""
    from moub_converters.heads import choose_head

    rng = np.random.default_rng(0)
    reference = np.concatenate([rng.uniform(0, 320, (40, 4, 100)), rng.uniform(0, 0.05, (40, 6, 100))], 1)
    reference = reference.astype(np.float32)
    broken = reference.copy()
    broken[:, 4:] = 0.3  # every anchor now scores 0.3 in every class
    assert 1 - quality("l2", [broken], [reference], None) < 0.005
    assert 1 - quality("channels", [broken], [reference], None) > 0.5
    head = choose_head("output0", 0, "Concat", reference, 40, None)
    assert head.metric == "channels" and "differ" in head.reason
    scorer = Scorer(None, "channels", [reference], None, 1.0, n_samples=40)
    score = scorer.accumulate(((i, [broken[i:i + 8]]) for i in range(0, 40, 8)), max_loss=0.01)
    assert not score.complete and score.loss > 0.01
    same = scorer.accumulate((i, [reference[i:i + 8]]) for i in range(0, 40, 8))
    assert same.complete and same.loss == 0.0


def _without_dim_names(source: Path, target: Path) -> Path:
    """``source`` with every input and output dimension unnamed, as exporters that trace one
    shape leave them (silero-vad: input [?, ?], state [2, ?, 128], stateN [?, ?, ?])."""
    model = onnx.load(str(source))
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.ClearField("dim_param")
    onnx.save(model, str(target))
    return target


def test_a_state_whose_sample_axis_has_no_name_is_found_by_running_the_model(folder, tmp_path):
    # The state's two layers equal the batch of two samples the converter runs: only a run on
    # one and on three samples tells its sample axis (axis 1) from its layer axis.
    model = user_models.streaming_vad(folder)
    unnamed = _without_dim_names(model.path, tmp_path / "vad-unnamed.onnx")
    result = convert(unnamed, data=model.search, batch_size=2, **FAST)
    assert result.report["search"]["method"] != "lossless"
    assert result.report["loss"] <= 0.005
    out = tmp_path / "vad.moub"
    result.write(out)
    assert _held_out_l2(out, model.path, model.test) <= 2 * 0.005


def test_a_probability_averaged_inside_branches_is_judged_by_its_decisions():
    from onnx import TensorProto, helper

    from moub_converters.heads import producers

    def branch(name: str) -> onnx.GraphProto:
        nodes = [helper.make_node("Sigmoid", ["x"], [f"{name}_p"]),
                 helper.make_node("ReduceMean", [f"{name}_p"], [f"{name}_out"], axes=[1], keepdims=1)]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])

    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["prob"], then_branch=branch("then"), else_branch=branch("else")),
         helper.make_node("Softmax", ["x"], ["scores"]),
         helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1], keepdims=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
              helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("prob", "scores", "mean")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert producers(model) == {"prob": "Sigmoid", "scores": "Softmax", "mean": "ReduceMean"}
