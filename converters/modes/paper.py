"""``--mode paper``: the MO-UB method as published, faithfully.

1. Pool every weight; equal-width bins over the pool's [min, max] into one
   shared codebook (``binning.py``).
2. NSGA-II over the bin count k: quality loss vs encoded bits per weight
   (``bin_search.py``, on the shared engine of ``search.py``).
3. For the front's solutions within ``max_drop``, merge neighbouring bins,
   cheapest first, while quality holds, within ``merge_budget`` evaluations
   (``merge.py``; how many merges hold is found by bisection along the greedy path).
4. One canonical Huffman table over the shared codebook's indices.

Stage rows: ``binning`` (the chosen k with fixed-length indices), ``+merge``
(after merging, still fixed-length), ``+Huffman`` (what the file holds).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..binning import Binning, uniform_binning
from ..intake import Pool
from ..merge import Groups, merge_cheapest
from ..options import ConvertOptions
from ..bin_search import STEPS_PER_OCTAVE, bin_grid, search_bin_counts
from ..search import pareto_front
from ..session import ConversionSession
from ..solution import Quantization, chunk_overhead_bits, counts_size, fixed_length_size, huffman_size
from ..candidates import Candidate, Stage, candidate_from_result
from ..selection import rank, robust_feasible
from .base import ModeContext, ModeResult

MERGE_STARTS = 3  # feasible front solutions that get merge chains


def _binning(pool: Pool, k: int, representative: str) -> Binning:
    return uniform_binning(pool.values, k, representative)


def _replay(binning: Binning, merges: list[int]) -> Groups:
    groups = Groups.from_binning(binning)
    for n in merges:
        groups = merge_cheapest(groups, n)
    return groups


def _result(name: str, stage: str, score, bins: int, size, recipe: dict) -> dict:
    return {
        "name": name, "stage": stage, "quality": score.quality, "loss": score.loss, "complete": score.complete,
        "stopped": score.stopped, "units": score.units, "bins": bins, "bits_per_weight": size.bits_per_weight,
        "recipe": recipe,
    }


def bins_size(pool: Pool, k: int, representative: str):
    binning = _binning(pool, k, representative)
    return binning, counts_size(binning.counts, pool.n_weights, chunk_overhead_bits(pool))


def score_bins(session: ConversionSession, task: tuple[int, float | None]) -> dict:
    """Evaluate equal-width binning with k bins (runs in a worker when parallel); stop once
    the loss exceeds the search's cap or reaches ``dominated_at``."""
    k, dominated_at = task
    pool = session.pool
    binning, size = bins_size(pool, k, session.options.representative)
    q = Quantization((binning.codebook,), binning.indices)
    score = session.scorer.score(q.site_arrays(pool), max_loss=session.search_max_loss, dominated_at=dominated_at)
    return _result(f"k={k}", "search", score, binning.bins_used, size, {"k": int(k), "merges": []})


def score_merge(session: ConversionSession, recipe: dict) -> dict:
    """Evaluate bins of k after the recipe's merge steps; stops early once infeasible."""
    pool, rep = session.pool, session.options.representative
    binning = _binning(pool, recipe["k"], rep)
    groups = _replay(binning, recipe["merges"])
    q = Quantization((groups.codebook(rep),), groups.group_of_bin[binning.indices].astype(binning.indices.dtype))
    score = session.scorer.score(q.site_arrays(pool), max_loss=session.feasible_max_loss)
    size = counts_size(groups.counts, pool.n_weights, chunk_overhead_bits(pool))
    name = f"k={recipe['k']} merged to {groups.size} bins"
    return _result(name, "merge", score, groups.size, size, {"k": int(recipe["k"]), "merges": list(recipe["merges"])})


@dataclass
class _Chain:
    """Merge trials from one front solution.

    Repeatedly merging the cheapest neighbouring pair traces one fixed path (each
    step depends only on the bins left), so "how many merges keep quality" is a
    search along that path: a binary search between the longest prefix known to
    hold (``good``) and the shortest known to fail (``bad``), one evaluation per step.
    """

    k: int
    bins: int
    good: int = 0
    bad: int | None = None  # None: not yet known; bins - 1 merges leave one bin

    @property
    def active(self) -> bool:
        top = self.bins if self.bad is None else self.bad
        return top - self.good > 1

    def trial(self) -> dict:
        top = self.bins if self.bad is None else self.bad
        return {"k": self.k, "merges": [(self.good + top) // 2]}

    def update(self, result: dict, accepted: bool) -> None:
        merges = result["recipe"]["merges"][0]
        if accepted:
            self.good = merges
        else:
            self.bad = merges


class PaperMode:
    name = "paper"

    def run(self, ctx: ModeContext) -> ModeResult:
        opts = ctx.options
        grid = bin_grid(opts.max_bins, STEPS_PER_OCTAVE)

        sizes: dict[int, float] = {}

        def size_of(k: int) -> float:
            if k not in sizes:
                sizes[k] = bins_size(ctx.pool, k, opts.representative)[1].bits_per_weight
            return sizes[k]

        def run(tasks: list[tuple[int, float | None]], max_loss: float, stage: str) -> list[dict]:
            return ctx.map(score_bins, tasks)  # score_bins stops at the search's own cap

        ctx.progress({"phase": "search", "total": min(len(grid), opts.population * opts.generations)})
        problem, facts = search_bin_counts(grid, run, size_of, opts.population, opts.generations, opts.patience, opts.seed,
                                           on_generation=lambda g: ctx.progress({"phase": "search", "generation": g}),
                                           loss_cap=opts.effective_abort_drop(), wave=opts.wave)
        candidates = [candidate_from_result(problem.cache[k]) for k in problem.order]
        facts = {**facts, "grid": {"points": int(len(grid)), "min": int(grid[0]), "max": int(grid[-1]),
                                   "steps_per_octave": STEPS_PER_OCTAVE},
                 "search_evaluations": len(candidates)}

        # Merge the front's feasible solutions, smallest first: each chain bisects until it
        # closes or the budget is spent; what is left goes to the next one.
        allowed = robust_feasible(candidates, opts.max_drop, opts.monotone)
        starts = rank([allowed[i] for i in pareto_front([(c.loss, c.bits_per_weight) for c in allowed])])[:MERGE_STARTS]
        budget = opts.merge_budget
        trials = accepted = 0
        ctx.progress({"phase": "merge", "total": opts.merge_budget})
        for start in starts:
            chain = _Chain(start.recipe["k"], start.bins)
            while budget > 0 and chain.active:
                result = ctx.map(score_merge, [chain.trial()])[0]
                budget -= 1
                trials += 1
                ok = result["complete"] and result["loss"] <= opts.max_drop + 1e-12
                chain.update(result, ok)
                if ok:
                    accepted += 1
                    candidates.append(candidate_from_result(result))
        facts.update({"merge_starts": [c.name for c in starts], "merge_trials": trials, "merge_accepted": accepted})
        return ModeResult(candidates, rank(robust_feasible(candidates, opts.max_drop, opts.monotone)), facts)

    def resume(self, session: ConversionSession, facts: dict) -> None:
        """Nothing to restore: a candidate's recipe (k and its merges) rebuilds it."""

    def materialize(self, pool: Pool, candidate: Candidate, options: ConvertOptions,
                    candidates: list[Candidate]) -> tuple[Quantization, list[Stage]]:
        rep = options.representative
        k, merges = int(candidate.recipe["k"]), list(candidate.recipe.get("merges", []))
        quality_of_k = next((c.quality for c in candidates if c.stage == "search" and c.recipe["k"] == k), None)
        binning = _binning(pool, k, rep)
        q = Quantization((binning.codebook,), binning.indices)
        n = pool.n_weights
        stages = [Stage("binning", binning.bins_used, quality_of_k, "fixed", fixed_length_size([binning.bins_used], n))]
        if merges:
            groups = _replay(binning, merges)
            q = Quantization((groups.codebook(rep),), groups.group_of_bin[binning.indices].astype(binning.indices.dtype))
        bins = q.bins_used()
        stages.append(Stage("+merge", bins, candidate.quality, "fixed", fixed_length_size([bins], n)))
        stages.append(Stage("+Huffman", bins, candidate.quality, "huffman", huffman_size(q, pool)))
        return q, stages


def fixed_bins(pool: Pool, k: int, representative: str = "mean") -> tuple[Quantization, list[Stage]]:
    """The fixed-bins encoder (``--bins K``): equal-width binning, member means, Huffman; no search."""
    binning = _binning(pool, k, representative)
    q = Quantization((binning.codebook,), binning.indices)
    n = pool.n_weights
    return q, [
        Stage("binning", binning.bins_used, None, "fixed", fixed_length_size([binning.bins_used], n)),
        Stage("+Huffman", binning.bins_used, None, "huffman", huffman_size(q, pool)),
    ]
