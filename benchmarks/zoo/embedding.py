"""Fidelity of a sentence-embedding model: what a user of the vectors sees (retrieval), not one number.

The figure is top-1 neighbour agreement: for each held-back sentence, its nearest other held-back
sentence by cosine is the same under the candidate as under the shipped model. The mean and the
worst cosine between the two models' vectors of the same sentence are beside it.
"""
from __future__ import annotations

import numpy as np

from ..fidelity import Fidelity
from .core import cosine

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
