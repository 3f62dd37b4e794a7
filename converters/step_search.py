"""The adaptive mode's search space: the decisions (x, gamma) on a grid, and how one is scored.

``x`` is the overall step (log2, in units of a typical tensor's sigma), ``gamma`` how far the
steps follow the measured sensitivity instead of each tensor's spread (``uniform.py``). Both sit
on integer grids (1/8 octave of x, 1/8 of gamma; refinement goes finer) so evaluations can be
cached by decision. The scoring functions run in worker processes: they take the session and a
small task, and quantize the pool for the decision there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pymoo.core.sampling import Sampling

from . import metrics
from .search import CachedProblem, Runner
from .session import ConversionSession
from .split import HALVES
from .step_layout import layout
from .uniform import site_arrays

X_RANGE = (-12.0, 2.0)        # log2 step in sigmas: 2^-12 (about 14 bits/weight) .. 4 (about 1)
X_RESOLUTION = 8              # search grid: 1/8 octave of step (about 0.125 bits/weight)
X_POINTS = int((X_RANGE[1] - X_RANGE[0]) * X_RESOLUTION)
GAMMA_MAX = 1.25
GAMMA_RESOLUTION = 8          # gamma in steps of 1/8
REFINE_RESOLUTION = 64        # refinement goes down to 1/64 octave
INITIAL_GAMMAS = (1.0, 0.5, 0.75, 0.0, 1.25, 0.25)
MUTATION_PROB = 0.5           # of each offspring (two variables)


@dataclass(frozen=True)
class Decision:
    """(x, gamma) on the search grid: x = X_RANGE[0] + xi / resolution, gamma = gi / GAMMA_RESOLUTION."""

    xi: int
    gi: int
    resolution: int = X_RESOLUTION

    @property
    def x(self) -> float:
        return X_RANGE[0] + self.xi / self.resolution

    @property
    def gamma(self) -> float:
        return self.gi / GAMMA_RESOLUTION

    @property
    def key(self) -> tuple[float, float]:
        return (round(self.x, 9), round(self.gamma, 9))

    def name(self) -> str:
        return f"x={self.x:+.4f} gamma={self.gamma:.3f}"

    def recipe(self) -> dict:
        return {"x": round(self.x, 9), "gamma": round(self.gamma, 9)}


def score_decision(session: ConversionSession, task: tuple[float, float, list[float], float | None, float, str]) -> dict:
    """Quantize the pool for (x, gamma) and score it (a module-level function: runs in workers)."""
    x, gamma, log2_opt, dominated_at, max_loss, stage = task
    pool = session.pool
    lay = layout(pool, session.site_stats, np.asarray(log2_opt), x, gamma, session.calibration)
    scorer = session.half("confirm" if stage == "confirm" else "search")
    score = scorer.score(site_arrays(pool, lay.levels, lay.steps), max_loss=max_loss, dominated_at=dominated_at)
    return {
        "name": f"x={x:+.4f} gamma={gamma:.3f}", "stage": stage, "quality": score.quality, "loss": score.loss,
        "complete": score.complete, "stopped": score.stopped, "units": score.units, "bins": lay.bins(),
        "bits_per_weight": lay.bits / pool.n_weights, "recipe": {"x": round(x, 9), "gamma": round(gamma, 9)},
    }


def estimate_decision(session: ConversionSession, task: tuple[float, float, list[float]]) -> dict:
    """Quantize the pool for (x, gamma) and run it on both halves: per half the counted flips
    and the expected flip rate (``metrics.expected_flip_rate``); runs in workers."""
    x, gamma, log2_opt = task
    pool = session.pool
    lay = layout(pool, session.site_stats, np.asarray(log2_opt), x, gamma, session.calibration)
    arrays = site_arrays(pool, lay.levels, lay.steps)
    result = {"name": f"x={x:+.4f} gamma={gamma:.3f}", "bins": lay.bins(), "bits_per_weight": lay.bits / pool.n_weights,
              "recipe": {"x": round(x, 9), "gamma": round(gamma, 9)}}
    for split in HALVES:
        scorer = session.half(split)
        parts = [outputs[0] for _, outputs in scorer.evaluator.iter_outputs(arrays, scorer.dataset)]
        outputs, reference = np.concatenate(parts, axis=0), np.asarray(scorer.reference[0])  # one row of scores a sample
        flips = int(np.count_nonzero(outputs.argmax(-1) != reference.argmax(-1)))
        result[split] = {"flips": flips, "units": int(reference[..., 0].size),
                         "expected": metrics.expected_flip_rate(reference, outputs)}
    return result


class SpreadSampling(Sampling):
    """A deterministic initial population: x evenly over its range, gamma cycling over INITIAL_GAMMAS."""

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        xs = np.round(np.linspace(problem.xl[0], problem.xu[0], n_samples))
        gs = [INITIAL_GAMMAS[i % len(INITIAL_GAMMAS)] * GAMMA_RESOLUTION for i in range(n_samples)]
        return np.column_stack([xs, np.round(gs)])


class StepProblem(CachedProblem):
    """Minimise (quality loss, bits/weight) over the (x, gamma) grid; evaluations cached by decision."""

    def __init__(self, run: Runner, size_of, loss_cap: float = float("inf"), wave: int = 2, loss_floor: float = 0.0) -> None:
        super().__init__([0.0, 0.0], [float(X_POINTS), GAMMA_MAX * GAMMA_RESOLUTION], run, size_of, loss_cap, wave,
                         loss_floor)

    def decisions(self, X: np.ndarray) -> list[Decision]:
        X = np.clip(np.round(np.asarray(X, dtype=np.float64)), self.xl, self.xu).astype(np.int64)
        return [Decision(int(a), int(b)) for a, b in X]

    def key(self, decision: Decision) -> tuple[float, float]:
        return decision.key
