"""Any evaluated candidate of a saved search, written without searching again.

The report lists every candidate the search evaluated with the recipe that rebuilds it, the
settings, the steps the adaptive mode measured (``search.log2_optimal_step``, full precision)
and the front as the file's metadata holds it (``file_front``). With the model and data of
that conversion, :func:`write_point` rebuilds the named candidate (the calibration is measured
again on the same search half, the same bits), decodes it with ``moub_runtime``, measures it
on all the data and writes it as the converter writes its choice: the same bytes a search that
chose that point would write. The report's own choice comes back byte for byte.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from .api import ConvertResult, _Counter, _Setup, _Writer
from .candidates import Candidate
from .errors import DataError, ModelError, OptionError
from .fallback import REASON_KEPT_EXACT
from .intake import load_source, pool_weights
from .modes import get_mode
from .options import ConvertOptions


def read_report(path: str | os.PathLike) -> dict:
    """A report written by ``moub convert --report``; one clear error if it is not one."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON report ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("candidates"), list) or "settings" not in report:
        raise DataError(f"{path}: not a moub convert report (no settings or candidates)")
    if not report["candidates"]:
        raise DataError(f"{path}: the report has no evaluated candidates (--bins K runs no search)")
    return report


def write_point(model_or_path, data, report: Mapping | str | os.PathLike, point: str | None = None, *, labels=None,
                batch_axes: Mapping[str, int | None] | None = None, test=None, test_labels=None,
                layer_shares: bool = True) -> ConvertResult:
    """The file of the report's candidate named ``point`` (None: the report's own choice).

    ``model_or_path`` and ``data`` must be those the report's conversion used: the source's
    digest is checked, and the data decide the calibration and the measured quality.
    ``layer_shares``: measure each layer's share of the output error (``layer_errors.py``)."""
    started = time.perf_counter()
    label = "the report"
    if not isinstance(report, Mapping):
        label, report = str(report), read_report(report)
    settings = report["settings"]
    try:
        options = ConvertOptions.from_keywords({**settings, "layer_shares": layer_shares})
    except TypeError as exc:
        raise OptionError(f"{label}: settings this converter does not know ({exc})") from None
    name = point if point is not None else report["choice"]["name"]
    candidates = [Candidate.from_dict(row) for row in report["candidates"]]
    chosen = next((c for c in candidates if c.name == name), None)
    if chosen is None:
        front = ", ".join(row["name"] for row in report.get("front", [])[:6])
        raise OptionError(f"{label}: no candidate named {name!r} (the front: {front})")
    source = load_source(model_or_path)
    if source.sha256 != report["source"]["sha256"]:
        raise ModelError(f"{source.label}: not the model of {label} (sha256 {source.sha256[:12]}..., the report's "
                         f"{report['source']['sha256'][:12]}...)")
    pool = pool_weights(source.model, options.min_elements)
    kept_exact = set((report.get("kept_exact") or {}).get("paths", ()))
    widened = set((report.get("widened_to_int8") or {}).get("paths", ()))
    if widened:  # the search ran with these 4-bit weights given the int8 window (fallback.py)
        pool = replace(pool, four_bit=pool.four_bit - widened)
    sixteen_bit = frozenset((report.get("widened_to_int16") or {}).get("paths", ()))
    if sixteen_bit:  # and these tensors given the int16 window
        pool = replace(pool, sixteen_bit=sixteen_bit)
    if kept_exact:  # the search ran on the pool less the tensors kept exact (fallback.py)
        pool = pool.without([i for i, site in enumerate(pool.sites) if site.path in kept_exact], REASON_KEPT_EXACT)
    setup = _Setup.build(source, pool, data, labels, batch_axes, options)
    if setup.metric != report["metric"] or round(setup.q0, 6) != report["quality_original"]:
        raise DataError(f"{label}: the data give {setup.metric} {setup.q0:.6f}, the report's conversion "
                        f"{report['metric']} {report['quality_original']}: not the data it was converted with")
    mode = get_mode(options.mode)
    session = setup.session(source.model, options)
    try:
        mode.resume(session, report["search"])
    except (KeyError, ValueError) as exc:
        raise DataError(f"{label}: cannot rebuild its {options.mode} search ({exc})") from None
    front_rows = report.get("file_front")
    if front_rows is None:
        raise DataError(f"{label}: written before reports kept the file's front (file_front); convert again")
    writer = _Writer(source, pool, options, setup, mode, candidates, front_rows, session)
    moub_bytes, written = writer.write(chosen)
    front = [Candidate.from_dict(row) for row in report["front"]]
    result = writer.result(moub_bytes, written, front, dict(report["search"]), _Counter(None), started, test,
                           test_labels, batch_axes)
    result.report["point"] = {"name": name, "from_report": True}
    return result
