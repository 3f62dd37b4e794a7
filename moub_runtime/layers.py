"""What each quantized tensor of a .moub costs: ``moub inspect --layers``.

Read from the file alone (the runtime knows nothing of how it was converted): per stored
tensor its weights, its step (a pack member's scale: the distance between its levels) or its
codebook, the levels it uses and the bits per weight its codes take in the stream (the sum of
its code lengths; the stream's chunk padding and the shared tables are the file's, not a
tensor's). A converter's report may add what the file cannot know (measured sensitivity,
share of the output error): :func:`with_report` joins them by tensor path.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from moub_format import DEFAULT_LIMITS, MoubFormatError, ReaderLimits
from moub_format import constants as C

from .validation import open_checked


@dataclass
class LayerRow:
    path: str
    weights: int
    step: float | None          # pack members: the scale of their grid of levels
    codebook: int | None        # Huffman tensors (no packs): the shared codebook they index
    levels: int                 # distinct values its indices use
    bits_per_weight: float      # its codes' bits over its weights
    sensitivity: float | None = None   # from a converter's report (with_report)
    error_share: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _row(path: str, symbols: np.ndarray, lengths: np.ndarray, step: float | None, codebook: int | None) -> LayerRow:
    n = int(symbols.size)
    bits = int(lengths[symbols].sum(dtype=np.int64)) if n else 0
    levels = int(np.count_nonzero(np.bincount(symbols, minlength=lengths.size))) if n else 0
    return LayerRow(path, n, step, codebook, levels, round(bits / n, 4) if n else 0.0)


def layer_rows(path: str | os.PathLike, limits: ReaderLimits = DEFAULT_LIMITS) -> list[LayerRow]:
    """One row per quantized tensor (Huffman tensors, then pack members), file order; the file is
    checked as loading it is, and each stream's indices decoded once."""
    with open_checked(path, limits) as checked:
        moub = checked.moub
        index = moub.index
        rows = []
        for t in index.tensors:
            if t.encoding == C.ENCODING_HUFFMAN:
                rows.append(_row(t.path, moub.decode_indices(t), index.tables[t.table], None, t.codebook))
        for p in index.packs:
            symbols = moub.decode_indices(p)
            for m in p.members:
                name = checked.members[m.site].path
                rows.append(_row(name, symbols[m.start : m.start + m.count], index.tables[p.table], m.scale, None))
        return rows


def with_report(rows: list[LayerRow], report_path: str | os.PathLike) -> list[LayerRow]:
    """``rows`` with the sensitivity and error share of a converter's report (its ``layers``),
    matched by tensor path; raises MoubFormatError naming the report if it is no such report."""
    try:
        report = json.loads(open(report_path, encoding="utf-8").read())
        measured = {r["tensor"]: r for r in report["layers"] if isinstance(r, dict)}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MoubFormatError(f"{report_path}: not a report with a per-layer table ({type(exc).__name__}: {exc})") from None
    for row in rows:
        r = measured.get(row.path, {})
        for key in ("sensitivity", "error_share"):
            value = r.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise MoubFormatError(f"{report_path}: layer {row.path!r}: {key} {value!r} is not a number")
        row.sensitivity, row.error_share = r.get("sensitivity"), r.get("error_share")
    return rows
