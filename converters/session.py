"""One conversion's inputs, and what is computed from them once, as attributes of one object.

A :class:`ConversionSession` holds the model, the pool, the data, the metric and the original's
outputs; from them, on first use, the scorer of the whole data and of each half
(``split.py``), the pool's original values, the sites' statistics, the calibration and the
sample subsets of the sensitivity runs. The main process builds it once per conversion; with
``workers > 1`` each worker process gets the inputs once (pickled; spawned, so no onnxruntime
state is forked) and computes the rest itself, with one onnxruntime thread, so every process
holds the same bits. Candidates then travel as small decisions and results as small dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from . import calibration
from .calibration import Calibration
from .data import Dataset
from .evaluate import Evaluator, Scorer, original_arrays, subset_reference
from .heads import producers
from .intake import Pool
from .options import ConvertOptions
from .metrics import Heads
from .split import half_scorer, is_split
from .uniform import RAM_LEVEL_LIMITS, SiteStats, site_stats

_DERIVED = ("_scorer", "_originals", "_site_stats", "_halves", "_calibration", "_subsets", "_output_kinds")


@dataclass
class ConversionSession:
    model: onnx.ModelProto
    pool: Pool
    dataset: Dataset
    metric: str
    reference: list[np.ndarray]
    quality_original: float
    options: ConvertOptions
    strategy: str = "auto"
    heads: Heads = ()  # (output, metric) per head when ``metric`` is the composite one
    # computed on first use, in each process
    _scorer: Scorer | None = field(default=None, repr=False)
    _originals: dict[str, np.ndarray] | None = field(default=None, repr=False)
    _site_stats: SiteStats | None = field(default=None, repr=False)
    _halves: dict[str, Scorer] = field(default_factory=dict, repr=False)
    _calibration: Calibration | None = field(default=None, repr=False)
    _subsets: dict[int, tuple[Dataset, list[np.ndarray]]] = field(default_factory=dict, repr=False)
    _output_kinds: list[str] | None = field(default=None, repr=False)

    def with_pool(self, pool: Pool) -> ConversionSession:
        """A session of the same model, data and metric over ``pool``, what it derives measured
        afresh; but where ``pool`` holds this pool's very sites and values (only their ``--ram``
        windows differ), the scorers, originals, calibration and sample subsets are this session's."""
        session = ConversionSession(self.model, pool, self.dataset, self.metric, self.reference, self.quality_original,
                                    self.options, self.strategy, self.heads)
        if pool.values is self.pool.values and pool.sites == self.pool.sites:
            session._scorer, session._originals, session._halves = self._scorer, self._originals, self._halves
            session._calibration, session._subsets, session._output_kinds = self._calibration, self._subsets, self._output_kinds
        return session

    @property
    def scorer(self) -> Scorer:
        """Scores candidate weights on all the data."""
        if self._scorer is None:
            evaluator = Evaluator(self.model, self.pool, self.dataset, self.strategy, outputs=self.options.outputs)
            self._scorer = Scorer(evaluator, self.metric, self.reference, self.dataset.labels, self.quality_original,
                                  heads=self.heads, max_drop=self.options.guarded_max_drop())
        return self._scorer

    def use_scorer(self, scorer: Scorer) -> None:
        """Score with ``scorer`` (the one the converter measured the original with)."""
        self._scorer = scorer

    @property
    def originals(self) -> dict[str, np.ndarray]:
        """The pooled sites' original values (``evaluate.original_arrays``)."""
        if self._originals is None:
            self._originals = original_arrays(self.model, self.pool)
        return self._originals

    @property
    def site_stats(self) -> SiteStats:
        if self._site_stats is None:
            self._site_stats = site_stats(self.pool, RAM_LEVEL_LIMITS[self.options.ram])
        return self._site_stats

    def half(self, name: str) -> Scorer:
        """The scorer of the ``search`` or ``confirm`` half (``split.py``); with too few samples
        to split, the scorer of all the data."""
        if not is_split(self.dataset.n_samples):
            return self.scorer
        if name not in self._halves:
            self._halves[name] = half_scorer(self.scorer.evaluator, self.metric, self.dataset, self.reference, name,
                                             lambda: self.originals, self.heads, self.options.guarded_max_drop())
        return self._halves[name]

    @property
    def calibration(self) -> Calibration:
        """The statistics that round better than to the nearest level, measured on the search half."""
        if self._calibration is None:
            data = self.dataset
            if self.options.bias_correction or self.options.error_feedback:
                data = self.half("search").dataset or self.dataset
            self._calibration = calibration.measure(self.model, self.pool, data, self.options)
        return self._calibration

    def sample_subset(self, samples: int) -> tuple[Dataset, list[np.ndarray]]:
        """``samples`` samples spread over the data, and the original's outputs on them."""
        if samples not in self._subsets:
            picked = self.dataset.spread(samples)
            subset = self.dataset.take(picked)
            reference = subset_reference(self.scorer.evaluator, self.reference, self.dataset.n_samples, picked, subset,
                                         lambda: self.originals)
            self._subsets[samples] = (subset, reference)
        return self._subsets[samples]

    @property
    def output_metrics(self) -> list[str]:
        """The metric that judges each scored output (its head's, else the conversion's)."""
        by_head = dict(self.heads)
        return [by_head.get(i, self.metric) if self.heads else self.metric for i in range(len(self.reference))]

    @property
    def output_kinds(self) -> list[str]:
        """The op type that makes each scored output (``heads.producers``: "Softmax", "Sigmoid", ...)."""
        if self._output_kinds is None:
            made = producers(self.model)
            self._output_kinds = [made.get(name, "") for name in self.scorer.evaluator.output_names]
        return self._output_kinds

    @property
    def per_channel_outputs(self) -> frozenset[int]:
        """Positions of the scored outputs the metric judges channel by channel."""
        return frozenset(i for i, metric in enumerate(self.output_metrics) if metric == "channels")

    @property
    def search_max_loss(self) -> float:
        """Search evaluations stop once their loss provably exceeds this."""
        return self.options.effective_abort_drop()

    @property
    def feasible_max_loss(self) -> float:
        """Merge trials only need to know whether they stay within the tolerance."""
        return self.options.max_drop

    def __getstate__(self) -> dict:
        """The inputs only (the model as bytes): a worker computes the rest itself."""
        state = {k: v for k, v in self.__dict__.items() if k not in _DERIVED}
        state["model"] = self.model.SerializeToString()
        return state

    def __setstate__(self, state: dict) -> None:
        model = onnx.ModelProto()
        model.ParseFromString(state["model"])
        self.__dict__.update(state, model=model, _scorer=None, _originals=None, _site_stats=None, _halves={},
                             _calibration=None, _subsets={})
