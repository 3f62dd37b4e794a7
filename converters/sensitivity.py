"""How much each pooled tensor's quantization noise disturbs the model's outputs.

For every pooled tensor ``t`` the model runs once (on a few samples) with only
that tensor quantized at a test step ``s_t = sigma_t * TEST_STEP``; the relative
squared error of the outputs, ``D_t``, divided by ``s_t^2`` is its sensitivity
``a_t`` (for small uniform noise the distortion grows with the step squared).
The error is measured where the outputs' decisions are made and on each output's own
scale: a probability judged by one decision per row (top-1, a threshold) as log-odds, since a
confident probability hides the margin its logits lose; every output (and every channel of an
output judged per channel) against its own energy, the mean of those ratios deciding
(docs/decisions/0055). A map of probabilities stays in probabilities: its saturated
background, far from any decision, would outweigh the values near the threshold.
A few tensors dominate the error; the steps these give (``uniform.allocate_steps``)
put the fine steps there, and need fewer bits than one step for all tensors at the
same fidelity (docs/decisions/0005).

The distortion is a smooth measure, unlike top-1 agreement, so a few samples
spread over the data rank tensors well enough for the search, which tunes how
far to trust them (``gamma``). How many samples is a deterministic function of the
model's size, the input's size and the number of tensors (never of a clock: the same
inputs must give the same file): a few for large models and inputs, up to
``MAX_SAMPLES`` for small ones. Other measures of sensitivity rank tensors no better
(docs/decisions/0005).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import bias_correction
from .evaluate import reference_rows
from .metrics import CHANNEL_FLOOR, METRICS, channel_energy
from .session import ConversionSession
from .uniform import SiteStats, dequantize, quantize
from .workers import Mapper

TEST_STEP = 2.0 ** -4       # test step, in units of the tensor's sigma: near the steps finally chosen
SAMPLE_BUDGET = 2.4e14      # sensitivity work: samples x input values per sample x pooled weights x tensors
MIN_SAMPLES, MAX_SAMPLES = 1, 32
SMALL_TENSOR = 1024          # below this, a tensor's step is never coarser than the typical one
TINY = 1e-30                 # probabilities are floored here before their logarithm

def relative_error(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> tuple[float, float]:
    """(sum of squared errors, sum of squared reference values) over the float outputs."""
    err = energy = 0.0
    for o, r in zip(outputs, reference):
        if r.dtype.kind != "f":
            continue
        r64 = np.asarray(r, dtype=np.float64)
        err += float(np.sum((np.asarray(o, dtype=np.float64) - r64) ** 2))
        energy += float(np.sum(r64 * r64))
    return err, energy


def log_odds(outputs: Sequence[np.ndarray], kinds: Sequence[str]) -> list[np.ndarray]:
    """Probability outputs as the scores their decisions compare: a Softmax's log-probabilities
    centred over its classes (the logits up to a shift), a Sigmoid's log-odds; other outputs as
    they are. A confident probability barely moves when its logits move, so its squared error
    says little about the margins that decide top-1 or a threshold."""
    out = []
    for o, kind in zip(outputs, kinds):
        if o.dtype.kind == "f" and kind == "Softmax":
            o = np.log(np.maximum(np.asarray(o, np.float64), TINY))
            o = o - o.mean(axis=-1, keepdims=True)
        elif o.dtype.kind == "f" and kind == "Sigmoid":
            p = np.clip(np.asarray(o, np.float64), TINY, 1.0 - 2.0 ** -53)
            o = np.log(p) - np.log1p(-p)
        out.append(o)
    return out


def site_distortion(session: ConversionSession, task: tuple[int, float, int]) -> dict:
    """Relative output error with only pool site ``task[0]`` quantized at step ``task[1]``,
    on ``task[2]`` samples spread over the data (a module-level function: it runs in workers)."""
    number, step, samples = task
    pool = session.pool
    site = pool.sites[number]
    dataset, reference = session.sample_subset(samples)
    arrays = dict(session.originals)
    levels = quantize(pool.values[site.start : site.stop], np.float32(step))
    arrays[site.path] = dequantize(levels, np.float32(step), site.dtype).reshape(site.dims)
    arrays = bias_correction.arrays_with_bias(pool, session.calibration.corrector, number, arrays[site.path], arrays)
    rows = [0] * len(reference)  # output rows, which need not be samples (see subset_reference)
    kinds = [kind if metric in METRICS and METRICS[metric].judges_margins else ""
             for kind, metric in zip(session.output_kinds, session.output_metrics)]
    per_channel = session.per_channel_outputs
    err: list = [0.0] * len(reference)
    energy: list = [0.0] * len(reference)
    for _, outputs in session.scorer.evaluator.iter_outputs(arrays, dataset):
        picked = reference_rows(reference, outputs, rows)
        for i, (o, r) in enumerate(zip(log_odds(outputs, kinds), log_odds(picked, kinds))):
            if r.dtype.kind != "f":
                continue
            r64 = np.asarray(r, np.float64)
            d = np.asarray(o, np.float64) - r64
            if i in per_channel and r64.ndim >= 2:
                err[i] = err[i] + channel_energy(d)
                energy[i] = energy[i] + channel_energy(r64)
            else:
                err[i] += float(np.sum(d * d))
                energy[i] += float(np.sum(r64 * r64))
    return {"site": number, "distortion": relative_distortion(err, energy), "units": dataset.n_samples, "stopped": None}


def relative_distortion(err: Sequence, energy: Sequence) -> float:
    """The mean over the outputs (and over the channels of an output judged per channel) of each
    one's squared error against its own energy: the metric judges every head on its own scale, so
    the loudest output must not decide which tensors look sensitive (a state of values near 20
    beside a probability, pixel boxes beside scores)."""
    ratios: list[float] = []
    for e, en in zip(err, energy):
        e, en = np.atleast_1d(np.asarray(e, np.float64)), np.atleast_1d(np.asarray(en, np.float64))
        floor = np.maximum(en, CHANNEL_FLOOR * float(en.max(initial=0.0)))
        ratios.extend(np.where(floor > 0, e / np.where(floor > 0, floor, 1.0), e).tolist())
    return float(np.mean(ratios)) if ratios else 0.0


def sample_count(n_samples: int, input_values_per_sample: int, n_weights: int, n_tensors: int) -> int:
    """Samples per sensitivity run (see the module docstring)."""
    work = max(1, input_values_per_sample) * max(1, n_weights) * max(1, n_tensors)
    return int(min(n_samples, max(MIN_SAMPLES, min(MAX_SAMPLES, SAMPLE_BUDGET // work))))


def measure(mapper: Mapper, stats: SiteStats, samples: int) -> np.ndarray:
    """Relative output distortion D_t of every pooled site at its test step (one run each)."""
    steps = np.exp2(stats.log2_sigma) * TEST_STEP
    tasks = [(i, float(np.float32(steps[i])), samples) for i in range(stats.sizes.size)]
    runs = mapper(site_distortion, tasks)
    return np.array([r["distortion"] for r in sorted(runs, key=lambda r: r["site"])], dtype=np.float64)


def log2_optimal_steps(stats: SiteStats, distortions: np.ndarray) -> np.ndarray:
    """0.5*log2(n_t / a_t) with a_t = D_t / s_t^2, where the measurement can be trusted.

    Two kinds of tensor get the size-weighted median step (in units of their sigma) instead:
    tensors without measurable effect at the test step, and tensors under SMALL_TENSOR values
    whose extrapolated step would be coarser. The step formula assumes small noise; far from
    the test step it is a guess: a block saturated by a hard sigmoid shows no effect at the test
    step yet costs a constant error at a coarse one, and a small constant of large values can
    extrapolate to a step many times its sigma. On a tensor of a few hundred values a guess
    saves a few bytes at best (docs/decisions/0008)."""
    test = np.exp2(stats.log2_sigma) * TEST_STEP
    a = distortions / (test.astype(np.float64) ** 2)
    positive = a > 0
    if not positive.any():
        return stats.log2_sigma.astype(np.float64).copy()
    relative = np.empty(a.size)  # log2(step / sigma)
    relative[positive] = 0.5 * np.log2(stats.sizes[positive] / a[positive]) - stats.log2_sigma[positive]
    typical = weighted_median(relative[positive], stats.sizes[positive])
    relative[~positive] = typical
    small = stats.sizes < SMALL_TENSOR
    relative[small] = np.minimum(relative[small], typical)
    return stats.log2_sigma + relative


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value below which half of the total weight lies (ties: the smaller value)."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order], dtype=np.float64)
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])