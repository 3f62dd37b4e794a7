"""Lossless coding of a model's integer tensors (format 1.4).

An already-quantized model keeps its weights as int8 / uint8 (behind DequantizeLinear,
MatMulInteger, ConvInteger, DynamicQuantizeLSTM, or a Cast and a Mul). Those values are
the model: changing one changes its outputs. So they are never searched; each becomes a
Huffman tensor of its own element type whose codebook is the grid of its integers
(``min .. max``, exact in float32) with a code table of its own, and decodes bit for bit.
A tensor stays raw (the writer then picks its byte codec) when its Huffman stream would
not be smaller than zlib or xz of its bytes: data with more structure than its symbol
frequencies (repeats, runs) keeps the codec that finds it.
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from moub_format import constants as FC
from moub_format import dtypes, huffman, writer
from moub_runtime.payload import element_count, has_payload
from moub_runtime.sites import iter_tensor_sites

from .encode import TensorAssignment

CODING_INTEGER = "lossless integer"
CODING_RAW = "kept raw"
CHUNK_ENTRY_BYTES = 8  # a chunk_bits entry per chunk of a Huffman tensor
MIN_BYTES = 1024       # smaller integer tensors stay inside the graph (a tensor entry costs ~150 index bytes)


@dataclass(frozen=True)
class IntegerTensor:
    """One integer site coded losslessly: its grid codebook and one index per element."""

    path: str
    codebook: writer.GridCodebook
    indices: np.ndarray
    huffman_bytes: int   # estimated stream + chunk table + code lengths
    raw_bytes: int       # the smaller of zlib level 9 and xz preset 9e of its raw bytes, the alternative


@dataclass
class IntegerCoding:
    """The integer sites of a model and how each is stored."""

    tensors: list[IntegerTensor] = field(default_factory=list)
    kept_raw: dict[str, str] = field(default_factory=dict)   # path -> why not Huffman-coded
    kept_elements: int = 0                                   # their elements

    @property
    def all_elements(self) -> int:
        """Elements of every integer weight, Huffman-coded or kept raw."""
        return self.n_elements + self.kept_elements

    @property
    def n_elements(self) -> int:
        return sum(t.indices.size for t in self.tensors)

    def extend(self, codebooks, assignments: Mapping[str, TensorAssignment]) -> tuple[list, dict[str, TensorAssignment]]:
        """``codebooks`` and ``assignments`` of the float weights with the integer tensors
        appended (each with a grid codebook of its own, so the writer's shared table of
        that codebook is the tensor's own table)."""
        codebooks = list(codebooks)
        merged = dict(assignments)
        for t in self.tensors:
            merged[t.path] = TensorAssignment(len(codebooks), t.indices)
            codebooks.append(t.codebook)
        return codebooks, merged

    def summary(self) -> dict:
        return {
            "huffman_tensors": len(self.tensors),
            "huffman_elements": self.n_elements,
            "estimated_huffman_bytes": sum(t.huffman_bytes for t in self.tensors),
            "kept_raw": dict(sorted(self.kept_raw.items())),
        }


def _huffman_bytes(counts: np.ndarray, chunk_elements: int) -> int:
    """The stream, its chunk table and its code lengths (packed when that is smaller), as the writer stores them."""
    lengths = writer.own_table(counts)
    chunks = -(-int(counts.sum()) // chunk_elements)
    packed = huffman.packed_table(lengths)
    table = lengths.size if packed is None else min(lengths.size, len(packed) + FC.PACKED_TABLE_OVERHEAD)
    return -(-int((counts * lengths).sum()) // 8) + CHUNK_ENTRY_BYTES * chunks + table


def code_integer_tensor(path: str, tensor: onnx.TensorProto) -> IntegerTensor:
    """The lossless coding of one integer tensor: grid ``min .. max``, indices ``value - min``."""
    values = numpy_helper.to_array(tensor).reshape(-1)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    indices = (values.astype(np.int32) - low).astype(np.uint16)
    counts = np.bincount(indices, minlength=high - low + 1)
    raw = np.ascontiguousarray(values.astype(dtypes.STORAGE_DTYPES[tensor.data_type])).tobytes()
    return IntegerTensor(path, writer.GridCodebook(low, high - low + 1), indices,
                         _huffman_bytes(counts, FC.DEFAULT_CHUNK_ELEMENTS), _raw_bytes(raw))


def _raw_bytes(raw: bytes) -> int:
    """What the writer's smallest raw codec stores, estimated with one xz setting."""
    xz = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE,
                       filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
                                 "dict_size": writer.lzma_dict_size(len(raw))}])
    return min(len(raw), len(zlib.compress(raw, writer.ZLIB_LEVEL)), len(xz))


def integer_coding(model: onnx.ModelProto, min_elements: int = 1024) -> IntegerCoding:
    """Every 8- and 16-bit integer tensor of ``model`` with at least ``min_elements``
    elements and MIN_BYTES bytes (smaller ones stay inside the graph, whose codec packs
    them with it): Huffman-coded when that is smaller than zlib and xz of its bytes, else kept raw."""
    coding = IntegerCoding()
    for site in iter_tensor_sites(model):
        tensor = site.tensor
        if tensor.data_type not in dtypes.INTEGER_RANGES or not has_payload(tensor):
            continue
        itemsize = dtypes.STORAGE_DTYPES[tensor.data_type].itemsize
        if element_count(tensor) < max(1, min_elements, -(-MIN_BYTES // itemsize)):
            continue
        coded = code_integer_tensor(site.path, tensor)
        if coded.huffman_bytes < coded.raw_bytes:
            coding.tensors.append(coded)
        else:
            coding.kept_elements += coded.indices.size
            coding.kept_raw[site.path] = f"Huffman ~{coded.huffman_bytes} bytes is not below zlib/xz's {coded.raw_bytes}"
    return coding


__all__ = ["CODING_INTEGER", "CODING_RAW", "IntegerCoding", "IntegerTensor", "code_integer_tensor", "integer_coding"]
