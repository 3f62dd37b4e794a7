"""moub converter: ONNX model -> compact .moub by multi-objective uniform binning (MO-UB).

    from moub_converters import convert
    result = convert("model.onnx", data="data.npz", max_drop=0.005)   # mode="adaptive"; or mode="paper"
    result.write("model.moub")

Needs the ``convert`` extra (pymoo, rich, matplotlib); torch only for TorchScript input.
"""

from .api import ConvertResult, convert
from .options import DEFAULT_MODE
from .errors import ConvertError, DataError, ModelError, OptionError, OutputError, ToleranceError

__all__ = ["convert", "DEFAULT_MODE", "ConvertResult", "ConvertError", "DataError", "ModelError", "OptionError", "OutputError", "ToleranceError"]


def __getattr__(name: str):
    if name == "__version__":  # the distribution's version, from its metadata (moub_format.version)
        from moub_format.version import distribution_version

        return distribution_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
