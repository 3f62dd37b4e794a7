"""ONNX weight plumbing shared by the lossy peers, so each compresses exactly the same tensors.

The PP-OCR models keep every weight in `Constant` nodes (no initializers at all); onnxruntime's
quantizer and most tools only look at initializers, so constants are lifted first (lossless).
The weight pool is every float32 initializer with at least MIN_ELEMENTS values, as in moub.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .. import config as C


def lift_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose main-graph `Constant` nodes holding a tensor are initializers instead."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = []
    for node in out.graph.node:
        attr = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and set(attr) == {"value"}:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr["value"].t)
            tensor.name = node.output[0]
            out.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def load_lifted(path: Path) -> onnx.ModelProto:
    return lift_constants(onnx.load(str(path)))


def pool_names(model: onnx.ModelProto) -> list[str]:
    """Initializers in the weight pool, in graph order."""
    return [t.name for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT and _numel(t) >= C.MIN_ELEMENTS]


def pool_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    names = set(pool_names(model))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names}


def strip(model: onnx.ModelProto, names: list[str]) -> bytes:
    """The model serialised with the named initializers' values removed (names, dims, dtype kept)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = set(names)
    for t in out.graph.initializer:
        if t.name in wanted:
            t.ClearField("raw_data")
            t.ClearField("float_data")
    return out.SerializeToString()


def fill(stripped: bytes, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Put decoded values back into a stripped model."""
    model = onnx.ModelProto()
    model.ParseFromString(stripped)
    for t in model.graph.initializer:
        if t.name in arrays:
            a = np.ascontiguousarray(arrays[t.name], dtype=np.float32).reshape(tuple(t.dims))
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
