"""The interface every conversion mode implements.

A mode gets a :class:`ModeContext` (the pool, the scoring context, the
options, a parallel map and a progress hook) and returns a :class:`ModeResult`:
every candidate it evaluated (for the front and the plot), the feasible ones
best first, and for any candidate the quantization to write plus the stage
rows of the report (``materialize``). The converter around it loads, checks,
writes, verifies with the runtime and reports; a mode only decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..context import EvalContext, Mapper
from ..intake import Pool
from ..options import ConvertOptions
from ..solution import Quantization, Size


@dataclass
class Candidate:
    """One evaluated solution. ``loss`` is a lower bound when ``complete`` is False."""

    name: str
    stage: str                 # e.g. "search", "merge"
    quality: float | None      # None: stopped before any sample ran
    loss: float                # the tolerance measure (metrics.py); feasible: loss <= max_drop
    complete: bool
    bits_per_weight: float     # estimate incl. codebooks and tables
    bins: int
    recipe: dict               # what ``materialize`` needs to rebuild it (JSON-able)
    stopped: str | None = None  # why an incomplete evaluation stopped: "tolerance" or "dominated"
    fitted_loss: float | None = None  # the loss a mode's choice rule used, if not the measured one

    def to_dict(self, quality_original: float) -> dict:
        return {
            "name": self.name,
            "stage": self.stage,
            "bins": self.bins,
            "quality": None if self.quality is None else round(self.quality, 6),
            "drop": None if self.quality is None or not self.complete else round(quality_original - self.quality, 6),
            "loss": round(self.loss, 6),
            "complete": self.complete,
            "stopped": self.stopped,
            "fitted_loss": None if self.fitted_loss is None else round(self.fitted_loss, 6),
            "bits_per_weight": round(self.bits_per_weight, 6),
            "recipe": self.recipe,
        }


@dataclass
class Stage:
    """One row of the per-stage table (like the paper's Table I)."""

    name: str
    bins: int
    quality: float | None
    coding: str                # "fixed" (ceil(log2 bins) bits per index) or "huffman"
    size: Size


@dataclass
class ModeResult:
    candidates: list[Candidate]
    feasible: list[Candidate]  # within max_drop, best (smallest) first
    facts: dict = field(default_factory=dict)


@dataclass
class ModeContext:
    pool: Pool
    eval: EvalContext
    options: ConvertOptions
    map: Mapper
    progress: Callable[[dict], None]


class Mode(Protocol):
    name: str

    def run(self, ctx: ModeContext) -> ModeResult: ...

    def materialize(self, pool: Pool, candidate: Candidate, options: ConvertOptions,
                    candidates: list[Candidate]) -> tuple[Quantization, list[Stage]]: ...
