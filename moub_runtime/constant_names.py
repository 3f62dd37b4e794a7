"""Constant tensors named like their node's output: the name stored once, not twice.

Exporters such as Paddle2ONNX give every ``Constant`` node's tensor the name of
the node's output, so a graph of hundreds of weights carries each name twice
(for a small classifier of a few hundred Constants, over a tenth of its compressed graph).
A writer may leave those tensor names empty when no Constant tensor of the graph
is unnamed to begin with, and set FEATURE_CONSTANT_NAMES; a reader then gives
every unnamed Constant tensor its node's first output, which restores the graph
exactly. The names play no part in matching stored tensors to sites (paths do).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moub_format import GraphError

from .sites import KIND_CONSTANT, TensorSite, iter_tensor_sites

if TYPE_CHECKING:
    import onnx


def _constants(model: onnx.ModelProto) -> list[TensorSite]:
    return [site for site in iter_tensor_sites(model) if site.kind == KIND_CONSTANT]


def elide_constant_names(model: onnx.ModelProto) -> bool:
    """Clear, in place, each Constant tensor name equal to its node's first output.

    Returns whether the graph now needs FEATURE_CONSTANT_NAMES: False (and nothing
    changed) when some Constant tensor has no name already, which a reader could
    not tell from a cleared one, or when no name equals its output."""
    constants = _constants(model)
    if any(not site.tensor.name for site in constants):
        return False
    elided = False
    for site in constants:
        if site.node.output and site.tensor.name == site.node.output[0]:
            site.tensor.ClearField("name")
            elided = True
    return elided


def restore_constant_names(model: onnx.ModelProto, filename: str) -> None:
    """Give every unnamed Constant tensor its node's first output (in place)."""
    for site in _constants(model):
        if site.tensor.name:
            continue
        if not site.node.output or not site.node.output[0]:
            raise GraphError(f"{filename}: graph: Constant {site.path!r} has no output to take its tensor's name from")
        site.tensor.name = site.node.output[0]
