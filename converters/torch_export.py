"""TorchScript (.pt) -> ONNX, so ``moub convert model.pt --input-shape 1,3,32,32`` works.

torch is imported here only, and only when a TorchScript file is converted.
Uses torch's TorchScript-based ONNX exporter (``dynamo=False``): the newer
torch.export-based exporter does not take ``ScriptModule``s. The first axis of
every input and output is exported as dynamic (samples). Inputs are named
``input`` (one) or ``input0``, ``input1``, ... and outputs ``output``/``output0``...,
which are the names DATA.npz must use. Loading a TorchScript file runs its
TorchScript code: convert only files you trust.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx

from .errors import ModelError, OptionError

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
OPSET = 17


def is_torchscript_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in TORCHSCRIPT_SUFFIXES


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,32,32' -> (1, 3, 32, 32); every dimension a positive integer."""
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise OptionError(f"--input-shape {text!r}: want positive integers separated by commas, e.g. 1,3,32,32") from None
    if not dims or any(d <= 0 for d in dims):
        raise OptionError(f"--input-shape {text!r}: want positive integers separated by commas, e.g. 1,3,32,32")
    return dims


def input_names(count: int) -> list[str]:
    return ["input"] if count == 1 else [f"input{i}" for i in range(count)]


def export(path: str | os.PathLike, input_shapes: Sequence[Sequence[int]], opset: int = OPSET) -> onnx.ModelProto:
    """Load a TorchScript file and export it to an ONNX ModelProto (float32 example inputs)."""
    if not input_shapes:
        raise OptionError(f"{path}: a TorchScript model needs --input-shape (for example 1,3,32,32)")
    try:
        import torch
    except ImportError:
        raise ModelError(f"{path}: TorchScript input needs torch; install it with: pip install 'moub[torch]'") from None
    if not Path(path).is_file():
        raise ModelError(f"{path}: no such file")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # RuntimeError for anything that is not a TorchScript archive
        raise ModelError(f"{path}: not a TorchScript file torch.jit.load can read ({' '.join(str(exc).split())[:200]})") from None
    module.eval()
    examples = tuple(torch.zeros(tuple(shape), dtype=torch.float32) for shape in input_shapes)
    names = input_names(len(examples))
    with torch.no_grad():
        try:
            probe = module(*examples)
        except Exception as exc:
            raise ModelError(f"{path}: the model does not run on inputs of shape {[list(s) for s in input_shapes]} "
                             f"({' '.join(str(exc).split())[:200]})") from None
    n_out = len(probe) if isinstance(probe, (tuple, list)) else 1
    outputs = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, examples, buffer, input_names=names, output_names=outputs,
                              dynamic_axes={n: {0: "batch"} for n in names + outputs}, opset_version=opset, dynamo=False)
        except Exception as exc:
            raise ModelError(f"{path}: torch cannot export this model to ONNX ({' '.join(str(exc).split())[:200]})") from None
    model = onnx.ModelProto()
    model.ParseFromString(buffer.getvalue())
    return model
