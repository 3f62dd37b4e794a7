"""The search/confirm split of the sample data.

The search steers on one half of the samples (the even ones); a candidate it picks is chosen
only if the other half (the odd ones), which no choice was made on, confirms it. Picking the
smallest of many candidates whose loss, measured on a few hundred samples, happens to be within
the tolerance is the winner's curse: the confirm half is the honest check (docs/decisions/0007).
It judges label metrics by agreement with the original (``Metric.confirmed_as``). With fewer
than ``MIN_SPLIT`` samples there is nothing to split: both halves are all the data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .data import Dataset
from .evaluate import Evaluator, Scorer, subset_reference
from .metrics import METRICS, Heads, confirm_heads, quality

MIN_SPLIT = 8
HALVES = ("search", "confirm")


def is_split(n_samples: int) -> bool:
    """Whether data of ``n_samples`` samples is split into two halves."""
    return n_samples >= MIN_SPLIT


def half_indices(n_samples: int, half: str) -> np.ndarray:
    """The samples of ``half``: even ones for the search, odd ones for the confirm half."""
    if half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}, not {half!r}")
    return np.arange(0 if half == "search" else 1, n_samples, 2)


def search_half(dataset: Dataset) -> Dataset:
    """The data the search (and the calibration) sees."""
    return dataset.take(half_indices(dataset.n_samples, "search")) if is_split(dataset.n_samples) else dataset


def half_scorer(evaluator: Evaluator, metric: str, dataset: Dataset, reference: Sequence[np.ndarray], half: str,
                originals: Callable[[], Mapping[str, np.ndarray]], heads: Heads = (), max_drop: float | None = None) -> Scorer:
    """A scorer on one half of ``dataset`` (split; see :func:`is_split`), with the original's
    outputs on it and the metric that half judges by."""
    n = dataset.n_samples
    picked = half_indices(n, half)
    data = dataset.take(picked)
    half_reference = subset_reference(evaluator, reference, n, picked, data, originals)
    labels = None if dataset.labels is None else dataset.labels[picked]
    judged_by = METRICS[metric].confirm if half == "confirm" else metric
    heads = confirm_heads(heads) if half == "confirm" else heads
    q0 = quality(judged_by, half_reference, half_reference, labels, heads)
    return Scorer(evaluator, judged_by, half_reference, labels, q0, dataset=data, heads=heads, max_drop=max_drop,
                  resolving_samples=n)
