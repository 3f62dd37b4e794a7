"""Progress a person can plan by: each phase's work done of its total, elapsed time and an ETA.

``convert(progress=f)`` calls ``f`` with one dict per event (the same events drive the console):

* ``{"phase": NAME, "total": N}``: a phase begins; N units of work at most (evaluations or
  onnxruntime runs; None: not known). The adaptive mode's phases: sensitivity, bracket,
  search, refine, confirm, coarsen (top-1 metrics), target (with a size target); the paper
  mode's: search, merge; then the converter's own: write (measure the written file), layers
  (the per-layer error shares). Where no candidate holds the tolerance, keep exact: one probe per
  set of tensors kept exact (``fallback.py``), each followed by the adaptive phases again where it holds.
* ``{"phase": "search", "generation": G}``: generation G of the search ended.
* ``{"result": R}``: one evaluation ended, one unit of the current phase; ``R`` has ``name``,
  ``bits_per_weight``, ``loss`` (a lower bound unless ``complete``), ``complete`` and ``stopped``
  (the sensitivity runs' results have a ``distortion`` instead of a loss).
* ``{"done": K}``: K units of the current phase ended that are no evaluation.

A phase's total is an upper bound where the work stops early (the search stops once its front
stops changing), so the ETA is a bound too. :class:`ConsoleProgress` shows them on stderr: a
live line on a terminal, and timestamped plain lines when stderr is a file or a pipe (a log).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

LOG_INTERVAL = 15.0  # seconds between plain lines within a phase
WIDTH = 80


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class PhaseClock:
    """The current phase's work done, total and timing; the best candidate within tolerance so far."""

    def __init__(self, max_drop: float, now: Callable[[], float] = time.monotonic) -> None:
        self.max_drop, self.now = max_drop, now
        self.started = now()
        self.phase: str | None = None
        self.total: int | None = None
        self.done = 0
        self.phase_started = self.started
        self.best: dict | None = None

    def update(self, event: dict) -> str | None:
        """Apply ``event``; return the name of the phase it ended, if it began a new one."""
        ended = None
        if "phase" in event and (event["phase"] != self.phase or "total" in event):
            ended = self.phase
            self.phase, self.total, self.done, self.phase_started = event["phase"], event.get("total"), 0, self.now()
        if "result" in event:
            self.done += 1
            r = event["result"]
            if r.get("complete") and r.get("loss", math.inf) <= self.max_drop + 1e-12:
                if self.best is None or r["bits_per_weight"] < self.best["bits_per_weight"]:
                    self.best = r
        self.done += int(event.get("done", 0))
        return ended

    def eta(self) -> float | None:
        if not self.total or not self.done:
            return None
        left = max(0, self.total - self.done)
        return (self.now() - self.phase_started) / self.done * left

    def text(self) -> str:
        """One line of at most WIDTH - 10 characters (a timestamp or a bar goes before it)."""
        total = f"/{self.total}" if self.total else ""
        work = f"{self.done}{total}"
        best = "none within tolerance yet"
        if self.best:
            best = f"best {self.best['bits_per_weight']:.3f} b/w, loss {self.best['loss']:.4f}"
        return (f"{(self.phase or 'start')[:11]:11} {work:>9} {_clock(self.now() - self.phase_started)} "
                f"eta {_clock(self.eta())}  {best}")[: WIDTH - 10]


class ConsoleProgress:
    """Progress on ``stream`` (stderr): rich's live line on a terminal, else plain timestamped lines
    (at a phase's start and end and every ``interval`` seconds), each within 80 columns."""

    def __init__(self, max_drop: float, stream: TextIO | None = None, interval: float = LOG_INTERVAL,
                 now: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.clock = PhaseClock(max_drop, now)
        self.interval, self.wall = interval, wall
        self.last_line = -math.inf
        self._live = None
        if getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            console = Console(file=self.stream)
            self._live = Progress(BarColumn(bar_width=8), TextColumn("{task.description}"), console=console,
                                  transient=True)
            self._task = self._live.add_task(self.clock.text(), total=None)
            self._live.start()

    def _line(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.wall()))
        print(f"{stamp}  {text}", file=self.stream, flush=True)
        self.last_line = self.clock.now()

    def __call__(self, event: dict) -> None:
        finished_text = self.clock.text() if "phase" in event and event["phase"] != self.clock.phase else None
        ended = self.clock.update(event)
        if self._live is not None:
            self._live.update(self._task, description=self.clock.text(), total=self.clock.total or None,
                              completed=self.clock.done)
            return
        if ended is not None and finished_text is not None:
            self._line(finished_text)
        if ended is not None or self.clock.phase and self.last_line == -math.inf:
            self._line(self.clock.text())
        elif self.clock.now() - self.last_line >= self.interval:
            self._line(self.clock.text())

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
        elif self.clock.phase is not None:
            self._line(self.clock.text())
