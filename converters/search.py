"""NSGA-II (pymoo) over the bin count k, with cached and optionally parallel evaluations.

The decision variable is the position of k on a log-spaced grid
(k = round(2^(j / steps_per_octave)), deduplicated, within [2, max_bins]):
equal steps of the variable are equal *ratios* of k, so one search covers
k = 2 ... 65536 evenly, where the paper's linear k <= 1024 would spend almost
all of a 2^16 range on counts that differ by a fraction of a bit per weight.
Two objectives, both minimised: quality loss (the tolerance measure of
metrics.py: the metric's drop, or for accuracy the share of samples lost,
measured by onnxruntime on the user's data) and encoded bits per
weight including codebook and Huffman table, computed from the bin counts.

Evaluations are cached by k; the uncached ones of each generation go through
pymoo's elementwise runner (a loop, or worker processes with ``workers > 1``).
The size of a candidate is known before it runs, so each evaluation is told the
least loss of the already-evaluated candidates that are smaller: once its own
loss provably reaches that, it is dominated and stops (possibly before running
at all). A generation's new candidates run in waves of ``wave`` (smallest first),
each wave knowing the results of the waves before it: with the initial population
spread up to 2^16 bins, the largest candidates are then usually skipped. The wave
size is a fixed setting, not the worker count, so the result does not depend on
``--workers`` (which therefore speeds up at most ``wave`` evaluations at a time).
The initial population is spread evenly over the grid; the run is seeded and
stops early when the front's set of bin counts has not changed for
``patience`` generations. With no more grid points than the population, the
grid is evaluated exhaustively instead (the exact front, fewer evaluations).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair


def bin_grid(max_bins: int, steps_per_octave: int, low: int = 2) -> np.ndarray:
    """Sorted unique k = round(2^(j/steps)) in [low, max_bins], always including both ends."""
    top = int(np.ceil(np.log2(max_bins) * steps_per_octave))
    ks = np.unique(np.round(2.0 ** (np.arange(0, top + 1) / steps_per_octave)).astype(np.int64))
    ks = ks[(ks >= low) & (ks <= max_bins)]
    return np.unique(np.concatenate([[low, max_bins], ks]))


class EvenSampling(Sampling):
    """The initial population spread evenly over the variable's range (deterministic)."""

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        return np.round(np.linspace(problem.xl[0], problem.xu[0], n_samples)).reshape(-1, 1)


@dataclass
class SearchRecord:
    """One evaluated bin count."""

    k: int
    result: dict  # from the scoring function: quality, complete, bits, bins ...


class BinCountProblem(Problem):
    """Minimise (quality loss, bits per weight) over the grid position of k."""

    def __init__(self, grid: np.ndarray, score_many: Callable[[list[tuple[int, float | None]]], list[dict]],
                 size_of: Callable[[int], float], loss_cap: float = float("inf"), wave: int = 2) -> None:
        super().__init__(n_var=1, n_obj=2, xl=np.array([0.0]), xu=np.array([float(len(grid) - 1)]), vtype=float)
        self.grid = grid
        self.loss_cap = loss_cap
        self.score_many = score_many
        self.size_of = size_of
        self.wave = max(1, wave)
        self.cache: dict[int, dict] = {}
        self.order: list[int] = []  # k in evaluation order

    def ks(self, X: np.ndarray) -> list[int]:
        positions = np.clip(np.round(np.asarray(X, dtype=np.float64)[:, 0]), 0, len(self.grid) - 1).astype(np.int64)
        return [int(self.grid[p]) for p in positions]

    def dominance_bound(self, bits: float) -> float | None:
        """Least loss among evaluated candidates smaller than ``bits`` (None: none yet)."""
        known = [r["loss"] for r in self.cache.values() if r["complete"] and r["bits_per_weight"] < bits]
        return min(known) if known else None

    def evaluate_ks(self, ks: Sequence[int]) -> None:
        todo = sorted(set(k for k in ks if k not in self.cache), key=lambda k: (self.size_of(k), k))
        for start in range(0, len(todo), self.wave):
            wave = todo[start : start + self.wave]
            tasks = [(k, self.dominance_bound(self.size_of(k))) for k in wave]
            for k, result in zip(wave, self.score_many(tasks)):
                self.cache[k] = result
                self.order.append(k)

    def objectives(self, k: int) -> tuple[float, float]:
        """(loss, bits/weight). Losses beyond ``loss_cap`` (where evaluations stop early) all
        count as the cap: that far from the tolerance the exact loss should not steer the search."""
        r = self.cache[k]
        return min(r["loss"], self.loss_cap), r["bits_per_weight"]

    def _evaluate(self, X, out, *args, **kwargs):
        ks = self.ks(X)
        self.evaluate_ks(ks)
        out["F"] = np.array([self.objectives(k) for k in ks], dtype=np.float64)


def _front_ks(algorithm: NSGA2, problem: BinCountProblem) -> tuple[int, ...]:
    opt = algorithm.opt
    if opt is None or len(opt) == 0:
        return ()
    return tuple(sorted(set(problem.ks(opt.get("X")))))


def run_search(
    grid: np.ndarray,
    score_many: Callable[[list[tuple[int, float | None]]], list[dict]],
    size_of: Callable[[int], float],
    population: int,
    generations: int,
    patience: int,
    seed: int,
    on_generation: Callable[[int, BinCountProblem], None] | None = None,
    loss_cap: float = float("inf"),
    wave: int = 2,
) -> tuple[BinCountProblem, dict]:
    """Run the search; return the problem (its cache holds every evaluation) and run facts."""
    problem = BinCountProblem(grid, score_many, size_of, loss_cap, wave)
    if len(grid) <= population:
        problem.evaluate_ks([int(k) for k in grid])
        if on_generation:
            on_generation(1, problem)
        return problem, {"method": "exhaustive", "generations": 1, "stopped": "grid exhausted"}
    algorithm = NSGA2(
        pop_size=population,
        sampling=EvenSampling(),
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(prob=1.0, eta=20, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    algorithm.setup(problem, termination=("n_gen", generations), seed=seed, verbose=False)
    previous: tuple[int, ...] | None = None
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
                on_generation(generation, problem)
            front = _front_ks(algorithm, problem)
            unchanged = unchanged + 1 if front == previous else 0
            previous = front
            if unchanged >= patience:
                stopped = f"front unchanged for {patience} generations"
                break
            if generation > 1 and len(problem.cache) == before and unchanged >= 1:
                stopped = "no new bin counts to evaluate"
                break
    return problem, {"method": "nsga2", "generations": generation, "stopped": stopped}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (minimise both), sorted by the second objective."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0]))
    front, best = [], float("inf")
    for i in order:
        if points[i][0] < best:
            front.append(i)
            best = points[i][0]
    return front
