"""Fidelity of a sentence-embedding model: what a user of the vectors sees (retrieval), not one number.

The figure is top-1 neighbour agreement: for each held-back sentence, its nearest other held-back
sentence by cosine is the same under the candidate as under the shipped model. The mean and the
worst cosine between the two models' vectors of the same sentence are beside it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import config as C
from ..fidelity import Fidelity
from . import sources
from .core import Feed, Memo, Samples, Split, ZooModel, cosine

MIN_MEAN_COSINE = 0.99


def nearest(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def embedding_fidelity(ref: np.ndarray, out: np.ndarray) -> Fidelity:
    cos = cosine(ref, out)
    agree = float(np.mean(nearest(ref) == nearest(out)))
    return Fidelity(agree, "top-1 neighbour agreement", {"mean cosine": float(cos.mean()), "min cosine": float(cos.min())})


def embedding_passes(fid: Fidelity, target: float) -> bool:
    return fid.value >= target and fid.extra["mean cosine"] >= MIN_MEAN_COSINE


class SentenceEncoder(ZooModel):
    """A zoo model whose samples are sentences run through its package's own embedder (``embed``:
    model path, texts -> the recorded feeds and the package's sentence vectors)."""

    embed: Callable[[Path, list[str]], tuple[list[Feed], np.ndarray]]
    text_seed: int
    settings = {"sentences": 400}

    def __init__(self) -> None:
        self._memo = Memo()

    def texts(self) -> list[str]:
        return sources.sentences(self.settings["sentences"], seed=self.text_seed, max_words=40)

    def build(self) -> Samples:
        texts = self.texts()
        feeds, _ = self.embed(self.path(), texts)
        return Samples(feeds, np.arange(len(feeds)), {"texts": np.asarray(texts)})

    def _texts(self, test: Split) -> list[str]:
        return [str(test.side["texts"][g]) for g in test.group_ids]

    def score(self, candidate: Path, test: Split) -> Fidelity:
        ref = self._memo.get((self.name, test.name), lambda: self.embed(self.path(), self._texts(test))[1])
        return embedding_fidelity(ref, self.embed(candidate, self._texts(test))[1])

    def passes(self, fid: Fidelity) -> bool:
        return embedding_passes(fid, C.FIDELITY_TARGET)
