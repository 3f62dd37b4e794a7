"""Per-tensor uniform quantizers whose step sizes follow each tensor's sensitivity.

The paper's single equal-width codebook spends its resolution where the pool's
range is, not where the model needs it: on PP-OCRv4 the weight range is
-22..29 while the median |w| is 0.07. Here every pooled tensor ``t`` gets its own
step ``step_t`` (a uniform quantizer: value = round(w / step) * step), and the
steps of all tensors come from three numbers per tensor and two decisions:

    log2 step_t = x + m_sigma + gamma * (L_t - m_L) + (1 - gamma) * (log2 sigma_t - m_sigma)

``sigma_t`` is the tensor's standard deviation; ``L_t = 0.5 log2(n_t / a_t)`` is the
step that minimises the bits of all tensors for a given output distortion when
tensor ``t`` adds ``a_t * step_t^2`` to it (the sensitivity, measured by
``sensitivity.py``; setting the derivative of sum(n_t log2 step_t) against
sum(a_t step_t^2) to zero gives step_t^2 proportional to n_t / a_t); ``m_*`` are
size-weighted means, so ``x`` is the step in units of a typical tensor's sigma.
``gamma`` = 0 is a step proportional to each tensor's own spread, ``gamma`` = 1 the
sensitivity-optimal allocation; the search chooses both by real runs.

Dequantization is ``float32(q) * float32(step)``: exactly what a format-1.2 pack
member with a grid codebook and scale ``step`` decodes to (``scale_member``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moub_format import constants as C
from moub_format.reader import scale_member

from .intake import Pool

LOG2_STEP_RANGE = (-24.0, 2.0)    # a step stays within [sigma * 2^-24, sigma * 4]
MAX_ABS_INDEX = (1 << 22)         # |q| below this: well inside the grid codebook's 2^24 limit


@dataclass(frozen=True)
class RamLimit:
    """``--ram``: how many consecutive levels a tensor may use (None: any), and a weight that a
    compact session can hold in 4 bits (``Pool.four_bit``: read by one MatMul or Gemm alone). With
    256, a tensor's levels lie within +-254 and span at most 256 values, which int8 holds with a
    zero point; with 16, within +-14 spanning 16 values, which int4 or uint4 holds."""

    levels: int | None
    four_bit_levels: int | None = None

    def per_site(self, pool: Pool) -> np.ndarray | None:
        """Each pooled site's limit, in pool order (None: no limit); a site the fallback gave the
        int16 window (``Pool.sixteen_bit``) gets :data:`SIXTEEN_BIT_LEVELS`."""
        if self.levels is None:
            return None
        narrow = self.four_bit_levels or self.levels
        return np.array([SIXTEEN_BIT_LEVELS if site.path in pool.sixteen_bit else narrow if site.path in pool.four_bit
                         else self.levels for site in pool.sites], dtype=np.int64)


SIXTEEN_BIT_LEVELS = 1 << 16  # the int16 window: levels spanning at most 65535 values, which int16 holds with a zero point


RAM_LEVEL_LIMITS: dict[str, RamLimit] = {"float": RamLimit(None), "int8": RamLimit(256), "int4": RamLimit(256, 16)}


@dataclass(frozen=True)
class SiteStats:
    """What the step allocation needs to know of every pooled tensor."""

    sizes: np.ndarray        # n_t, elements
    log2_sigma: np.ndarray   # log2 of the standard deviation (of max |w| for constant tensors)
    max_abs: np.ndarray      # max |w|
    max_level: np.ndarray | None = None   # per site: consecutive levels it may use (RAM_LEVEL_LIMITS); None: any
    low: np.ndarray | None = None  # min w and max w (with max_level)
    high: np.ndarray | None = None


def site_stats(pool: Pool, limit: RamLimit = RAM_LEVEL_LIMITS["float"]) -> SiteStats:
    sizes, log2_sigma, max_abs, low, high = [], [], [], [], []
    for site in pool.sites:
        values = pool.values[site.start : site.stop].astype(np.float64)
        peak = float(np.abs(values).max()) if values.size else 0.0
        sigma = float(values.std()) if values.size > 1 else 0.0
        spread = sigma if sigma > 0 else (peak if peak > 0 else 1.0)
        sizes.append(site.size)
        log2_sigma.append(np.log2(spread))
        max_abs.append(peak)
        low.append(float(values.min()) if values.size else 0.0)
        high.append(float(values.max()) if values.size else 0.0)
    return SiteStats(np.asarray(sizes, np.int64), np.asarray(log2_sigma), np.asarray(max_abs), limit.per_site(pool),
                     np.asarray(low), np.asarray(high))


def allocate_steps(stats: SiteStats, log2_sens_step: np.ndarray, x: float, gamma: float) -> np.ndarray:
    """float32 step per site for decision (x, gamma); see the module docstring."""
    weights = stats.sizes / stats.sizes.sum()
    m_sigma = float(weights @ stats.log2_sigma)
    m_sens = float(weights @ log2_sens_step)
    log2_step = (x + m_sigma + gamma * (log2_sens_step - m_sens)
                 + (1.0 - gamma) * (stats.log2_sigma - m_sigma))
    low, high = LOG2_STEP_RANGE
    log2_step = np.clip(log2_step, stats.log2_sigma + low, stats.log2_sigma + high)
    steps = np.exp2(log2_step)
    # indices stay small enough for an exact grid codebook
    steps = np.maximum(steps, stats.max_abs / MAX_ABS_INDEX)
    if stats.max_level is not None:
        # levels within +-(max_level - 2) and spanning at most max_level - 1 values (the rest: a
        # level of margin at each end for float32 rounding of the step)
        span = np.maximum(stats.high - stats.low, stats.max_abs)
        steps = np.maximum(steps, span / (stats.max_level - 2))
    return steps.astype(np.float32)


def quantize(values: np.ndarray, step: np.float32) -> np.ndarray:
    """Integer levels round(values / step) (ties to even), int32 (|level| < GRID_LIMIT = 2^24).

    In place on one float64 temporary: the search quantizes the whole pool per candidate,
    and int64 levels plus three float64 temporaries cost 32 bytes per weight of the largest
    tensor and 8 per weight held; now 12 and 4."""
    q = values.astype(np.float64)
    q /= float(step)
    np.rint(q, out=q)
    if q.size and max(-float(q.min()), float(q.max())) >= C.GRID_LIMIT:
        raise ValueError(f"step {float(step)} leaves a level outside the grid codebook's range")
    return q.astype(np.int32)


def dequantize(q: np.ndarray, step: np.float32, dtype: int) -> np.ndarray:
    """What the runtime decodes for levels ``q`` of a pack member with scale ``step``."""
    return scale_member(q.astype(np.float32), float(step), dtype)


def quantize_pool(pool: Pool, steps: np.ndarray) -> list[np.ndarray]:
    """Levels of every pooled site, in pool order."""
    return [quantize(pool.values[site.start : site.stop], steps[i]) for i, site in enumerate(pool.sites)]


def site_arrays(pool: Pool, levels: list[np.ndarray], steps: np.ndarray) -> dict[str, np.ndarray]:
    """Each site's quantized tensor in its storage dtype and shape (bit-exact with decode)."""
    return {site.path: dequantize(levels[i], steps[i], site.dtype).reshape(site.dims)
            for i, site in enumerate(pool.sites)}
