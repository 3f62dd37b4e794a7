"""The search both modes share: a cached, wave-based pymoo problem and one NSGA-II loop.

A mode's decisions (a bin count; a step scale and gamma) sit on an integer grid. Two
objectives, both minimised: quality loss (the tolerance measure of ``metrics.py``, measured by
onnxruntime on the user's data) and the bits per weight the candidate will take, known before
it runs. Evaluations are cached by decision; the uncached ones of a generation go through the
mode's runner (in this process or worker processes, ``workers.py``).

The size of a candidate is known before it runs, so each search evaluation is told the least
loss of the already-evaluated smaller candidates: once its own loss provably reaches that, it
is dominated and stops (possibly before running at all). New candidates run in waves of
``wave`` (smallest first), each wave knowing the results of the waves before it, so the largest
candidates of a generation are usually skipped. The wave is a fixed setting, not the worker
count: the result does not depend on ``--workers``. Losses beyond ``loss_cap`` (where
evaluations stop early) all count as the cap, and below ``loss_floor`` as the floor: that far
from the tolerance the exact loss should not steer the search.

The NSGA-II run is seeded and stops early when the front's decisions have not changed for
``patience`` generations, or when a generation brings nothing new to evaluate.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair

# (decision, dominated_at) tasks, the loss an evaluation may stop beyond, the stage -> result dicts
Runner = Callable[[list[tuple[object, float | None]], float, str], list[dict]]


class CachedProblem(Problem):
    """Minimise (quality loss, bits per weight) over a grid of decisions, every evaluation cached.

    A subclass says what a row of X decides (:meth:`decisions`) and what a decision is cached by
    (:meth:`key`); ``size_of(decision)`` gives its bits per weight before it runs. Results are
    dicts with at least ``loss``, ``complete`` and ``bits_per_weight``; ``cache`` holds them by
    key and ``order`` the keys in evaluation order."""

    what = "decisions"  # what the decisions are, as the stop reason names them

    def __init__(self, xl: Sequence[float], xu: Sequence[float], run: Runner, size_of: Callable[[object], float],
                 loss_cap: float = float("inf"), wave: int = 2, loss_floor: float | None = None) -> None:
        super().__init__(n_var=len(xl), n_obj=2, xl=np.array(xl, dtype=float), xu=np.array(xu, dtype=float), vtype=float)
        self.run = run
        self.size_of = size_of
        self.loss_cap = loss_cap
        self.loss_floor = loss_floor
        self.wave = max(1, wave)
        self.cache: dict[Hashable, dict] = {}
        self.order: list[Hashable] = []

    def decisions(self, X: np.ndarray) -> list:
        raise NotImplementedError

    def key(self, decision) -> Hashable:
        return decision

    def dominance_bound(self, bits: float) -> float | None:
        """The least loss of the evaluated smaller candidates (None: none yet): a candidate that
        provably reaches it is dominated. Below the floor losses count as equal, so once a smaller
        candidate is below it, a larger one cannot win at all and is not run (bound 0)."""
        known = [r["loss"] for r in self.cache.values() if r["complete"] and r["bits_per_weight"] < bits]
        if not known:
            return None
        best = min(known)
        return 0.0 if self.loss_floor is not None and best <= self.loss_floor else best

    def objectives(self, key: Hashable) -> tuple[float, float]:
        r = self.cache[key]
        loss = r["loss"] if self.loss_floor is None else max(r["loss"], self.loss_floor)
        return min(loss, self.loss_cap), r["bits_per_weight"]

    def evaluate_decisions(self, decisions: Sequence, max_loss: float | None = None, stage: str = "search") -> None:
        """Evaluate the uncached ``decisions``, smallest first, a wave at a time (only ``search``
        evaluations are told the dominance bound)."""
        todo = sorted({self.key(d): d for d in decisions if self.key(d) not in self.cache}.values(),
                      key=lambda d: (self.size_of(d), self.key(d)))
        for start in range(0, len(todo), self.wave):
            wave = todo[start : start + self.wave]
            tasks = [(d, self.dominance_bound(self.size_of(d)) if stage == "search" else None) for d in wave]
            for d, result in zip(wave, self.run(tasks, self.loss_cap if max_loss is None else max_loss, stage)):
                self.cache[self.key(d)] = result
                self.order.append(self.key(d))

    def front_keys(self, X: np.ndarray) -> tuple:
        return tuple(sorted({self.key(d) for d in self.decisions(X)}))

    def _evaluate(self, X, out, *args, **kwargs):
        decisions = self.decisions(X)
        self.evaluate_decisions(decisions)
        out["F"] = np.array([self.objectives(self.key(d)) for d in decisions], dtype=np.float64)


def run_nsga2(problem: CachedProblem, sampling: Sampling, population: int, generations: int, patience: int, seed: int,
              mutation_prob: float, on_generation: Callable[[int], None] | None = None) -> dict:
    """Run NSGA-II on ``problem`` (its cache then holds every evaluation); return the run's facts."""
    algorithm = NSGA2(
        pop_size=population,
        sampling=sampling,
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(prob=mutation_prob, eta=20, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    algorithm.setup(problem, termination=("n_gen", generations), seed=seed, verbose=False)
    previous: tuple | None = None
    unchanged = 0
    stopped = "generation limit"
    generation = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymoo warns when mating finds no new unique offspring
        while algorithm.has_next():
            before = len(problem.cache)
            algorithm.next()
            generation += 1
            if on_generation:
                on_generation(generation)
            opt = algorithm.opt
            front = problem.front_keys(opt.get("X")) if opt is not None and len(opt) else ()
            unchanged = unchanged + 1 if front == previous else 0
            previous = front
            if unchanged >= patience:
                stopped = f"front unchanged for {patience} generations"
                break
            if generation > 1 and len(problem.cache) == before and unchanged >= 1:
                stopped = f"no new {problem.what} to evaluate"
                break
    return {"method": "nsga2", "generations": generation, "stopped": stopped}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (minimise both), sorted by the second objective."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0]))
    front, best = [], float("inf")
    for i in order:
        if points[i][0] < best:
            front.append(i)
            best = points[i][0]
    return front
