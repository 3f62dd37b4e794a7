"""What a process needs to score candidates, and a parallel map over candidates.

An :class:`EvalContext` holds the pool, the data, the metric and the original
outputs. The main process builds it once; with ``workers > 1`` it is pickled
once into each worker process (spawned, so no onnxruntime state is forked),
which rebuilds its own evaluator. Candidates then travel as small decisions
(a bin count, a merge recipe) and results come back as small dicts.

The map goes through pymoo's elementwise runners: ``LoopedElementwiseEvaluation``
in-process, ``StarmapParallelization`` over a process pool otherwise.
"""

from __future__ import annotations

import functools
import multiprocessing
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx
from pymoo.core.problem import LoopedElementwiseEvaluation
from pymoo.parallelization.starmap import StarmapParallelization

from moub_runtime.loader import EXTERNAL_THRESHOLD, fits_inline

from .data import Dataset
from .evaluate import Evaluator, Scorer
from .intake import Pool
from .options import ConvertOptions


@dataclass
class EvalContext:
    model: onnx.ModelProto
    pool: Pool
    dataset: Dataset
    metric: str
    reference: list[np.ndarray]
    quality_original: float
    options: ConvertOptions
    strategy: str = "auto"
    _scorer: Scorer | None = field(default=None, repr=False)

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            evaluator = Evaluator(self.model, self.pool, self.dataset, self.strategy)
            self._scorer = Scorer(evaluator, self.metric, self.reference, self.dataset.labels, self.quality_original)
        return self._scorer

    def use_scorer(self, scorer: Scorer) -> None:
        self._scorer = scorer

    @property
    def search_max_loss(self) -> float:
        """Search evaluations stop once their loss provably exceeds this."""
        return self.options.effective_abort_drop()

    @property
    def feasible_max_loss(self) -> float:
        """Merge trials only need to know whether they stay within the tolerance."""
        return self.options.max_drop

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_scorer"] = None
        state["model"] = self.model.SerializeToString()
        return state

    def __setstate__(self, state: dict) -> None:
        model = onnx.ModelProto()
        model.ParseFromString(state["model"])
        state["model"] = model
        self.__dict__.update(state)


_WORKER_CONTEXT: EvalContext | None = None


def _init_worker(payload: bytes) -> None:
    global _WORKER_CONTEXT
    _WORKER_CONTEXT = pickle.loads(payload)


def _call_in_worker(fn: Callable[[EvalContext, object], dict], arg) -> dict:
    assert _WORKER_CONTEXT is not None, "worker process was not initialised"
    return fn(_WORKER_CONTEXT, arg)


Mapper = Callable[[Callable[[EvalContext, object], dict], Sequence], list]


@contextmanager
def candidate_map(ctx: EvalContext, workers: int, on_result: Callable[[dict], None] | None = None) -> Iterator[Mapper]:
    """Yield ``map(fn, args) -> [fn(ctx, arg) for arg in args]``, run by a pymoo elementwise runner.

    ``fn`` must be a module-level function (it is pickled by name for workers).
    ``on_result`` sees each result as it is collected (progress reporting).
    A model past protobuf's 2 GiB runs in this process whatever ``workers`` says: the context
    reaches a worker as one serialized model, which protobuf cannot make past 2 GiB (and each
    worker would hold the model again). Every mapping gives the same results either way.
    """
    if workers > 1 and not fits_inline(ctx.model, EXTERNAL_THRESHOLD):
        workers = 1
    if workers <= 1:
        runner = LoopedElementwiseEvaluation()

        def run_local(fn, args):
            def one(arg):
                result = fn(ctx, arg)
                if on_result:
                    on_result(result)
                return result
            return runner(one, list(args))

        yield run_local
        return
    payload = pickle.dumps(ctx, protocol=pickle.HIGHEST_PROTOCOL)
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(payload,)) as pool:
        runner = StarmapParallelization(pool.starmap)

        def run_parallel(fn, args):
            results = runner(functools.partial(_call_in_worker, fn), list(args))
            for result in results:
                if on_result:
                    on_result(result)
            return results

        yield run_parallel
