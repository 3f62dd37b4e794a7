"""Turn a model plus codebook assignments into .moub bytes.

The graph keeps every node, opset, function and metadata entry; only the
payloads of stored tensors leave it. Quantized sites become Huffman tensors;
other tensors with a raw payload of at least ``raw_min_bytes`` move to the
payload section byte for byte (zlib-packed when that saves space); everything
smaller stays inside the graph untouched.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from moub_format import constants as C
from moub_format import dtypes, writer
from moub_runtime.payload import clear_payload
from moub_runtime.sites import tensor_sites

RAW_MIN_BYTES = 4096
ZLIB_MIN_SAVING = 0.05  # pack a raw tensor only if zlib saves at least this fraction


@dataclass(frozen=True)
class TensorAssignment:
    """One quantized site: which codebook, and one index per element (C order)."""

    codebook: int
    indices: np.ndarray


def dequantize(codebook: np.ndarray, indices: np.ndarray, onnx_dtype: int) -> np.ndarray:
    """The exact storage values the runtime will decode (same function, same bits)."""
    return dtypes.cast_from_float32(np.asarray(codebook, dtype=np.float32)[indices], onnx_dtype)


def _raw_codec(data: bytes) -> int:
    if len(data) < RAW_MIN_BYTES:
        return C.CODEC_NONE
    packed = len(zlib.compress(data, writer.ZLIB_LEVEL))
    return C.CODEC_ZLIB if packed <= len(data) * (1 - ZLIB_MIN_SAVING) else C.CODEC_NONE


def container_specs(
    model: onnx.ModelProto,
    assignments: Mapping[str, TensorAssignment],
    raw_min_bytes: int = RAW_MIN_BYTES,
) -> tuple[bytes, list[writer.TensorSpec]]:
    """Strip stored payloads from a copy of ``model``; return (graph bytes, tensor specs)."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    sites = tensor_sites(stripped)
    missing = sorted(set(assignments) - set(sites))
    if missing:
        raise ValueError(f"assignment for unknown tensor site {missing[0]!r}")
    specs: list[writer.TensorSpec] = []
    for path, site in sites.items():
        tensor = site.tensor
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(f"tensor {tensor.name!r} still refers to external data; load the model with its data")
        dims = tuple(int(d) for d in tensor.dims)
        if path in assignments:
            assignment = assignments[path]
            specs.append(
                writer.HuffmanTensor(path, tensor.name, tensor.data_type, dims, np.asarray(assignment.indices), assignment.codebook)
            )
            clear_payload(tensor)
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= raw_min_bytes and tensor.data_type in dtypes.STORAGE_DTYPES:
            data = bytes(tensor.raw_data)
            specs.append(writer.RawTensor(path, tensor.name, tensor.data_type, dims, data, _raw_codec(data)))
            clear_payload(tensor)
    return stripped.SerializeToString(deterministic=True), specs


def encode_model(
    model: onnx.ModelProto,
    codebooks: Sequence[np.ndarray],
    assignments: Mapping[str, TensorAssignment],
    metadata: Mapping[str, str] | None = None,
    **build_options,
) -> bytes:
    """The complete .moub bytes for ``model`` with ``assignments`` quantized."""
    graph, specs = container_specs(model, assignments)
    return writer.build(graph, codebooks, specs, metadata or {}, **build_options)


def write_model(path: str | os.PathLike, *args, **kwargs) -> int:
    """:func:`encode_model`, written atomically to ``path``; returns the file size."""
    data = encode_model(*args, **kwargs)
    writer.write_atomic(path, data)
    return len(data)
