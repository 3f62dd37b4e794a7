"""``--mode adaptive``: per-tensor uniform steps chosen by sensitivity, packed and Huffman-coded.

Beyond the paper and structure-agnostic like it (one pipeline for every graph). The phases:

1. Sensitivity: one onnxruntime run per pooled tensor, on a few samples, with only that
   tensor quantized (``sensitivity.py``), gives each tensor's optimal step.
2. Bracket: bisect the overall step ``x`` at one ``gamma`` for the tolerance's boundary, so
   the search spends its evaluations around it, not across the whole range.
3. Search: NSGA-II over (x, gamma) (``step_search.py``, on the engine of ``search.py``):
   the quality loss on the search half of the data against the bits the packs take.
4. Refine: bisect ``x`` at the best candidate's ``gamma`` on a finer grid.
5. Confirm: the smallest candidate the confirm half accepts too (``split.py``); the grid
   between it and the failure just below it is bisected on both halves.
6. Coarsen: where the loss counts top-1 flips, step coarser while the flip rate estimated
   from every sample's margin stays within the tolerance.

Every candidate is rounded with error feedback where layers mix channels and its biases
absorb the mean shift its quantized weights cause, both measured once on the search half
(``calibration.py``), so the search and the file see the same model. The file holds
format-1.2 packs (``step_layout.py``): grid codebooks, one scale per tensor, shared or own
Huffman tables, the graph LZMA-compressed.
"""

from __future__ import annotations

import math

import numpy as np

from .. import metrics, sensitivity
from ..calibration import NONE as NO_CALIBRATION
from ..calibration import Calibration
from ..candidates import Candidate, Stage, candidate_from_result
from ..guards import choice_limit
from ..intake import Pool
from ..options import ConvertOptions
from ..search import run_nsga2
from ..session import ConversionSession
from ..selection import fallbacks, feasible, rank, robust_within_gamma, tolerance
from ..solution import Size
from ..split import HALVES, MIN_SPLIT, is_split
from ..step_layout import PackedQuantization, layout
from ..step_search import (GAMMA_MAX, GAMMA_RESOLUTION, MUTATION_PROB, REFINE_RESOLUTION, X_POINTS, X_RANGE, X_RESOLUTION,
                           Decision, SpreadSampling, StepProblem, estimate_decision, score_decision)
from ..uniform import SiteStats
from .base import ModeContext, ModeResult

X_WINDOW = 2 * X_RESOLUTION   # NSGA-II searches x within 2 octaves of the bracketed boundary
BRACKET_GAMMA = 0.75          # the bracketing bisection runs at this gamma
BRACKET_WIDTH = 2             # ... until feasible and infeasible x are 1/4 octave apart
CONFIRM_BUDGET = 10           # confirm evaluations (bisections) before settling
LOSS_FLOOR = 0.5              # losses below this share of --max-drop count as equal (the search's focus)
MIN_POPULATION = 10           # two decisions need a somewhat larger population than one
COARSEN_STEPS = 8             # the estimate may coarsen the confirmed choice by up to one octave, in grid steps


def _confirm_trial(cand: Candidate, limit: float, rule: str, opt_list: list[float], ctx: ModeContext,
                   trials: list[dict]) -> bool:
    """Run ``cand`` on the confirm half; whether its loss there stays within ``limit`` (recorded in ``trials``)."""
    task = (cand.recipe["x"], cand.recipe["gamma"], opt_list, None, max(limit, 0.0), "confirm")
    result = ctx.map(score_decision, [task])[0]
    passed = bool(result["complete"] and result["loss"] <= limit + 1e-12)
    trials.append({"name": cand.name, "rule": rule, "loss": round(float(result["loss"]), 6),
                   "complete": bool(result["complete"]), "passed": passed})
    return passed


class AdaptiveMode:
    name = "adaptive"

    def __init__(self, measured: tuple[np.ndarray, int] | None = None) -> None:
        self.limits: dict[str, float] = {}
        self.log2_opt: np.ndarray | None = None
        self.stats: SiteStats | None = None
        self.calib: Calibration = NO_CALIBRATION
        self.problem: StepProblem | None = None
        # (relative distortion per site, samples per run): measured by run(), or given by the run on
        # a larger pool this one's sites come from (a site's distortion is measured with only it quantized)
        self.measured = measured

    def _sensitivities(self, ctx: ModeContext) -> tuple[np.ndarray, int]:
        """Each site's relative output distortion at its test step (measured once), and the samples it took."""
        if self.measured is None:
            pool, dataset = ctx.pool, ctx.session.dataset
            per_sample = sum(int(np.prod(a.shape[1:], dtype=np.int64)) for a in dataset.inputs.values())
            samples = sensitivity.sample_count(dataset.n_samples, per_sample, pool.n_weights, len(pool.sites))
            ctx.progress({"phase": "sensitivity", "total": len(pool.sites)})
            self.measured = (sensitivity.measure(ctx.map, ctx.session.site_stats, samples), samples)
        return self.measured

    def narrowed(self, keep: list[int]) -> AdaptiveMode:
        """A fresh mode for the pool of the sites ``keep`` (numbers into this run's pool), with their sensitivities."""
        assert self.measured is not None, "run() first"
        return AdaptiveMode((self.measured[0][keep], self.measured[1]))

    def _limits(self, ctx: ModeContext) -> dict[str, float]:
        """The loss a candidate may show on each half (``guards.choice_limit``)."""
        halves = {half: ctx.session.half(half) for half in HALVES}
        return {half: choice_limit(s.metric, ctx.options.max_drop, s.total_units, s.guard_units) for half, s in halves.items()}

    def finest(self, ctx: ModeContext) -> tuple[Candidate, bool]:
        """The finest step the search takes (the bracket's end it presumes feasible), scored on the
        search half, and whether it stays within that half's tolerance: where even it misses, a
        search on this pool is not worth its evaluations (``fallback.py``)."""
        log2_opt = sensitivity.log2_optimal_steps(ctx.session.site_stats, self._sensitivities(ctx)[0])
        decision = Decision(0, int(round(BRACKET_GAMMA * GAMMA_RESOLUTION)))
        task = (decision.x, decision.gamma, [float(v) for v in log2_opt], None, ctx.options.effective_abort_drop(), "finest")
        candidate = candidate_from_result(ctx.map(score_decision, [task])[0])
        return candidate, feasible(candidate, self._limits(ctx)["search"])

    def run(self, ctx: ModeContext) -> ModeResult:
        opts, pool = ctx.options, ctx.pool
        self.stats = stats = ctx.session.site_stats
        distortions, samples = self._sensitivities(ctx)
        self.calib = calib = ctx.session.calibration
        self.log2_opt = log2_opt = sensitivity.log2_optimal_steps(stats, distortions)
        opt_list = [float(v) for v in log2_opt]

        sizes: dict[tuple, float] = {}

        def size_of(d: Decision) -> float:
            if d.key not in sizes:
                # without error feedback: a close, cheaper estimate that only orders the evaluations
                sizes[d.key] = layout(pool, stats, log2_opt, d.x, d.gamma, calib, feedback=False).bits / pool.n_weights
            return sizes[d.key]

        def run(tasks, max_loss, stage):
            return ctx.map(score_decision, [(d.x, d.gamma, opt_list, bound, max_loss, stage) for d, bound in tasks])

        self.limits = self._limits(ctx)
        limit = self.limits["search"]
        problem = StepProblem(run, size_of, opts.effective_abort_drop(), opts.wave, LOSS_FLOOR * limit)
        self.problem = problem
        ctx.progress({"phase": "bracket", "total": math.ceil(math.log2(X_POINTS / BRACKET_WIDTH))})
        boundary, bracket_runs = self._bracket(problem, opts)
        problem.xl[0] = float(max(0, boundary - X_WINDOW))
        problem.xu[0] = float(min(X_POINTS, boundary + X_WINDOW))
        ctx.progress({"phase": "search", "total": max(opts.population, MIN_POPULATION) * opts.generations})
        facts = self._search(problem, opts, ctx)
        facts["bracket"] = {"gamma": BRACKET_GAMMA, "x_feasible": round(Decision(boundary, 0).x, 9),
                            "evaluations": bracket_runs, "x_window": [round(Decision(int(problem.xl[0]), 0).x, 9),
                                                                      round(Decision(int(problem.xu[0]), 0).x, 9)]}
        candidates = [candidate_from_result(problem.cache[k]) for k in problem.order]
        facts["search_evaluations"] = len(candidates)

        ctx.progress({"phase": "refine", "total": opts.merge_budget})
        refined = self._refine(problem, candidates, opts)
        candidates += refined
        ranked = rank(robust_within_gamma(candidates, limit, opts.monotone))
        ctx.progress({"phase": "confirm", "total": 2 * CONFIRM_BUDGET + 2})  # trials, and search runs filling the gap
        confirmed, trials = self._confirm(ranked, opt_list, opts, ctx)
        confirmed, gap = self._fill_gap(problem, ranked, confirmed, trials, opt_list, ctx)
        candidates += gap
        feasible_list = confirmed + fallbacks(rank(ranked + [c for c in gap if feasible(c, limit)]), confirmed, trials)
        if (confirmed and metrics.METRICS[ctx.session.metric].counts_flips and ctx.session.reference[0].ndim == 2
                and is_split(ctx.session.dataset.n_samples)):
            ctx.progress({"phase": "coarsen", "total": COARSEN_STEPS})
            coarser, facts["coarsen"] = self._coarsen(confirmed[0], opt_list, opts, ctx)
            candidates += coarser
            if coarser:
                feasible_list = [coarser[-1]] + feasible_list
        facts.update({"confirm": trials, "tolerance": {k: round(v, 6) for k, v in self.limits.items()},
                      "split": {"search": "even samples", "confirm": "odd samples", "min_samples": MIN_SPLIT}})
        facts.update({"refine_trials": len(refined), "sensitivity_runs": int(stats.sizes.size),
                      "sensitivity_samples": int(samples), **calib.summary(),
                      "log2_optimal_step": opt_list,  # full precision: the report reproduces the steps exactly
                      "relative_distortion": [float(f"{d:.6g}") for d in distortions]})
        return ModeResult(candidates, feasible_list, facts)

    def _confirm(self, ranked: list[Candidate], opt_list: list[float], opts: ConvertOptions,
                 ctx: ModeContext) -> tuple[list[Candidate], list[dict]]:
        """Bisect the search-feasible candidates (smallest first) for the smallest one that also stays
        within tolerance on the confirm half. Trying the next-smallest after each failure instead
        would select on the confirm half's noise (docs/decisions/0007).

        When even the largest fails, the confirm half holds near-ties that flip under any
        quantization; then both halves are judged together, with the tolerance of all the data."""
        trials: list[dict] = []
        verdicts: dict[tuple[int, bool], bool] = {}
        units = {half: ctx.session.half(half).total_units for half in HALVES}
        pooled_limit = choice_limit(ctx.session.half("confirm").metric, opts.max_drop, sum(units.values()),
                                    ctx.session.half("confirm").guard_units)

        def judge(i: int, pooled: bool) -> bool:
            if (i, pooled) not in verdicts:
                cand = ranked[i]
                limit = self.limits["confirm"]
                if pooled:  # the confirm loss that keeps the loss over both halves within pooled_limit
                    limit = (pooled_limit * sum(units.values()) - cand.loss * units["search"]) / units["confirm"]
                verdicts[i, pooled] = _confirm_trial(cand, limit, "both halves" if pooled else "confirm half",
                                                     opt_list, ctx, trials)
            return verdicts[i, pooled]

        def smallest(ok) -> int | None:
            if ok(0):
                return 0
            lo, hi = 0, len(ranked) - 1  # ranked[lo] fails; ranked[hi] is the safest there is
            if not ok(hi):
                return None
            while hi - lo > 1 and len(trials) < CONFIRM_BUDGET:
                mid = (lo + hi) // 2
                if ok(mid):
                    hi = mid
                else:
                    lo = mid
            return hi

        if not ranked:
            return [], trials
        chosen = smallest(lambda i: judge(i, False))
        if chosen is None:
            chosen = smallest(lambda i: judge(i, True))
        return ([] if chosen is None else [ranked[chosen]]), trials

    def _coarsen(self, chosen: Candidate, opt_list: list[float], opts: ConvertOptions,
                 ctx: ModeContext) -> tuple[list[Candidate], list[dict]]:
        """Step the confirmed choice's x coarser, one grid step at a time, while the expected flip
        rate (``metrics.expected_flip_rate``) stays within --max-drop on both halves and the flips
        counted on both halves together stay within the tolerance of all the data.

        Why: near the tolerance the counts are 0 to 3 flips per half, so the confirm rule picks
        among candidates by chance and the choice moves for reasons unrelated to the quantizer.
        The estimate uses every sample's margin and rises steadily with the step. Only for one
        prediction per sample ([N, C] scores): the time steps of a sequence are not independent
        (docs/decisions/0022). Steps run a wave at a time; the first that fails ends the walk.
        Returns the passing candidates (coarsest last) and the trials for the report."""
        x0, gamma = chosen.recipe["x"], chosen.recipe["gamma"]
        steps = [x0 + k / X_RESOLUTION for k in range(1, COARSEN_STEPS + 1) if x0 + k / X_RESOLUTION <= X_RANGE[1]]
        wave = max(1, opts.wave)  # not --workers: the same evaluations, and report, with any number of workers
        passed: list[Candidate] = []
        trials: list[dict] = []
        for start in range(0, len(steps), wave):
            results = ctx.map(estimate_decision, [(x, gamma, opt_list) for x in steps[start : start + wave]])
            for r in results:
                flips, units = (r["search"][k] + r["confirm"][k] for k in ("flips", "units"))
                expected = max(r["search"]["expected"], r["confirm"]["expected"])
                ok = expected <= opts.max_drop and flips <= tolerance(ctx.session.metric, opts.max_drop, units) * units + 1e-9
                trials.append({"name": r["name"], "expected": [round(r[h]["expected"], 6) for h in ("search", "confirm")],
                               "flips": [r["search"]["flips"], r["confirm"]["flips"]], "passed": ok})
                if not ok:
                    return passed, trials
                loss = r["search"]["flips"] / max(r["search"]["units"], 1)
                passed.append(Candidate(r["name"], "coarsen", 1.0 - loss, loss, True, float(r["bits_per_weight"]),
                                        int(r["bins"]), r["recipe"], None, fitted_loss=expected))
        return passed, trials

    def _fill_gap(self, problem: StepProblem, ranked: list[Candidate], confirmed: list[Candidate], trials: list[dict],
                  opt_list: list[float], ctx: ModeContext) -> tuple[list[Candidate], list[Candidate]]:
        """Bisect the search grid between the confirmed choice and the failure just below it, when
        they share gamma and the grid has points between them: the confirm bisection can only pick
        among candidates the search finished, and where the search stopped the ones in between as
        dominated the choice would fall far, to the bracket's safe end (docs/decisions/0013). Each
        midpoint must pass the search half then the confirm half; the trials count against
        CONFIRM_BUDGET. Returns the (possibly new) confirmed choice and the candidates evaluated here."""
        if not confirmed or not any(t["name"] == confirmed[0].name and t["rule"] == "confirm half" and t["passed"]
                                    for t in trials):
            return confirmed, []
        chosen = confirmed[0]
        failed = {t["name"] for t in trials if not t["passed"]}
        below = [c for c in ranked if c.name in failed and c.bits_per_weight < chosen.bits_per_weight]
        if not below:
            return confirmed, []
        nearest = max(below, key=lambda c: c.bits_per_weight)
        gamma = chosen.recipe["gamma"]
        if nearest.recipe["gamma"] != gamma:
            return confirmed, []
        gi = int(round(gamma * GAMMA_RESOLUTION))
        # grid indices strictly between the passing x (finer steps) and the failing x (coarser)
        good = math.floor((chosen.recipe["x"] - X_RANGE[0]) * X_RESOLUTION + 1e-9)
        bad = math.ceil((nearest.recipe["x"] - X_RANGE[0]) * X_RESOLUTION - 1e-9)
        tried: list[Candidate] = []
        while bad - good > 1 and len(trials) < CONFIRM_BUDGET:
            mid = Decision((good + bad) // 2, gi)
            search = candidate_from_result(problem.run([(mid, None)], self.limits["search"], "gap")[0])
            tried.append(search)
            if feasible(search, self.limits["search"]) and _confirm_trial(search, self.limits["confirm"], "confirm half",
                                                                          opt_list, ctx, trials):
                good, chosen = mid.xi, search
            else:
                bad = mid.xi
        return [chosen], tried

    def _bracket(self, problem: StepProblem, opts: ConvertOptions) -> tuple[int, int]:
        """Bisect x at BRACKET_GAMMA for the coarsest feasible step (quality falls as steps grow):
        the search then spends its evaluations around that boundary, not across 14 octaves."""
        gi = int(round(BRACKET_GAMMA * GAMMA_RESOLUTION))
        good, bad, runs = 0, X_POINTS, 0
        while bad - good > BRACKET_WIDTH:
            mid = Decision((good + bad) // 2, gi)
            problem.evaluate_decisions([mid], stage="bracket")
            runs += 1
            if feasible(candidate_from_result(problem.cache[mid.key]), self.limits["search"]):
                good = mid.xi
            else:
                bad = mid.xi
        return good, runs

    def _search(self, problem: StepProblem, opts: ConvertOptions, ctx: ModeContext) -> dict:
        facts = run_nsga2(problem, SpreadSampling(), max(opts.population, MIN_POPULATION), opts.generations, opts.patience,
                          opts.seed, MUTATION_PROB, lambda g: ctx.progress({"phase": "search", "generation": g}))
        return {**facts, "decisions": {"x": list(X_RANGE), "x_resolution": X_RESOLUTION, "gamma": [0.0, GAMMA_MAX],
                                       "gamma_resolution": GAMMA_RESOLUTION}}

    def _refine(self, problem: StepProblem, candidates: list[Candidate], opts: ConvertOptions) -> list[Candidate]:
        """Bisect x at the best feasible candidate's gamma, on a finer grid."""
        limit = self.limits["search"]
        allowed = rank(robust_within_gamma(candidates, limit, opts.monotone))
        if not allowed or opts.merge_budget <= 0:
            return []
        best = allowed[0]
        gamma = best.recipe["gamma"]
        gi = int(round(gamma * GAMMA_RESOLUTION))
        scale = REFINE_RESOLUTION
        to_fine = lambda x: int(round((x - X_RANGE[0]) * scale))  # noqa: E731
        good = to_fine(best.recipe["x"])
        worse = [to_fine(c.recipe["x"]) for c in candidates
                 if c.recipe["gamma"] == gamma and c.recipe["x"] > best.recipe["x"] and c.loss > limit]
        bad = min(worse) if worse else good + scale // X_RESOLUTION
        refined: list[Candidate] = []
        for _ in range(opts.merge_budget):
            if bad - good <= 1:
                break
            mid = Decision((good + bad) // 2, gi, scale)
            problem.evaluate_decisions([mid], max_loss=limit, stage="refine")
            result = problem.cache[mid.key]
            cand = candidate_from_result(result)
            refined.append(cand)
            if feasible(cand, limit):
                good = mid.xi
            else:
                bad = mid.xi
        return refined

    def toward_size(self, ctx: ModeContext, bits_per_weight: float) -> list[Candidate]:
        """Candidates at a size target: for each gamma of the grid, the finest step x whose
        estimated size fits ``bits_per_weight``, measured completely on the search half (a
        target asks for the least loss at a size, wherever the tolerance lies)."""
        assert self.problem is not None, "run() first"
        problem = self.problem
        decisions = []
        for gi in range(int(GAMMA_MAX * GAMMA_RESOLUTION) + 1):
            lo, hi = 0, X_POINTS  # size falls as x grows: find the smallest xi that fits
            if problem.size_of(Decision(hi, gi)) > bits_per_weight:
                continue
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if problem.size_of(Decision(mid, gi)) <= bits_per_weight else (mid, hi)
            decisions.append(Decision(hi, gi))
        todo = [d for d in decisions if d.key not in problem.cache or not problem.cache[d.key]["complete"]]
        ctx.progress({"phase": "target", "total": len(todo)})
        return [candidate_from_result(r) for r in problem.run([(d, None) for d in todo], math.inf, "target")]

    def resume(self, session: ConversionSession, facts: dict) -> None:
        """What ``materialize`` needs, from a saved search's facts: the steps it measured (full
        precision in the report) and the calibration, measured again on the same search half."""
        log2_opt = np.asarray(facts["log2_optimal_step"], np.float64)
        if log2_opt.shape != (len(session.pool.sites),):
            raise ValueError(f"the report has {log2_opt.size} sensitivities for a pool of {len(session.pool.sites)} tensors")
        self.stats, self.log2_opt, self.calib = session.site_stats, log2_opt, session.calibration

    def materialize(self, pool: Pool, candidate: Candidate, options: ConvertOptions,
                    candidates: list[Candidate]) -> tuple[PackedQuantization, list[Stage]]:
        assert self.log2_opt is not None and self.stats is not None, "run() first"
        lay = layout(pool, self.stats, self.log2_opt, candidate.recipe["x"], candidate.recipe["gamma"], self.calib)
        quant = PackedQuantization.from_layout(pool, lay)
        n = pool.n_weights
        fixed_index = sum(int(pool.sites[i].size) * max(1, int(np.ceil(np.log2(max(2, p.count)))))
                          for p in lay.plans for i in p.members)
        stages = [
            Stage("per-tensor steps", lay.bins(), candidate.quality, "fixed", Size(fixed_index, 0, 0, n)),
            Stage("+Huffman packs", lay.bins(), candidate.quality, "huffman", Size(lay.bits, 0, 0, n)),
        ]
        return quant, stages


