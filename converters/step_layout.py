"""An adaptive decision turned into per-tensor steps, levels, packs and the bytes the container stores.

``layout`` applies the step allocation (``uniform.allocate_steps``) at (x, gamma), rounds every
site with the calibration (error feedback, bias correction: ``calibration.py``), groups the
levels into packs (``packing.py``) and counts their bits; :class:`PackedQuantization` is that
layout as the writer takes it: grid or explicit codebooks, pack members with their scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moub_format import constants as FC
from moub_format import writer
from moub_format.reader import MIN_LANES

from .calibration import Calibration
from .encode import PackAssignment, dequantize_scaled
from .intake import Pool
from .packing import PackPlan, plan_packs, total_bits
from .uniform import SiteStats, allocate_steps

BUILD_OPTIONS = {"graph_codec": FC.CODEC_LZMA, "raw_codec": writer.SMALLEST, "alignment": 8,
                 "elide_constant_names": True}  # Paddle exports name each Constant twice: 680 B of rapidocr cls
MAX_CHUNK_ELEMENTS = 4096     # 32-bit chunk entries (plus ~4 padding bits) every 4096 weights: 0.009 bits/weight
MIN_CHUNK_ELEMENTS = 1024     # ... every 1024: 0.035 bits/weight


def chunk_elements(n_weights: int) -> int:
    """Elements per independently decodable chunk of an adaptive file.

    The reader decodes all chunks in lock step, one NumPy call per step for all of them, so
    a model with few chunks pays NumPy's per-call overhead on nearly every weight and loads
    several times slower than its plain ``.onnx`` (docs/decisions/0023). So the chunk is the
    largest power of two in [1024, 4096] that gives about ``DECODER_LANES`` chunks
    (:func:`moub_format.writer.default_chunk_elements`); models too small for lock-step
    decoding even at 1024 (fewer than ``MIN_LANES`` chunks: the reader decodes them one by
    one) keep 4096, where chunks cost least."""
    chunk = min(MAX_CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, writer.default_chunk_elements(n_weights)))
    return MAX_CHUNK_ELEMENTS if n_weights // chunk < MIN_LANES else chunk


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
    offsets = None
    if stats.max_level is not None:
        # error feedback and bias correction can step a level past the step floor's window; the
        # search measures the clipped levels, so the loss it holds is the file's. In the shared
        # pack each member is offset by the middle of its window, so the pack's grid spans
        # max_level values at most and every member's levels, as a reader bounds them, stay in its window;
        # sites of different windows never share a pack (a 4-bit weight's would widen to the others')
        offsets = []
        for q, step, low, window in zip(levels, steps, stats.low, stats.max_level.tolist()):
            bound = window - 2
            first = int(np.clip(np.rint(low / float(step)), -bound, bound - window + 1))
            np.clip(q, first, first + window - 1, out=q)
            offsets.append(first + window // 2)
    plans = plan_packs(levels, offsets, None if stats.max_level is None else stats.max_level.tolist())
    return Layout(steps, levels, plans, total_bits(plans, stats.sizes, chunk_elements(pool.n_weights)))


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
