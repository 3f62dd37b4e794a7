"""The per-layer table on the demo model: what the file holds of each tensor (``moub inspect
--layers``, read by the runtime alone), its measured sensitivity and its share of the chosen
file's output error, measured by onnxruntime; the shares sum to the error the written file
shows when the runtime runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import moub_runtime
from moub_converters import convert
from moub_converters.data import load_dataset
from moub_converters.intake import load_source, pool_weights
from moub_format import MoubFile
from moub_runtime.layers import layer_rows

DATA = Path(__file__).resolve().parent.parent / "converters" / "data"
MODEL, VAL = DATA / "digits_cnn.onnx", DATA / "digits_val.npz"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layers")
    result = convert(MODEL, data=VAL, max_drop=0.01)
    result.write(folder / "d.moub")
    result.write_report(folder / "d.json")
    return result, folder


def test_one_row_per_quantized_tensor_with_what_the_file_holds(converted):
    result, folder = converted
    pool = pool_weights(load_source(MODEL).model, result.report["settings"]["min_elements"])
    rows = result.report["layers"]
    assert [r["tensor"] for r in rows] == [s.path for s in pool.sites]
    assert [r["weights"] for r in rows] == [s.size for s in pool.sites]
    sensitivities = result.report["search"]["relative_distortion"]
    assert [r["sensitivity"] for r in rows] == sensitivities
    # bits per weight are the codes' own: together just under the packs' stored bits (chunk padding)
    with MoubFile(folder / "d.moub") as moub:
        stored_bits = 8 * sum(p.data.length for p in moub.index.packs)
    code_bits = sum(r["bits_per_weight"] * r["weights"] for r in rows)
    assert 0.97 * stored_bits < code_bits <= stored_bits
    assert all(r["step"] > 0 and 2 <= r["levels"] for r in rows)


def test_the_shares_sum_to_the_error_the_runtime_measures_on_the_written_file(converted):
    """The whole error is what moub_runtime's session of the written file gives on the same
    samples; the shares (two-order Shapley values) sum to it; restoring everything leaves none."""
    result, folder = converted
    summary = result.report["layer_error"]
    dataset = load_dataset(VAL, load_source(MODEL).model)
    x = np.asarray(dataset.take(dataset.spread(summary["samples"])).inputs["input"])  # the samples the shares were measured on
    original = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    moub = moub_runtime.InferenceSession(folder / "d.moub")
    ref = np.concatenate([original.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))]).astype(np.float64)
    out = np.concatenate([moub.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))]).astype(np.float64)
    whole = float(np.sum((out - ref) ** 2) / np.sum(ref**2))
    assert summary["distortion"] == pytest.approx(whole, rel=1e-3)
    shares = [r["error_share"] for r in result.report["layers"] if r["error_share"] is not None]
    assert sum(shares) == pytest.approx(1.0, abs=1e-3)
    assert summary["sum_of_drops"] == pytest.approx(summary["distortion"], rel=1e-3) and summary["left_restored"] < 1e-9
    # biases are restored with the weight they correct: their share is the weight's
    grouped = [r for r in result.report["layers"] if r["error_share"] is None]
    assert grouped and all(r["restored_with"] for r in grouped)
    assert "worst layers" in result.closing_table()


def test_inspect_layers_reads_the_file_and_joins_the_report(converted):
    result, folder = converted
    rows = layer_rows(folder / "d.moub")
    assert [(r.path, r.bits_per_weight, r.levels) for r in rows] == \
        [(r["tensor"], r["bits_per_weight"], r["levels"]) for r in result.report["layers"]]
    run = lambda *a: subprocess.run([sys.executable, "-m", "moub_runtime.cli", "inspect", folder / "d.moub", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    plain, joined = run("--layers"), run("--layers", "--report", folder / "d.json")
    assert plain.returncode == joined.returncode == 0, plain.stderr + joined.stderr
    assert "share" not in plain.stdout and "share" in joined.stdout
    assert all(len(line) <= 80 for line in plain.stdout.splitlines())
    top = max(result.report["layers"], key=lambda r: r["error_share"] or -1)
    assert any(line.startswith(top["tensor"]) and f"{100 * top['error_share']:.1f}%" in line for line in joined.stdout.splitlines())
    as_json = json.loads(run("--layers", "--json").stdout)
    assert [r["path"] for r in as_json["layers"]] == [r.path for r in rows]
    bad = run("--layers", "--report", folder / "d.moub")
    assert bad.returncode == 2 and "not a report with a per-layer table" in bad.stderr
    report = json.loads((folder / "d.json").read_text())
    report["layers"][0]["error_share"] = "most"
    (folder / "bad.json").write_text(json.dumps(report))
    bad = run("--layers", "--report", folder / "bad.json")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "error_share 'most' is not a number" in bad.stderr


def test_the_plot_has_both_panels(converted, tmp_path):
    result, _ = converted
    result.write_plot(tmp_path / "p.png")
    from PIL import Image

    with Image.open(tmp_path / "p.png") as image:
        assert image.size[0] > 1.8 * image.size[1]  # the Pareto plot and the per-layer plot side by side


def test_without_layer_shares_the_same_file_and_the_files_rows(converted):
    result, _ = converted
    quick = convert(MODEL, data=VAL, max_drop=0.01, layer_shares=False)
    assert quick.moub_bytes == result.moub_bytes
    assert quick.report["layer_error"] is None and "worst layers" not in quick.closing_table()
    assert [(r["tensor"], r["bits_per_weight"], r["sensitivity"]) for r in quick.report["layers"]] == \
        [(r["tensor"], r["bits_per_weight"], r["sensitivity"]) for r in result.report["layers"]]
    assert all(r["error_share"] is None for r in quick.report["layers"])


@pytest.mark.slow
def test_shares_on_a_real_model_sum_to_the_error_its_written_file_shows(tmp_path):
    """PP-OCR's text-direction classifier (rapidocr's wheel) with 64 equal-width bins: the
    restoring runs' shares add up to the whole error, which is what moub_runtime's session of
    the encoded file shows on the same samples; restored one at a time they would not add up."""
    from test_real_models import model_file

    from moub_converters.api import _Setup
    from moub_converters.encode import encode_model
    from moub_converters.layer_errors import distortion, error_shares, groups_of
    from moub_converters.modes.paper import fixed_bins
    from moub_converters.options import ConvertOptions

    source = load_source(model_file("cls"))
    pool = pool_weights(source.model, 1024)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (8, 3, 48, 192)).astype(np.float32)
    options = ConvertOptions(metric="l2", mode="paper")
    setup = _Setup.build(source, pool, {"x": x}, None, None, options)
    session = setup.session(source.model, options)
    quant, _ = fixed_bins(pool, 64)
    quantized = quant.site_arrays(pool)
    summary, by_site = error_shares(session, quantized, (), 8)
    assert summary["groups"] == len(pool.sites) == 27
    assert summary["sum_of_drops"] == pytest.approx(summary["distortion"], rel=1e-6) and summary["left_restored"] < 1e-12
    assert sum(v["error_share"] for v in by_site.values()) == pytest.approx(1.0, abs=1e-4)
    path = tmp_path / "cls64.moub"
    path.write_bytes(encode_model(source.model, quant.codebooks, quant.assignments(pool), {}))
    moub = moub_runtime.InferenceSession(path)
    original = ort.InferenceSession(str(model_file("cls")), providers=["CPUExecutionProvider"])
    out = np.concatenate([moub.run(None, {"x": x[i : i + 1]})[0] for i in range(8)]).astype(np.float64)
    ref = np.concatenate([original.run(None, {"x": x[i : i + 1]})[0] for i in range(8)]).astype(np.float64)
    assert summary["distortion"] == pytest.approx(float(np.sum((out - ref) ** 2) / np.sum(ref**2)), rel=1e-3)
    # one at a time (each restored alone) the drops do not sum to the whole: the reason for the two orders
    alone = sum(summary["distortion"] - distortion(session, {**quantized, pool.sites[g[0]].path:
                                                             session.originals[pool.sites[g[0]].path]}, 8)
                for g in groups_of(pool, ()))
    assert abs(alone - summary["distortion"]) > 0.05 * summary["distortion"]
