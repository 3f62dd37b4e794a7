"""An adaptive conversion rebuilt at any decision (x, gamma), without its search."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from . import calibration
from .calibration import Calibration
from .intake import Pool
from .options import ConvertOptions
from .split import search_half
from .step_layout import Layout, PackedQuantization, layout
from .uniform import RAM_LEVEL_LIMITS, SiteStats, site_stats


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
    min_elements: int = 1024   # the conversion's: which integer tensors it coded

    @classmethod
    def from_report(cls, model: onnx.ModelProto, data, report: dict) -> Replay:
        """``model`` and ``data`` (a DATA.npz path or arrays): those the report's conversion used."""
        from .data import load_dataset
        from .intake import pool_weights

        settings = report["settings"]
        if settings.get("mode") != "adaptive":
            raise ValueError(f"the report is of --mode {settings.get('mode')}, not adaptive")
        options = ConvertOptions(**{k: v for k, v in settings.items() if k in ConvertOptions.__dataclass_fields__})
        pool = pool_weights(model, options.min_elements)
        log2_opt = np.asarray(report["search"]["log2_optimal_step"], np.float64)
        if log2_opt.shape != (len(pool.sites),):
            raise ValueError(f"the report has {log2_opt.size} sensitivities for a pool of {len(pool.sites)} tensors")
        dataset = load_dataset(data, model, batch_size=options.batch_size)
        return cls(model, pool, site_stats(pool, RAM_LEVEL_LIMITS[options.ram]), log2_opt,
                   calibration.measure(model, pool, search_half(dataset), options), options.min_elements)

    def layout(self, x: float, gamma: float) -> Layout:
        return layout(self.pool, self.stats, self.log2_opt, x, gamma, self.calib)

    def quantization(self, x: float, gamma: float) -> PackedQuantization:
        """What the container stores for decision (x, gamma)."""
        return PackedQuantization.from_layout(self.pool, self.layout(x, gamma))

    def encode(self, x: float, gamma: float, metadata: dict[str, str]) -> bytes:
        """The .moub bytes for decision (x, gamma), written as the converter writes its files
        (with the converted file's own metadata, the report's recipe gives that file exactly)."""
        from .encode import encode_model

        from .integers import integer_coding

        q = self.quantization(x, gamma)
        codebooks, assignments = integer_coding(self.model, self.min_elements).extend(q.codebooks, {})
        return encode_model(self.model, codebooks, assignments, metadata, packs=q.packs, **q.build_options)
