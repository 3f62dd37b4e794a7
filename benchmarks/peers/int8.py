"""onnxruntime's `quantize_dynamic`: int8 weights, activations quantized at run time.

Two settings: one scale per tensor (the default) and, only where that fails the 99% rule, one per
output channel (the same int8 weights plus more scales: a larger file). QInt8 weights are
tried first; where onnxruntime's CPU kernels refuse them (ConvInteger wants uint8), QUInt8.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import onnx

from . import Candidate, Context, Unavailable
from .weights import load_lifted

METHOD = "onnxruntime int8 dynamic"


def _quantize(src: Path, dst: Path, per_channel: bool, weight_type) -> float:
    from onnxruntime.quantization import quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice, once per call
    try:
        t = time.perf_counter()
        quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=weight_type)
        return time.perf_counter() - t
    finally:
        root.setLevel(level)


def run(ctx: Context) -> list[Candidate]:
    try:
        from onnxruntime.quantization import QuantType
    except ImportError as exc:
        raise Unavailable(f"onnxruntime.quantization cannot be imported: {exc}") from exc
    from ..fidelity import session

    t = time.perf_counter()
    lifted = ctx.work / "lifted.onnx"
    onnx.save(load_lifted(ctx.onnx_path), str(lifted))
    lift_s = time.perf_counter() - t
    out: list[Candidate] = []
    errors: list[str] = []
    for per_channel in (False, True):
        for wt in (QuantType.QInt8, QuantType.QUInt8):
            label = f"{'per-channel' if per_channel else 'per-tensor'} {wt.name}"
            dst = ctx.work / f"int8_{'pc' if per_channel else 'pt'}_{wt.name}.onnx"
            try:
                enc = _quantize(lifted, dst, per_channel, wt)
                session(dst)  # onnxruntime must be able to run what it produced
            except Exception as exc:  # noqa: BLE001 - the reason goes into the table
                errors.append(f"{label}: {str(exc).splitlines()[0][:160]}")
                continue
            cand = Candidate(label, dst, dst.stat().st_size, lift_s + enc, dst)
            cand.fidelity = ctx.evaluate(dst)
            out.append(cand)
            break
        if out and ctx.passes(out[-1].fidelity):
            break  # per-channel only adds scales: a larger file cannot be the headline
    if not out:
        raise Unavailable("; ".join(errors))
    return out


def load_session(path: Path):
    from ..fidelity import session

    return session(path)
