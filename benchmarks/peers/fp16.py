"""fp16 storage of the weights, cast back to fp32 in the graph so every op still computes in fp32.

A tensor whose finite values exceed fp16's range (|x| > 65504), or that holds non-finite values,
stays fp32: casting it would turn weights into inf and break the model.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import config as C
from . import Candidate, Context
from .weights import load_lifted, pool_names

METHOD = "fp16 weights (range-checked)"


def to_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, int]:
    """Returns the fp16 model, tensors converted and tensors kept fp32 for range."""
    names = set(pool_names(model)) - {i.name for i in model.graph.input}
    casts, converted, kept = [], 0, 0
    for t in model.graph.initializer:
        if t.name not in names:
            continue
        a = numpy_helper.to_array(t)
        if not np.all(np.isfinite(a)) or float(np.max(np.abs(a))) > C.FP16_MAX:
            kept += 1
            continue
        half = numpy_helper.from_array(a.astype(np.float16), t.name + "__fp16")
        original = t.name
        t.CopyFrom(half)
        casts.append(helper.make_node("Cast", [half.name], [original], to=onnx.TensorProto.FLOAT,
                                      name=original + "__cast"))
        converted += 1
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(casts + nodes)
    return model, converted, kept


def run(ctx: Context) -> list[Candidate]:
    t = time.perf_counter()
    model, converted, kept = to_fp16(load_lifted(ctx.onnx_path))
    data = model.SerializeToString()
    encode_s = time.perf_counter() - t
    out = ctx.work / "model_fp16.onnx"
    out.write_bytes(data)
    cand = Candidate("Cast to fp32 at load", out, len(data), encode_s, out,
                     extra={"note": f"{converted} tensors fp16, {kept} kept fp32 for range"})
    cand.fidelity = ctx.evaluate(out)
    return [cand]


def load_session(path: Path):
    from ..fidelity import session

    return session(path)
