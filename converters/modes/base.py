"""The interface every conversion mode implements.

A mode gets a :class:`ModeContext` (the pool, the conversion's session, the
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

from ..candidates import Candidate, Stage
from ..intake import Pool
from ..options import ConvertOptions
from ..session import ConversionSession
from ..solution import Quantization
from ..workers import Mapper


@dataclass
class ModeResult:
    candidates: list[Candidate]
    feasible: list[Candidate]  # within max_drop, best (smallest) first
    facts: dict = field(default_factory=dict)


@dataclass
class ModeContext:
    pool: Pool
    session: ConversionSession
    options: ConvertOptions
    map: Mapper
    progress: Callable[[dict], None]


class Mode(Protocol):
    name: str

    def run(self, ctx: ModeContext) -> ModeResult: ...

    def resume(self, session: ConversionSession, facts: dict) -> None:
        """Restore what ``materialize`` needs from a saved search's facts (the report's ``search``)."""

    def materialize(self, pool: Pool, candidate: Candidate, options: ConvertOptions,
                    candidates: list[Candidate]) -> tuple[Quantization, list[Stage]]: ...
