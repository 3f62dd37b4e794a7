"""``--mode adaptive``: per-tensor uniform steps chosen by sensitivity, packed and Huffman-coded.

Beyond the paper, structure-agnostic like it (one pipeline for every graph):

1. Pool every float tensor of at least ``min_elements`` (16 here: BatchNorm
   vectors and biases are a large share of small models' files, and quantized
   with their own fine steps they cost little quality).
2. Measure each tensor's sensitivity: one onnxruntime run per tensor on a few
   samples with only that tensor quantized (``sensitivity.py``).
3. NSGA-II (pymoo) over two decisions, the overall step ``x`` (log2, in units of a
   typical tensor's sigma) and ``gamma``, how far the steps follow the measured
   sensitivity instead of each tensor's spread (``uniform.allocate_steps``);
   objectives: quality loss by real onnxruntime runs on the user's data, and the
   bits the packs take (``packing.py``). Evaluations are cached by decision, stop
   early once beyond the tolerance or dominated, run in worker processes.
4. Refine: at the chosen ``gamma``, bisect ``x`` between the best feasible and
   the nearest infeasible decision (quality falls monotonically as the steps
   grow), within ``merge_budget`` evaluations.
   Every candidate is rounded with error feedback where layers mix channels
   (``error_feedback.py``) and its biases absorb the mean output shift its
   quantized weights cause (``bias_correction.py``), both measured once on the
   search half (``calibration.py``): the search and the file see the same model.
5. Write format-1.2 packs (grid codebooks, one scale per tensor, shared or own
   Huffman tables), the graph LZMA-compressed, blobs 8-byte aligned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from pymoo.core.sampling import Sampling

from moub_format import constants as FC
from moub_format import writer
from moub_format.reader import MIN_LANES

from .. import calibration, metrics, sensitivity
from ..calibration import Calibration
from ..encode import PackAssignment, dequantize_scaled
from ..intake import Pool
from ..options import ConvertOptions
from ..session import ConversionSession
from ..packing import PackPlan, plan_packs, total_bits
from ..solution import Size
from ..uniform import SiteStats, allocate_steps, site_arrays, site_stats
from ..candidates import Candidate, Stage, candidate_from_result
from ..search import CachedProblem, Runner, run_nsga2
from ..selection import fallbacks, feasible, rank, robust_within_gamma, tolerance
from ..split import HALVES, MIN_SPLIT, is_split, search_half
from .base import ModeContext, ModeResult

X_RANGE = (-12.0, 2.0)        # log2 step in sigmas: 2^-12 (about 14 bits/weight) .. 4 (about 1)
X_RESOLUTION = 8              # search grid: 1/8 octave of step (about 0.125 bits/weight)
X_POINTS = int((X_RANGE[1] - X_RANGE[0]) * X_RESOLUTION)
X_WINDOW = 2 * X_RESOLUTION   # NSGA-II searches x within 2 octaves of the bracketed boundary
BRACKET_GAMMA = 0.75          # the bracketing bisection runs at this gamma
BRACKET_WIDTH = 2             # ... until feasible and infeasible x are 1/4 octave apart
CONFIRM_BUDGET = 10           # confirm evaluations (bisections) before settling
LOSS_FLOOR = 0.5              # losses below this share of --max-drop count as equal (the search's focus)
GAMMA_MAX = 1.25
GAMMA_RESOLUTION = 8          # gamma in steps of 1/8
REFINE_RESOLUTION = 64        # refinement goes down to 1/64 octave
MIN_POPULATION = 10           # two decisions need a somewhat larger population than one
MUTATION_PROB = 0.5           # of each offspring (two variables)
INITIAL_GAMMAS = (1.0, 0.5, 0.75, 0.0, 1.25, 0.25)
COARSEN_STEPS = 8             # the estimate may coarsen the confirmed choice by up to one octave, in grid steps
BUILD_OPTIONS = {"graph_codec": FC.CODEC_LZMA, "raw_codec": writer.SMALLEST, "alignment": 8,
                 "elide_constant_names": True}  # Paddle exports name each Constant twice: 680 B of rapidocr cls
MAX_CHUNK_ELEMENTS = 4096     # 32-bit chunk entries (plus ~4 padding bits) every 4096 weights: 0.009 bits/weight
MIN_CHUNK_ELEMENTS = 1024     # ... every 1024: 0.035 bits/weight


def chunk_elements(n_weights: int) -> int:
    """Elements per independently decodable chunk of an adaptive file.

    The reader decodes all chunks in lock step, one NumPy call per step for all of them, so
    a model with few chunks pays NumPy's per-call overhead on nearly every weight: with
    4096-element chunks, loading magika's 0.78 M weights (191 chunks) took 3.6x its plain
    ``.onnx``, det's 1.17 M 3.9x. So the chunk is the largest power of two in [1024, 4096]
    that gives about ``DECODER_LANES`` chunks (:func:`moub_format.writer.default_chunk_elements`);
    models too small for lock-step decoding even at 1024 (fewer than ``MIN_LANES`` chunks:
    the reader decodes them one by one) keep 4096, where chunks cost least."""
    chunk = min(MAX_CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, writer.default_chunk_elements(n_weights)))
    return MAX_CHUNK_ELEMENTS if n_weights // chunk < MIN_LANES else chunk


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


@dataclass
class Layout:
    """A decision turned into steps, levels and packs (computed where it is needed)."""

    steps: np.ndarray
    levels: list[np.ndarray]
    plans: list[PackPlan]
    bits: int

    def bins(self) -> int:
        return int(sum(p.count for p in self.plans))


def layout(pool: Pool, stats: SiteStats, log2_opt: np.ndarray, x: float, gamma: float,
           calib: Calibration, feedback: bool = True) -> Layout:
    steps = allocate_steps(stats, log2_opt, x, gamma)
    levels = calib.levels(pool, steps, feedback)
    plans = plan_packs(levels)
    return Layout(steps, levels, plans, total_bits(plans, stats.sizes, chunk_elements(pool.n_weights)))


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
    for split in ("search", "confirm"):
        scorer = session.half(split)
        parts = [outputs[0] for _, outputs in scorer.evaluator.iter_outputs(arrays, scorer.dataset)]
        outputs, reference = np.concatenate(parts, axis=0), scorer.reference[0]
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
    default_min_elements = 16

    def __init__(self) -> None:
        self.limits: dict[str, float] = {}
        self.log2_opt: np.ndarray | None = None
        self.stats: SiteStats | None = None
        self.calib: Calibration = calibration.NONE

    def run(self, ctx: ModeContext) -> ModeResult:
        opts, pool = ctx.options, ctx.pool
        self.stats = stats = ctx.session.site_stats
        dataset = ctx.session.dataset
        per_sample = sum(int(np.prod(a.shape[1:], dtype=np.int64)) for a in dataset.inputs.values())
        samples = sensitivity.sample_count(dataset.n_samples, per_sample, pool.n_weights, len(pool.sites))
        ctx.progress({"phase": "sensitivity"})
        self.calib = calib = ctx.session.calibration
        distortions = sensitivity.measure(ctx.map, stats, samples)
        self.log2_opt = log2_opt = sensitivity.log2_optimal_steps(stats, distortions)
        opt_list = [float(v) for v in log2_opt]

        sizes: dict[tuple, float] = {}

        def size_of(d: Decision) -> float:
            if d.key not in sizes:
                # without error feedback: a close, cheaper estimate that only orders the evaluations
                sizes[d.key] = layout(pool, stats, log2_opt, d.x, d.gamma, calib, feedback=False).bits / pool.n_weights
            return sizes[d.key]

        def run_many(tasks, max_loss, stage):
            return ctx.map(score_decision, [(d.x, d.gamma, opt_list, bound, max_loss, stage) for d, bound in tasks])

        self.limits = {half: tolerance(ctx.session.half(half).metric, opts.max_drop, ctx.session.half(half).total_units)
                       for half in HALVES}
        limit = self.limits["search"]
        problem = StepProblem(run_many, size_of, opts.effective_abort_drop(), opts.wave, LOSS_FLOOR * limit)
        ctx.progress({"phase": "bracket"})
        boundary, bracket_runs = self._bracket(problem, opts)
        problem.xl[0] = float(max(0, boundary - X_WINDOW))
        problem.xu[0] = float(min(X_POINTS, boundary + X_WINDOW))
        ctx.progress({"phase": "search"})
        facts = self._search(problem, opts, ctx)
        facts["bracket"] = {"gamma": BRACKET_GAMMA, "x_feasible": round(Decision(boundary, 0).x, 9),
                            "evaluations": bracket_runs, "x_window": [round(Decision(int(problem.xl[0]), 0).x, 9),
                                                                      round(Decision(int(problem.xu[0]), 0).x, 9)]}
        candidates = [candidate_from_result(problem.cache[k]) for k in problem.order]
        facts["search_evaluations"] = len(candidates)

        ctx.progress({"phase": "refine"})
        refined = self._refine(problem, candidates, opts)
        candidates += refined
        ranked = rank(robust_within_gamma(candidates, limit, opts.monotone))
        ctx.progress({"phase": "confirm"})
        confirmed, trials = self._confirm(ranked, opt_list, opts, ctx)
        confirmed, gap = self._fill_gap(problem, ranked, confirmed, trials, opt_list, ctx)
        candidates += gap
        feasible_list = confirmed + fallbacks(rank(ranked + [c for c in gap if feasible(c, limit)]), confirmed, trials)
        if (confirmed and metrics.METRICS[ctx.session.metric].counts_flips and ctx.session.reference[0].ndim == 2
                and is_split(ctx.session.dataset.n_samples)):
            ctx.progress({"phase": "coarsen"})
            coarser, facts["coarsen"] = self._coarsen(confirmed[0], opt_list, opts, ctx)
            candidates += coarser
            if coarser:
                feasible_list = [coarser[-1]] + feasible_list
        facts.update({"confirm": trials, "tolerance": {k: round(v, 6) for k, v in self.limits.items()}, "split": {"search": "even samples", "confirm": "odd samples",
                                                   "min_samples": MIN_SPLIT}})
        facts.update({"refine_trials": len(refined), "sensitivity_runs": int(stats.sizes.size),
                      "sensitivity_samples": int(samples), **calib.summary(),
                      "log2_optimal_step": opt_list,  # full precision: the report reproduces the steps exactly
                      "relative_distortion": [float(f"{d:.6g}") for d in distortions]})
        return ModeResult(candidates, feasible_list, facts)

    def _confirm(self, ranked: list[Candidate], opt_list: list[float], opts: ConvertOptions,
                 ctx: ModeContext) -> tuple[list[Candidate], list[dict]]:
        """Bisect the search-feasible candidates (smallest first) for the smallest one that also stays
        within tolerance on the confirm half. Trying the next-smallest after each failure instead
        selects on the confirm half's noise: on magika all four smallest failed (loss 0.012-0.016
        against 0.008) and a fifth, unconfirmed, lost 1.4% on unseen files.

        When even the largest fails, the confirm half holds near-ties that flip under any
        quantization (magika at --max-drop 0.0075: one flip allowed in 250 files, two flipped at
        every step); then both halves are judged together, with the tolerance of all the data."""
        trials: list[dict] = []
        verdicts: dict[tuple[int, bool], bool] = {}
        units = {half: ctx.session.half(half).total_units for half in HALVES}
        pooled_limit = tolerance(ctx.session.half("confirm").metric, opts.max_drop, sum(units.values()))

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
        among candidates by chance and the choice moves between runs for reasons unrelated to
        the quantizer (magika: 5.05x in one run, 4.52x after a change that altered no output).
        The estimate uses every sample's margin and rises steadily with the step. Only for one
        prediction per sample ([N, C] scores): the time steps of a sequence are not independent,
        and on PP-OCRv4 rec's the estimate went from 0.5% to 13% between neighbouring steps
        where the counted flips only doubled. Steps run a wave at a time; the first that fails
        ends the walk. Returns the passing candidates (coarsest last) and the trials for the report."""
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
        dominated the choice falls far (rapidocr cls: from 5.92 bits/weight, which failed the
        confirm half, to the bracket's safe end at 7.71). Each midpoint must pass the search half
        then the confirm half; the trials count against CONFIRM_BUDGET. Returns the (possibly
        new) confirmed choice and the candidates evaluated here."""
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


@dataclass(frozen=True)
class PackedQuantization:
    """A layout as the container stores it: grid codebooks, packs, and the build options.

    Pack indices are int32 and the decoded weights are not kept: on a model of N weights the
    final encode held 8N bytes of int64 indices and 4N of float32 weights beside the model."""

    codebooks: tuple[writer.GridCodebook | np.ndarray, ...]
    packs: tuple[PackAssignment, ...]
    build_options: dict = field(default_factory=lambda: dict(BUILD_OPTIONS))

    @classmethod
    def from_layout(cls, pool: Pool, lay: Layout) -> PackedQuantization:
        codebooks, packs = [], []
        for number, plan in enumerate(lay.plans):
            codebooks.append(writer.GridCodebook(plan.first, plan.count) if plan.levels is None
                             else np.asarray(plan.levels, dtype=np.float32))  # exact: |level| < 2^22
            members = list(plan.members)
            indices = np.concatenate([plan.symbols(lay.levels[i], offset).astype(np.int32, copy=False)
                                      for i, offset in zip(members, plan.offsets)])  # count < 2^25
            packs.append(PackAssignment(tuple(pool.sites[i].path for i in members),
                                        tuple(float(lay.steps[i]) for i in members), indices, number, writer.OWN,
                                        offsets=plan.offsets))
        return cls(tuple(codebooks), tuple(packs), dict(BUILD_OPTIONS, chunk_elements=chunk_elements(pool.n_weights)))

    def assignments(self, pool: Pool) -> dict:
        return {}

    def site_arrays(self, pool: Pool) -> dict:
        """Each site's weights as the runtime decodes them, from the packs."""
        by_path = {site.path: site for site in pool.sites}
        arrays = {}
        for pack in self.packs:
            position = 0
            offsets = pack.offsets or (0,) * len(pack.paths)
            for path, scale, offset in zip(pack.paths, pack.scales, offsets):
                site = by_path[path]
                chunk = pack.indices[position : position + site.size]
                arrays[path] = dequantize_scaled(self.codebooks[pack.codebook], chunk, scale, site.dtype, offset).reshape(site.dims)
                position += site.size
        return arrays

    def bins_used(self) -> int:
        return int(sum(cb.count if isinstance(cb, writer.GridCodebook) else len(cb) for cb in self.codebooks))


@dataclass
class Replay:
    """An adaptive conversion at any decision (x, gamma), without its search.

    The report holds what the search measured (``log2_optimal_step``) and the settings; the
    calibration is measured again on the same search half, so ``layout`` at the report's own
    recipe gives the converted file's weights exactly. Why: the bench sweeps the step scale ``x``
    on its test split, as it sweeps every peer's knob, to compare the quantizers apart from how
    each chooses; and a file can be rebuilt at a nearby step without a new search."""

    model: onnx.ModelProto
    pool: Pool
    stats: SiteStats
    log2_opt: np.ndarray
    calib: Calibration

    @classmethod
    def from_report(cls, model: onnx.ModelProto, data, report: dict) -> Replay:
        """``model`` and ``data`` (a DATA.npz path or arrays): those the report's conversion used."""
        from ..data import load_dataset
        from ..intake import pool_weights

        settings = report["settings"]
        if settings.get("mode") != "adaptive":
            raise ValueError(f"the report is of --mode {settings.get('mode')}, not adaptive")
        options = ConvertOptions(**{k: v for k, v in settings.items() if k in ConvertOptions.__dataclass_fields__})
        pool = pool_weights(model, options.min_elements)
        log2_opt = np.asarray(report["search"]["log2_optimal_step"], np.float64)
        if log2_opt.shape != (len(pool.sites),):
            raise ValueError(f"the report has {log2_opt.size} sensitivities for a pool of {len(pool.sites)} tensors")
        dataset = load_dataset(data, model, batch_size=options.batch_size)
        return cls(model, pool, site_stats(pool), log2_opt, calibration.measure(model, pool, search_half(dataset), options))

    def layout(self, x: float, gamma: float) -> Layout:
        return layout(self.pool, self.stats, self.log2_opt, x, gamma, self.calib)

    def quantization(self, x: float, gamma: float) -> PackedQuantization:
        """What the container stores for decision (x, gamma)."""
        return PackedQuantization.from_layout(self.pool, self.layout(x, gamma))

    def encode(self, x: float, gamma: float, metadata: dict[str, str]) -> bytes:
        """The .moub bytes for decision (x, gamma), written as the converter writes its files
        (with the converted file's own metadata, the report's recipe gives that file exactly)."""
        from ..encode import encode_model

        q = self.quantization(x, gamma)
        return encode_model(self.model, q.codebooks, {}, metadata, packs=q.packs, **q.build_options)
