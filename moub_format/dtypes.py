"""ONNX element types the container restores, and the float32 -> storage casts.

The converter computes quantized weights with :func:`cast_from_float32` and the
runtime decodes with the same function, which is what makes decode bit-exact.
Values are the ONNX ``TensorProto.DataType`` enum (kept as plain ints: this
package must not import onnx).
"""

from __future__ import annotations

import numpy as np

FLOAT = 1
UINT8 = 2
INT8 = 3
UINT16 = 4
INT16 = 5
INT32 = 6
INT64 = 7
BOOL = 9
FLOAT16 = 10
DOUBLE = 11
UINT32 = 12
UINT64 = 13
BFLOAT16 = 16

NAMES = {FLOAT: "float", UINT8: "uint8", INT8: "int8", UINT16: "uint16", INT16: "int16", INT32: "int32", INT64: "int64",
         BOOL: "bool", FLOAT16: "float16", DOUBLE: "double", UINT32: "uint32", UINT64: "uint64", BFLOAT16: "bfloat16"}

# Floating types whose weights may be quantized (pooled as float32).
FLOAT_DTYPES = frozenset({FLOAT, FLOAT16, BFLOAT16, DOUBLE})

# Integer types a HUFFMAN tensor may have (format 1.4): every value of theirs is exact in
# float32, so a codebook of float32 integers restores them bit for bit. Per type: the range.
INTEGER_RANGES: dict[int, tuple[int, int]] = {
    INT8: (-128, 127),
    UINT8: (0, 255),
    INT16: (-32768, 32767),
    UINT16: (0, 65535),
}

# Element types a HUFFMAN tensor may have.
CODEBOOK_DTYPES = FLOAT_DTYPES | frozenset(INTEGER_RANGES)

# Element types a raw pass-through tensor may carry, with their storage numpy dtype
# (little-endian, as ONNX raw_data). BFLOAT16 is stored as its uint16 bit pattern.
STORAGE_DTYPES: dict[int, np.dtype] = {
    FLOAT: np.dtype("<f4"),
    UINT8: np.dtype("u1"),
    INT8: np.dtype("i1"),
    UINT16: np.dtype("<u2"),
    INT16: np.dtype("<i2"),
    INT32: np.dtype("<i4"),
    INT64: np.dtype("<i8"),
    BOOL: np.dtype("?"),
    FLOAT16: np.dtype("<f2"),
    DOUBLE: np.dtype("<f8"),
    UINT32: np.dtype("<u4"),
    UINT64: np.dtype("<u8"),
    BFLOAT16: np.dtype("<u2"),
}


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even; NaN stays NaN) as uint16 bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def cast_from_float32(values: np.ndarray, onnx_dtype: int) -> np.ndarray:
    """Cast float32 values to the storage representation of ``onnx_dtype``."""
    values = np.asarray(values, dtype=np.float32)
    if onnx_dtype == FLOAT:
        return values
    if onnx_dtype == FLOAT16:
        return values.astype("<f2")
    if onnx_dtype == DOUBLE:
        return values.astype("<f8")
    if onnx_dtype == BFLOAT16:
        return float32_to_bfloat16_bits(values)
    if onnx_dtype in INTEGER_RANGES:  # values already checked integral and in range (the reader checks codebooks)
        return values.astype(STORAGE_DTYPES[onnx_dtype])
    raise ValueError(f"element type {onnx_dtype} is not a type a codebook can restore")


def storage_to_float32(values: np.ndarray, onnx_dtype: int) -> np.ndarray:
    """Inverse view for pooling: storage representation -> float32 (bf16 from bits)."""
    if onnx_dtype == BFLOAT16:
        return bfloat16_bits_to_float32(values)
    return np.asarray(values, dtype=np.float32)
