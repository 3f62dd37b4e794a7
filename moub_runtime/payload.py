"""Emptying and filling the data of an ONNX TensorProto in place (onnx's class or
:mod:`.onnx_proto`'s: the same fields)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .onnx_proto import DATA_LOCATION_EXTERNAL

if TYPE_CHECKING:
    from onnx import TensorProto

# Every field of TensorProto that can hold element data.
PAYLOAD_FIELDS = (
    "raw_data",
    "float_data",
    "int32_data",
    "string_data",
    "int64_data",
    "double_data",
    "uint64_data",
)


def has_payload(tensor: TensorProto) -> bool:
    """True if the tensor carries element data inline or points to external data."""
    if tensor.data_location == DATA_LOCATION_EXTERNAL or len(tensor.external_data):
        return True
    if tensor.HasField("raw_data"):
        return True
    return any(len(getattr(tensor, name)) for name in PAYLOAD_FIELDS[1:])


def clear_payload(tensor: TensorProto) -> None:
    """Remove the element data, keep name, dims, data type and doc string."""
    for name in PAYLOAD_FIELDS:
        tensor.ClearField(name)
    tensor.ClearField("external_data")
    tensor.ClearField("data_location")


def fill_payload(tensor: TensorProto, values: np.ndarray) -> None:
    """Set ``raw_data`` from values already in the storage dtype (little-endian)."""
    clear_payload(tensor)
    tensor.raw_data = np.ascontiguousarray(values).tobytes()


def element_count(tensor: TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    return count


IN_MEMORY_LOCATION = "moub-in-memory"


def mark_in_memory(tensor: TensorProto) -> None:
    """Turn a tensor into an external-data stub whose values onnxruntime gets
    from ``SessionOptions.add_external_initializers``; never resolved on disk."""
    clear_payload(tensor)
    tensor.data_location = DATA_LOCATION_EXTERNAL
    entry = tensor.external_data.add()
    entry.key = "location"
    entry.value = IN_MEMORY_LOCATION
