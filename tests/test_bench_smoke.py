"""Smoke test of the benchmark harness (`make bench-smoke`) on the demo digits model.

Runs `benchmarks.run` with cheap methods (lossless zstd, fp16, one lossy peer: 1-D k-means, and
moub with a tiny search budget once the converter exists) and checks that the table holds real,
measured numbers. The full `make bench` is not run in CI.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("zstandard")


def _converter_available() -> bool:
    try:
        from moub_converters import convert  # noqa: F401
    except ImportError:
        return False
    return True


def _rows(md: str, section: str) -> list[list[str]]:
    body = md.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in body.splitlines() if line.startswith("| ") and not line.startswith("| method")]


def test_smoke_harness_on_digits(tmp_path):
    from benchmarks import run

    peers = ["zstd", "fp16", "kmeans", "moub_paper"]
    assert run.main(["--smoke", "--peers", ",".join(peers), "--out", str(tmp_path), "--no-runtime"]) == 0
    md = (tmp_path / "RESULTS.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 10_000
    rows = _rows(md, "digits")
    by_method: dict[str, list[list[str]]] = {}
    for r in rows:
        by_method.setdefault(r[0], []).append(r)
    original = by_method.pop("fp32 original (.onnx)")[0]
    fp32_bytes = (ROOT / "converters" / "data" / "digits_cnn.onnx").stat().st_size
    assert int(original[2].replace(",", "")) == fp32_bytes
    measured = {m: rs for m, rs in by_method.items() if rs[0][2] != "–"}
    for method in ("zstd -19 (lossless)", "fp16 weights (range-checked)", "1-D k-means + Huffman (one codebook)"):
        assert method in measured, f"no numbers for {method}: {by_method.get(method)}"
        for r in measured[method]:
            nbytes, ratio, fid = int(r[2].replace(",", "")), float(r[3]), float(r[4].rstrip("%"))
            assert nbytes > 0 and abs(ratio - fp32_bytes / nbytes) < 0.01
            assert 0 < fid <= 100
            assert float(r[8]) > 0  # load time measured in a fresh process
    assert float(measured["zstd -19 (lossless)"][0][3]) > 1
    assert float(measured["fp16 weights (range-checked)"][0][3]) > 1.9
    assert any(float(r[3]) > 5 and r[6] == "yes" for r in measured["1-D k-means + Huffman (one codebook)"])
    moub = [m for m in by_method if m.startswith("moub")]
    assert moub, "the moub row is missing"
    if _converter_available():
        r = by_method[moub[0]][0]
        assert r[2] != "–", f"moub row has no numbers: {r}"
        assert "bits/weight vs entropy" in r[-1] and "evaluations" in r[-1]
    else:
        assert "unavailable" in by_method[moub[0]][0][-1]
    headline = _rows(md, "Headline")
    assert len(headline) == len(peers)
    assert re.search(r"\*\*\d+\.\d\d\*\*", headline[0][1])


def test_kmeans_1d_matches_brute_force_lloyd():
    from benchmarks.peers.kmeans import assign, kmeans_1d

    rng = np.random.default_rng(0)
    x = np.sort(np.concatenate([rng.normal(0, 0.05, 3000), rng.normal(2, 0.5, 100)]))
    k = 8
    centres = kmeans_1d(x, k, iters=200)
    ref = np.linspace(x[0], x[-1], k)
    for _ in range(200):
        idx = np.abs(x[:, None] - ref[None, :]).argmin(1)
        ref = np.array([x[idx == j].mean() for j in range(ref.size) if np.any(idx == j)])
    np.testing.assert_allclose(centres, ref, rtol=0, atol=1e-9)
    idx = assign(x, centres)
    np.testing.assert_array_equal(idx, np.abs(x[:, None] - centres[None, :]).argmin(1))


def test_kmeans_file_round_trip():
    import onnx

    from benchmarks.models import DIGITS_MODEL
    from benchmarks.peers import kmeans
    from benchmarks.peers.weights import load_lifted, pool_arrays

    model = load_lifted(DIGITS_MODEL)
    blob, facts = kmeans.encode(model, 64)
    decoded = pool_arrays(kmeans.decode(blob))
    original = pool_arrays(model)
    assert set(decoded) == set(original)
    values = np.concatenate([decoded[n].ravel() for n in original])
    assert np.unique(values).size == facts["clusters used"]
    err = max(float(np.abs(decoded[n] - original[n]).max()) for n in original)
    spread = max(float(np.ptp(a)) for a in original.values())
    assert err < spread / 64
    assert facts["entropy"] <= facts["bits/weight"] < facts["entropy"] + 1
    assert isinstance(kmeans.decode(blob), onnx.ModelProto)


def test_sweep_bisects_to_first_pass():
    from benchmarks.fidelity import Fidelity
    from benchmarks.peers import Candidate, Context, sweep

    calls = []

    def encode(s):
        calls.append(s)
        return Candidate(f"s={s}", Path("x"), 100 - s, 0.0, Path("x"), fidelity=Fidelity(s / 10, "m"))

    ctx = Context("m", Path("x"), Path("."), lambda p: None, lambda f: f.value >= 0.6, Path("x"))
    done = sweep(ctx, list(range(11)), encode, midpoint=None, bisect=True)
    assert [c.setting for c in done if ctx.passes(c.fidelity)][0] == "s=6"
    assert len(calls) <= 4 and 5 in calls


@pytest.mark.skipif(not _converter_available(), reason="needs the converter")
def test_swept_row_rebuilds_moub_best_at_other_step_scales(tmp_path):
    """The moub_swept row bisects the step scale of moub_best's own conversion on the test split:
    its files carry moub_best's gamma and metadata, differ only in x, and the coarsest it tries is
    smaller than moub_best's file."""
    import json

    from benchmarks import run
    from moub_format import MoubFile

    assert run.main(["--smoke", "--peers", "moub_best,moub_swept", "--out", str(tmp_path), "--no-runtime"]) == 0
    work = tmp_path / "work" / "digits"
    best = sorted((work / "moub_best").glob("*.moub"))[0]
    report = json.loads(best.with_suffix(".report.json").read_text())
    swept = sorted((work / "moub_swept").glob("*.moub"))
    assert len(swept) >= 2
    gamma = report["choice"]["recipe"]["gamma"]
    with MoubFile(best) as moub:
        metadata = dict(moub.index.metadata)
    xs = []
    for path in swept:
        xs.append(float(path.stem.removeprefix("moub_swept_x")))
        with MoubFile(path) as moub:
            assert dict(moub.index.metadata) == metadata
    assert max(xs) > report["choice"]["recipe"]["x"]
    coarsest = work / "moub_swept" / f"moub_swept_x{max(xs):+.4f}.moub"
    assert coarsest.stat().st_size < best.stat().st_size
    md = (tmp_path / "RESULTS.md").read_text()
    rows = [r for r in _rows(md, "digits") if r[0].startswith("moub best (--mode adaptive), step swept")]
    assert len(rows) == len(swept) and all(f"gamma={gamma:g}" in r[1] for r in rows)


def test_swept_row_needs_moub_best(tmp_path):
    from benchmarks import run

    assert run.main(["--smoke", "--peers", "moub_swept", "--out", str(tmp_path), "--no-runtime"]) == 0
    rows = _rows((tmp_path / "RESULTS.md").read_text(), "digits")
    assert any("needs the moub_best row" in r[-1] for r in rows)


def test_the_peers_code_weights_inside_branches_and_float16_weights(tmp_path):
    """Every peer codes the same pool as moub: `Constant` weights inside `If` branches (a recurrent
    model's) are lifted to the main graph, float16 initializers are coded as float32 and stored back
    as float16, and the rebuilt model runs in onnxruntime with the same outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from benchmarks.peers.weights import fill, load_lifted, pool_arrays, pool_names, strip

    rng = np.random.default_rng(0)
    branch_w = rng.standard_normal((64, 32)).astype(np.float32)
    half_w = rng.standard_normal((32, 64)).astype(np.float16)

    def branch(name: str, scale: float) -> onnx.GraphProto:
        const = helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(branch_w * scale, f"{name}_w"))
        return helper.make_graph([const, helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)])

    nodes = [helper.make_node("If", ["flag"], ["h"], then_branch=branch("then", 1.0), else_branch=branch("else", -1.0)),
             helper.make_node("Cast", ["h"], ["h16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["h16", "half_w"], ["y16"]),
             helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
                              [numpy_helper.from_array(half_w, "half_w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "peer-pool.onnx"
    onnx.save(model, str(path))
    lifted = load_lifted(path)
    names = pool_names(lifted)
    assert sorted(names) == ["else_w", "half_w", "then_w"]
    arrays = pool_arrays(lifted)
    assert all(a.dtype == np.float32 for a in arrays.values())
    rebuilt = fill(strip(lifted, names), arrays)
    assert {t.name: t.data_type for t in rebuilt.graph.initializer}["half_w"] == TensorProto.FLOAT16
    feed = {"x": rng.standard_normal((2, 64)).astype(np.float32)}
    for flag in (True, False):
        feed["flag"] = np.array(flag)
        runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
                for m in (model, rebuilt)]
        np.testing.assert_array_equal(*runs)
