"""moub converter: ONNX model -> compact .moub by multi-objective uniform binning (MO-UB).

    from moub_converters import convert
    result = convert("model.onnx", data="data.npz", max_drop=0.005)
    result.write("model.moub")

Needs the ``convert`` extra (pymoo, rich, matplotlib); torch only for TorchScript input.
"""

from .api import ConvertResult, convert
from .errors import ConvertError, DataError, ModelError, OptionError, OutputError, ToleranceError

__all__ = ["convert", "ConvertResult", "ConvertError", "DataError", "ModelError", "OptionError", "OutputError", "ToleranceError"]
