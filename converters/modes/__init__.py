"""Conversion modes, by name. ``paper`` is the faithful MO-UB method.

A new mode is a module here with a class implementing :class:`base.Mode`,
added to ``MODES``; the converter, CLI and report need no change.
"""

from __future__ import annotations

from ..errors import OptionError
from .base import Mode, ModeContext, ModeResult
from .adaptive import AdaptiveMode
from .paper import PaperMode

MODES: dict[str, type] = {PaperMode.name: PaperMode, AdaptiveMode.name: AdaptiveMode}


def register(mode_class: type) -> None:
    MODES[mode_class.name] = mode_class


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise OptionError(f"--mode {name!r} is not one of {', '.join(sorted(MODES))}")
    return MODES[name]()


__all__ = ["Mode", "ModeContext", "ModeResult", "MODES", "register", "get_mode"]
