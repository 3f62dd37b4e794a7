"""ONNX weight plumbing shared by the lossy peers, so each compresses exactly the same tensors.

The PP-OCR models keep every weight in `Constant` nodes (no initializers at all), and recurrent models
such as silero-vad keep theirs in `Constant` nodes inside `If` branches; onnxruntime's quantizer and
most tools only look at the main graph's initializers, so constants are lifted there first (lossless:
a subgraph reads outer-scope names). The weight pool is every float32 or float16 initializer with at
least MIN_ELEMENTS values, as in moub; float16 values are coded as float32 and stored back as float16.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .. import config as C


POOLED_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def lift_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose `Constant` nodes holding a tensor, in the main graph or any subgraph, are
    main-graph initializers instead."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _lift(out.graph, out.graph)
    return out


def _lift(graph: onnx.GraphProto, main: onnx.GraphProto) -> None:
    keep = []
    for node in graph.node:
        attr = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and set(attr) == {"value"}:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr["value"].t)
            tensor.name = node.output[0]
            main.initializer.append(tensor)
            continue
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _lift(sub, main)
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def load_lifted(path: Path) -> onnx.ModelProto:
    return lift_constants(onnx.load(str(path)))


def pool_names(model: onnx.ModelProto) -> list[str]:
    """Initializers in the weight pool, in graph order."""
    return [t.name for t in model.graph.initializer
            if t.data_type in POOLED_TYPES and _numel(t) >= C.MIN_ELEMENTS]


def pool_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The pool's values as float32 (float16 ones widened exactly)."""
    names = set(pool_names(model))
    return {t.name: numpy_helper.to_array(t).astype(np.float32)
            for t in model.graph.initializer if t.name in names}


def strip(model: onnx.ModelProto, names: list[str]) -> bytes:
    """The model serialised with the named initializers' values removed (names, dims, dtype kept)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = set(names)
    for t in out.graph.initializer:
        if t.name in wanted:
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.ClearField("int32_data")
    return out.SerializeToString()


def fill(stripped: bytes, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Put decoded values back into a stripped model."""
    model = onnx.ModelProto()
    model.ParseFromString(stripped)
    for t in model.graph.initializer:
        if t.name in arrays:
            dtype = np.float16 if t.data_type == onnx.TensorProto.FLOAT16 else np.float32
            a = np.ascontiguousarray(arrays[t.name], dtype=dtype).reshape(tuple(t.dims))
            t.raw_data = a.tobytes()
    return model


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def pack_graph(graph: bytes) -> bytes:
    """The stripped graph as the k-means and NNCodec files store it: zstd, length-prefixed.

    moub's container deflates its graph too; giving the peers the same lossless treatment of
    everything that is not a pooled weight keeps the comparison about the weights.
    """
    import struct

    import zstandard

    packed = zstandard.ZstdCompressor(level=C.ZSTD_LEVEL).compress(graph)
    return struct.pack("<I", len(packed)) + packed


def unpack_graph(blob: bytes, pos: int) -> tuple[bytes, int]:
    """(graph bytes, position after it) from a file written with :func:`pack_graph`."""
    import struct

    import zstandard

    (n,) = struct.unpack_from("<I", blob, pos)
    return zstandard.ZstdDecompressor().decompress(blob[pos + 4:pos + 4 + n]), pos + 4 + n
