"""Compression methods compared by `make bench`, one module each.

Each module exposes:
    METHOD: str                                      # the row's name in the table
    run(ctx: Context) -> list[Candidate]             # encode (a sweep where the method has a knob)
    load_session(path: Path) -> InferenceSession     # decode-and-load, timed in a fresh subprocess
and raises Unavailable("why") when it cannot run here, which becomes a row saying so.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..fidelity import Fidelity

# Table order. "moub_paper", "moub_best" and "moub_swept" are rows of the one adapter module peers/moub.py.
PEERS = ("zstd", "fp16", "int8", "kmeans", "nncodec", "moub_paper", "moub_best", "moub_swept")


class Unavailable(RuntimeError):
    """The method cannot run here; the message is what the table prints instead of numbers."""


@dataclass
class Candidate:
    """One encoded file of one method (one point of its sweep)."""

    setting: str  # e.g. "k=256", "qp=-32"
    file: Path  # what would be shipped
    nbytes: int
    encode_s: float
    decoded: Path  # an .onnx that onnxruntime runs, for the fidelity measurement
    fidelity: Fidelity | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What a method gets for one model."""

    model: str  # benchmark model name
    onnx_path: Path  # the fp32 original
    work: Path  # a folder of its own for files
    evaluate: Callable[[Path], Fidelity]  # fidelity on the test split
    passes: Callable[[Fidelity], bool]  # the headline rule
    search_npz: Path  # search-split DATA.npz (for methods that calibrate on data)
    smoke: bool = False
    reference: Fidelity | None = None  # the fp32 model's own score on the test split


def module(peer: str):
    """The module implementing a peer key of PEERS."""
    base = "moub" if peer.startswith("moub_") else peer
    return importlib.import_module(f"{__name__}.{base}")


def sweep(ctx: Context, settings: list[Any], encode: Callable[[Any], Candidate],
          midpoint: Callable[[Any, Any], Any] | None = None, bisect: bool = False) -> list[Candidate]:
    """Encode and score settings ordered from smallest file to largest; find the first that passes.

    Linear (default): in order, stopping at the first pass. Bisect: a binary search for the first
    pass, assuming fidelity grows with the setting (log2 of the evaluations of a linear scan on a
    long grid); every setting it scored is returned. Either way, after the first pass one setting
    between it and the failure below it is tried (if `midpoint` gives one), so the headline is not
    an artefact of a coarse grid. Later settings only make larger files, which cannot be the
    headline, so they are not spent.
    """
    scored: dict[int, Candidate] = {}

    def score(i: int) -> Candidate:
        if i not in scored:
            cand = encode(settings[i])
            if cand.fidelity is None:
                cand.fidelity = ctx.evaluate(cand.decoded)
            scored[i] = cand
        return scored[i]

    first = None
    if bisect:
        lo, hi = 0, len(settings) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            if ctx.passes(score(mid).fidelity):
                first, hi = mid, mid - 1
            else:
                lo = mid + 1
    else:
        for i in range(len(settings)):
            if ctx.passes(score(i).fidelity):
                first = i
                break
    done = [scored[i] for i in sorted(scored)]
    if first is not None and first > 0 and (first - 1) in scored and midpoint is not None:
        mid_setting = midpoint(settings[first - 1], settings[first])
        if mid_setting is not None and mid_setting not in (settings[first - 1], settings[first]):
            extra = encode(mid_setting)
            if extra.fidelity is None:
                extra.fidelity = ctx.evaluate(extra.decoded)
            done.insert(done.index(scored[first]), extra)
    return done
