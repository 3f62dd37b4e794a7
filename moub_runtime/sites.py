"""Where tensors live in an ONNX model, named by stable paths.

The converter and the runtime walk a model in the same canonical order and
name every tensor *site* (an initializer, or the ``value`` of a ``Constant``
node, in the main graph, in If/Loop/Scan subgraphs or in functions) by a path.
The container refers to tensors by that path, so names shadowed in subgraphs
or duplicated across functions never collide.

Path grammar (components joined by ``/``)::

    init:NAME                     initializer of the main graph
    node:I/ATTR/init:NAME         initializer of the subgraph in attribute ATTR of node I
    node:I/ATTR[J]/...            J-th graph of a GRAPHS attribute
    node:I/value                  the tensor of Constant node I
    func:J/node:I/value           Constant node I of model function J
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .onnx_proto import ATTRIBUTE_GRAPH, ATTRIBUTE_GRAPHS, ATTRIBUTE_TENSOR

if TYPE_CHECKING:
    import onnx

KIND_INITIALIZER = "initializer"
KIND_CONSTANT = "constant"


@dataclass(frozen=True)
class TensorSite:
    """One tensor inside a model and the path that names it."""

    path: str
    tensor: onnx.TensorProto
    kind: str
    node: onnx.NodeProto | None = None   # the Constant node of a KIND_CONSTANT site


def _walk_nodes(nodes, prefix: str) -> Iterator[TensorSite]:
    for index, node in enumerate(nodes):
        node_prefix = f"{prefix}node:{index}"
        for attr in node.attribute:
            if attr.type == ATTRIBUTE_TENSOR and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                yield TensorSite(f"{node_prefix}/{attr.name}", attr.t, KIND_CONSTANT, node)
            elif attr.type == ATTRIBUTE_GRAPH:
                yield from _walk_graph(attr.g, f"{node_prefix}/{attr.name}/")
            elif attr.type == ATTRIBUTE_GRAPHS:
                for j, graph in enumerate(attr.graphs):
                    yield from _walk_graph(graph, f"{node_prefix}/{attr.name}[{j}]/")


def _walk_graph(graph: onnx.GraphProto, prefix: str) -> Iterator[TensorSite]:
    for tensor in graph.initializer:
        yield TensorSite(f"{prefix}init:{tensor.name}", tensor, KIND_INITIALIZER)
    yield from _walk_nodes(graph.node, prefix)


def iter_tensor_sites(model: onnx.ModelProto) -> Iterator[TensorSite]:
    """Every tensor site of ``model`` in canonical order (graph, then functions)."""
    yield from _walk_graph(model.graph, "")
    for j, function in enumerate(model.functions):
        yield from _walk_nodes(function.node, f"func:{j}/")


def tensor_sites(model: onnx.ModelProto) -> dict[str, TensorSite]:
    """Map path -> site. Paths are unique by construction except for duplicated
    initializer names inside one graph, which ONNX forbids; the first wins."""
    sites: dict[str, TensorSite] = {}
    for site in iter_tensor_sites(model):
        sites.setdefault(site.path, site)
    return sites


def is_main_graph_initializer(path: str) -> bool:
    """True for initializers onnxruntime can take via ``SessionOptions.add_initializer``."""
    return path.startswith("init:")


def is_main_graph_site(path: str) -> bool:
    """True for a tensor that defines a value of the main graph: one of its initializers, or
    the tensor of one of its nodes' attributes (a ``Constant``'s), not one inside a subgraph or function."""
    return is_main_graph_initializer(path) or (path.startswith("node:") and path.count("/") == 1)
