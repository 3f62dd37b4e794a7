"""What a .moub holds, and whether it is intact: the library behind
``moub inspect`` and ``moub verify``."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

from moub_format import DEFAULT_LIMITS, MoubFile, MoubFormatError, ReaderLimits
from moub_format import constants as C
from moub_format import dtypes

from .loader import match_sites, parse_graph


@dataclass
class TensorSummary:
    path: str
    name: str
    dtype: int
    dims: list[int]
    encoding: str
    elements: int
    stored_bytes: int
    bits_per_weight: float
    codebook: int | None


@dataclass
class Summary:
    file: str
    file_bytes: int
    format_version: str
    producer: str
    decoded_bytes: int
    ratio: float
    quantized_weights: int
    quantized_bytes: int
    bits_per_weight: float
    codebooks: list[dict]
    tensors: list[TensorSummary]
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(path: str | os.PathLike, limits: ReaderLimits = DEFAULT_LIMITS) -> Summary:
    """Read the index (no decoding) and summarise it."""
    with MoubFile(path, limits) as moub:
        index = moub.index
        tensors = []
        for t in index.tensors:
            huff = t.encoding == C.ENCODING_HUFFMAN
            tensors.append(
                TensorSummary(
                    path=t.path,
                    name=t.name,
                    dtype=t.dtype,
                    dims=list(t.dims),
                    encoding=C.ENCODINGS[t.encoding],
                    elements=t.n_elements,
                    stored_bytes=t.data.length,
                    bits_per_weight=round(8 * t.data.length / t.n_elements, 4) if t.n_elements else 0.0,
                    codebook=t.codebook if huff else None,
                )
            )
        quantized = [t for t in index.tensors if t.encoding == C.ENCODING_HUFFMAN]
        q_weights = sum(t.n_elements for t in quantized)
        # Stored indices, their chunk_bits entries in the index, codebooks and code-length tables.
        q_bytes = sum(t.data.length + 8 * len(t.chunk_bits) for t in quantized)
        q_bytes += sum(cb.size * 4 for cb in index.codebooks) + sum(tb.size for tb in index.tables)
        decoded = index.decoded_bytes + index.graph.decoded_length
        codebooks = [
            {
                "entries": int(cb.size),
                "min": float(cb.min()),
                "max": float(cb.max()),
                "longest_code": int(index.tables[i].max()) if i < len(index.tables) else None,
            }
            for i, cb in enumerate(index.codebooks)
        ]
        return Summary(
            file=str(path),
            file_bytes=index.file_size,
            format_version=f"{index.format_major}.{index.format_minor}",
            producer=index.producer,
            decoded_bytes=decoded,
            ratio=round(decoded / index.file_size, 4),
            quantized_weights=q_weights,
            quantized_bytes=q_bytes,
            bits_per_weight=round(8 * q_bytes / q_weights, 4) if q_weights else 0.0,
            codebooks=codebooks,
            tensors=tensors,
            metadata=dict(index.metadata),
        )


def verify_file(path: str | os.PathLike, limits: ReaderLimits = DEFAULT_LIMITS) -> list[str]:
    """Check structure, every checksum, the payload digest, the graph and every decode.

    Structural failures raise (nothing else can be trusted after them); per-tensor
    problems are collected so that all of them are reported. Empty list = intact.
    """
    problems: list[str] = []
    with MoubFile(path, limits) as moub:
        try:
            moub.verify_payload_digest()
        except MoubFormatError as exc:
            problems.append(str(exc))
        try:
            model = parse_graph(moub)
            match_sites(moub, model)
        except MoubFormatError as exc:
            problems.append(str(exc))
        for tensor in moub.index.tensors:
            try:
                values = moub.decode_tensor(tensor)
                if tensor.dtype in dtypes.FLOAT_DTYPES and tensor.encoding == C.ENCODING_HUFFMAN:
                    as_float = dtypes.storage_to_float32(values, tensor.dtype)
                    if not np.isfinite(as_float).all():
                        problems.append(f"{moub.filename}: tensor {tensor.path!r}: decodes to non-finite values")
            except MoubFormatError as exc:
                problems.append(str(exc))
    return problems
