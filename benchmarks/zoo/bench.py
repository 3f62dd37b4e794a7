"""A zoo model as `make bench` sees one: its .onnx, its search data and its fidelity on the test split.

`benchmarks.run` takes zoo names beside the five bench models (`--models nudenet,silero_vad`, or
`--models zoo` for all nine); every peer then runs on the zoo model through the same `Context`, judged by
the model's own criterion (`ZooModel.score`, `ZooModel.passes`) on its held-back test split.
"""
from __future__ import annotations

from pathlib import Path

from ..fidelity import Fidelity
from . import ZOO, get


def is_zoo(name: str) -> bool:
    return name in ZOO


class ZooEvaluator:
    """What `bench_model` needs of a model: the original, the test split's size, the original's own
    score on it, and a candidate's score (a decoded .onnx)."""

    def __init__(self, name: str) -> None:
        self.model = get(name)
        self.onnx_path = self.model.path()
        self.test = self.model.split("test")
        self.n = len(self.test.feeds)
        self.reference = self.model.score(self.onnx_path, self.test)

    def evaluate(self, candidate: Path) -> Fidelity:
        return self.model.score(Path(candidate), self.test)

    def passes(self, fid: Fidelity) -> bool:
        return self.model.passes(fid)

    def search_data(self, folder: Path) -> Path:
        """The search split as the converter takes it: DATA.npz where the feeds stack, else the
        folder of one .npz per feed."""
        written = self.model.write_data(folder, "search")
        return written.get("data", written["feeds"])


__all__ = ["ZooEvaluator", "is_zoo"]
