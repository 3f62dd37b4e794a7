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

# Table order. "moub_paper" and "moub_best" are two rows of the one adapter module peers/moub.py.
PEERS = ("zstd", "fp16", "int8", "kmeans", "nncodec", "moub_paper", "moub_best")


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


def module(peer: str):
    """The module implementing a peer key of PEERS."""
    base = "moub" if peer.startswith("moub_") else peer
    return importlib.import_module(f"{__name__}.{base}")


def sweep(ctx: Context, settings: list[Any], encode: Callable[[Any], Candidate],
          midpoint: Callable[[Any, Any], Any] | None = None) -> list[Candidate]:
    """Encode and score settings from smallest file to largest; stop at the first that passes.

    After the first pass, one setting between it and the last failure is tried (if `midpoint`
    gives one), so the headline is not an artefact of a coarse grid. Later settings only make
    larger files, which cannot be the headline, so they are not spent.
    """
    done: list[Candidate] = []
    last_fail = None
    for s in settings:
        cand = encode(s)
        cand.fidelity = ctx.evaluate(cand.decoded)
        done.append(cand)
        if ctx.passes(cand.fidelity):
            if midpoint is not None and last_fail is not None:
                mid = midpoint(last_fail, s)
                if mid is not None and mid not in (last_fail, s):
                    extra = encode(mid)
                    extra.fidelity = ctx.evaluate(extra.decoded)
                    done.append(extra)
            break
        last_fail = s
    return done
