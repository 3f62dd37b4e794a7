"""Load .moub files on the device: decode to ONNX and run with onnxruntime.

Imports numpy, flatbuffers, bitarray and onnxruntime (with the protobuf runtime it depends on); onnx
only where an onnx.ModelProto is asked for (:func:`load`); never torch,
pymoo or the converter (a test checks it).
"""

from .loader import InferenceSession, decode_tensors, decode_to_onnx, load, save_onnx
from .sites import iter_tensor_sites, tensor_sites

__all__ = ["InferenceSession", "decode_tensors", "decode_to_onnx", "load", "save_onnx", "iter_tensor_sites", "tensor_sites"]


def __getattr__(name: str):
    if name == "__version__":  # read from the package metadata on first use (not at import: see moub_format.version)
        from moub_format.version import distribution_version

        return distribution_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
