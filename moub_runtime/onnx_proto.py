"""The ONNX protobuf messages, without the onnx package.

A device loading a .moub needs to parse, check and edit the embedded graph, then hand it to
onnxruntime as bytes: protobuf message classes do all of that. The onnx package would give them
too, but importing it (its operator schemas, helpers and ml_dtypes) costs several times the
import of onnxruntime itself, on every process start. These classes are built from the same
descriptor (onnx-ml.proto, embedded in :mod:`.onnx_descriptor`) in a descriptor pool of their
own, so they parse and serialize exactly as ``onnx.ModelProto`` does (unknown fields kept) and
never collide with the onnx package's classes when a program imports both. The protobuf runtime
comes with onnxruntime (it depends on it).

Code that only reads or edits messages works on these classes and on onnx's alike; the enum
values it compares with are declared here once.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool, message_factory

from .onnx_descriptor import SERIALIZED

_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(SERIALIZED)


def _message(name: str) -> type:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"onnx.{name}"))


ModelProto = _message("ModelProto")
GraphProto = _message("GraphProto")
NodeProto = _message("NodeProto")
TensorProto = _message("TensorProto")
AttributeProto = _message("AttributeProto")
ValueInfoProto = _message("ValueInfoProto")
OperatorSetIdProto = _message("OperatorSetIdProto")

# Enum values of onnx-ml.proto (the same numbers in every onnx release).
DATA_LOCATION_EXTERNAL = TensorProto.EXTERNAL
ATTRIBUTE_GRAPH = AttributeProto.GRAPH
ATTRIBUTE_GRAPHS = AttributeProto.GRAPHS
ATTRIBUTE_TENSOR = AttributeProto.TENSOR
ATTRIBUTE_INT = AttributeProto.INT
ATTRIBUTE_INTS = AttributeProto.INTS
