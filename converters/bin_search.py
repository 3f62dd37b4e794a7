"""The paper mode's search space: the bin count k on a log-spaced grid.

The decision variable is the position of k on the grid k = round(2^(j / steps_per_octave)),
deduplicated, within [2, max_bins]: equal steps of the variable are equal *ratios* of k, so one
search covers k = 2 ... 65536 evenly, where the paper's linear k <= 1024 would spend almost all
of a 2^16 range on counts that differ by a fraction of a bit per weight. The initial population
is spread evenly over the grid. With no more grid points than the population, the grid is
evaluated exhaustively instead (the exact front, fewer evaluations).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pymoo.core.sampling import Sampling

from .search import CachedProblem, Runner, run_nsga2

STEPS_PER_OCTAVE = 4  # bin counts searched: round(2^(j/4)), about 19% apart; merging refines between them
MUTATION_PROB = 1.0   # one variable: mutate every offspring


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


class BinCountProblem(CachedProblem):
    """Minimise (quality loss, bits per weight) over the grid position of k; decisions are k."""

    what = "bin counts"

    def __init__(self, grid: np.ndarray, run: Runner, size_of: Callable[[int], float], loss_cap: float = float("inf"),
                 wave: int = 2) -> None:
        super().__init__([0.0], [float(len(grid) - 1)], run, size_of, loss_cap, wave)
        self.grid = grid

    def decisions(self, X: np.ndarray) -> list[int]:
        positions = np.clip(np.round(np.asarray(X, dtype=np.float64)[:, 0]), 0, len(self.grid) - 1).astype(np.int64)
        return [int(self.grid[p]) for p in positions]


def search_bin_counts(grid: np.ndarray, run: Runner, size_of: Callable[[int], float], population: int, generations: int,
                      patience: int, seed: int, on_generation: Callable[[int], None] | None = None,
                      loss_cap: float = float("inf"), wave: int = 2) -> tuple[BinCountProblem, dict]:
    """Search the grid; return the problem (its cache holds every evaluation) and the run's facts."""
    problem = BinCountProblem(grid, run, size_of, loss_cap, wave)
    if len(grid) <= population:
        problem.evaluate_decisions([int(k) for k in grid])
        if on_generation:
            on_generation(1)
        return problem, {"method": "exhaustive", "generations": 1, "stopped": "grid exhausted"}
    return problem, run_nsga2(problem, EvenSampling(), population, generations, patience, seed, MUTATION_PROB, on_generation)
