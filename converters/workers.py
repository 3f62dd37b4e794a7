"""A parallel map over candidates: in this process, or in worker processes each holding the session.

The map goes through pymoo's elementwise runners: ``LoopedElementwiseEvaluation`` in-process,
``StarmapParallelization`` over a process pool otherwise. A worker process holds one
:class:`~.session.ConversionSession`, unpickled once when it starts; the functions mapped are
module-level (pickled by name) and take that session and one small task.
"""

from __future__ import annotations

import functools
import multiprocessing
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from pymoo.core.problem import LoopedElementwiseEvaluation
from pymoo.parallelization.starmap import StarmapParallelization

from moub_runtime.loader import EXTERNAL_THRESHOLD, fits_inline

from .session import ConversionSession

Mapper = Callable[[Callable[[ConversionSession, object], dict], Sequence], list]


_WORKER_SESSION: ConversionSession | None = None  # in a worker process: its session, unpickled once at start


def _init_worker(payload: bytes) -> None:
    global _WORKER_SESSION
    _WORKER_SESSION = pickle.loads(payload)


def _call_in_worker(fn: Callable[[ConversionSession, object], dict], arg) -> dict:
    assert _WORKER_SESSION is not None, "worker process was not initialised"
    return fn(_WORKER_SESSION, arg)


@contextmanager
def candidate_map(session: ConversionSession, workers: int,
                  on_result: Callable[[dict], None] | None = None) -> Iterator[Mapper]:
    """Yield ``map(fn, args) -> [fn(session, arg) for arg in args]``, run by a pymoo elementwise runner.

    ``fn`` must be a module-level function (it is pickled by name for workers).
    ``on_result`` sees each result as it is collected (progress reporting).
    A model past protobuf's 2 GiB runs in this process whatever ``workers`` says: the session
    reaches a worker as one serialized model, which protobuf cannot make past 2 GiB (and each
    worker would hold the model again). Every mapping gives the same results either way.
    """
    if workers > 1 and not fits_inline(session.model, EXTERNAL_THRESHOLD):
        workers = 1
    if workers <= 1:
        runner = LoopedElementwiseEvaluation()

        def run_local(fn, args):
            def one(arg):
                result = fn(session, arg)
                if on_result:
                    on_result(result)
                return result
            return runner(one, list(args))

        yield run_local
        return
    payload = pickle.dumps(session, protocol=pickle.HIGHEST_PROTOCOL)
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(payload,)) as pool:
        runner = StarmapParallelization(pool.starmap)

        def run_parallel(fn, args):
            results = runner(functools.partial(_call_in_worker, fn), list(args))
            for result in results:
                if on_result:
                    on_result(result)
            return results

        yield run_parallel
