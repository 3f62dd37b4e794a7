"""RapidOrientation with fp16 weights: the zoo's model with half-precision weights.

No wheel found ships an ONNX model whose weights are stored in fp16 (the ones checked ship fp32 or
int8), so this row takes the rapid-orientation wheel's fp32 model through onnxconverter-common's
`convert_float_to_float16(keep_io_types=True)`, the tool users run to make fp16 models: every
float initializer becomes FLOAT16, with Cast nodes at the float32 input and output. The converted
file is the model of this row: its own outputs are the reference its candidates are scored against.
Inputs, split and criterion are those of `rapid_orientation` (the samples are shared).
"""
from __future__ import annotations

import os
from pathlib import Path

from .core import CACHE_ROOT, ZooUnavailable, package_version
from .rapid_orientation import RapidOrientation


class RapidOrientationFp16(RapidOrientation):
    name = "rapid_orientation_fp16"
    title = "RapidOrientation, fp16 weights (onnxconverter-common)"
    family = "vision CNN classifier, fp16 weights"
    inputs_made = RapidOrientation.inputs_made
    criterion = "top-1 agreement with the fp16 model on held-back crops"

    def path(self) -> Path:
        source = super().path()
        converter = package_version("onnxconverter-common")
        if converter == "not installed":
            raise ZooUnavailable("onnxconverter-common is not installed (benchmarks/zoo/requirements.txt)")
        out = CACHE_ROOT / f"{self.name}-{self.version()}-occ{converter}.onnx"
        if not out.is_file():
            import warnings

            import onnx
            from onnxconverter_common import float16

            with warnings.catch_warnings():  # it warns once per weight it rounds to fp16's smallest normal
                warnings.simplefilter("ignore")
                half = float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            onnx.save(half, str(tmp))
            os.replace(tmp, out)
        return out

    def version(self) -> str:
        return RapidOrientation.version(self)

    def cache_dir(self) -> Path:
        return RapidOrientation().cache_dir()  # the same crops as the fp32 row


MODEL = RapidOrientationFp16
