"""Every TensorProto an ONNX model holds, wherever it sits, and the external-data check on them.

onnxruntime resolves an external-data reference in any tensor it reads: initializers, but also
sparse initializers, ``Constant.sparse_value`` and the tensor attributes of any op
(``ConstantOfShape.value``, ...), in subgraphs and functions too, relative to the working folder
(older releases also follow absolute and ``..`` paths). A check on initializers alone lets a
graph read local files, so the reader and the converter both walk every reachable tensor here:
what ``onnx.external_data_helper`` walks, plus the values and indices of sparse tensors, function
attribute defaults and training graphs. The walk uses an explicit stack, so no nesting depth the
protobuf parser accepts makes it recurse too deep.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .onnx_proto import DATA_LOCATION_EXTERNAL

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class ReachableTensor:
    """A tensor of the model and where it is, as a path like ``node:3/value`` or
    ``node:1/then_branch/sparse:S/values`` (the site-path grammar of :mod:`.sites`, extended)."""

    where: str
    tensor: onnx.TensorProto


def _sparse(sparse: onnx.SparseTensorProto, where: str) -> Iterator[ReachableTensor]:
    yield ReachableTensor(f"{where}/values", sparse.values)
    yield ReachableTensor(f"{where}/indices", sparse.indices)


def _attribute(attr: onnx.AttributeProto, where: str, graphs: list) -> Iterator[ReachableTensor]:
    """The tensors held by one attribute, whatever its declared type says (a hostile file may
    set ``t`` on an attribute typed INT); its subgraphs go on the stack ``graphs``."""
    if attr.HasField("t"):
        yield ReachableTensor(where, attr.t)
    for j, tensor in enumerate(attr.tensors):
        yield ReachableTensor(f"{where}[{j}]", tensor)
    if attr.HasField("sparse_tensor"):
        yield from _sparse(attr.sparse_tensor, where)
    for j, sparse in enumerate(attr.sparse_tensors):
        yield from _sparse(sparse, f"{where}[{j}]")
    if attr.HasField("g"):
        graphs.append((attr.g, f"{where}/"))
    for j, graph in enumerate(attr.graphs):
        graphs.append((graph, f"{where}[{j}]/"))


def _holds_tensors(attr: onnx.AttributeProto) -> bool:
    """Whether an attribute has a tensor or graph field set (most hold a number or a list:
    checking that first keeps the walk of a model of thousands of nodes under a millisecond)."""
    return (attr.HasField("t") or attr.HasField("g") or attr.HasField("sparse_tensor")
            or len(attr.tensors) > 0 or len(attr.graphs) > 0 or len(attr.sparse_tensors) > 0)


def _nodes(nodes, prefix: str, graphs: list) -> Iterator[ReachableTensor]:
    for i, node in enumerate(nodes):
        for attr in node.attribute:
            if _holds_tensors(attr):
                yield from _attribute(attr, f"{prefix}node:{i}/{attr.name}", graphs)


def iter_reachable_tensors(model: onnx.ModelProto) -> Iterator[ReachableTensor]:
    """Every TensorProto of ``model``: initializers and sparse initializers, every tensor and
    sparse-tensor attribute of every node, in the main graph, all subgraphs, model functions
    (with their attribute defaults) and training graphs."""
    graphs: list[tuple[onnx.GraphProto, str]] = [(model.graph, "")]
    for k, training in enumerate(model.training_info):
        graphs.append((training.initialization, f"training:{k}/initialization/"))
        graphs.append((training.algorithm, f"training:{k}/algorithm/"))
    for j, function in enumerate(model.functions):
        prefix = f"func:{j}/"
        for attr in function.attribute_proto:
            yield from _attribute(attr, f"{prefix}attr:{attr.name}", graphs)
        yield from _nodes(function.node, prefix, graphs)
    while graphs:
        graph, prefix = graphs.pop()
        for tensor in graph.initializer:
            yield ReachableTensor(f"{prefix}init:{tensor.name}", tensor)
        for sparse in graph.sparse_initializer:
            yield from _sparse(sparse, f"{prefix}sparse:{sparse.values.name}")
        yield from _nodes(graph.node, prefix, graphs)


def refers_to_external_data(tensor: onnx.TensorProto) -> bool:
    """Whether onnxruntime would look for this tensor's bytes in a file."""
    return tensor.data_location == DATA_LOCATION_EXTERNAL or len(tensor.external_data) > 0


def external_location(tensor: onnx.TensorProto) -> str:
    """The file an external-data reference names (empty if it names none)."""
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), "")


def first_external_reference(model: onnx.ModelProto) -> ReachableTensor | None:
    """The first tensor of ``model`` (in :func:`iter_reachable_tensors` order) that refers to
    external data, or None when the model is self-contained."""
    for item in iter_reachable_tensors(model):
        tensor = item.tensor
        if tensor.data_location == DATA_LOCATION_EXTERNAL or len(tensor.external_data) > 0:
            return item
    return None


def describe_external_reference(item: ReachableTensor) -> str:
    """How messages name it: ``tensor 'node:3/value' refers to external data ('secret.txt')``."""
    location = external_location(item.tensor)
    return f"tensor {item.where!r} refers to external data" + (f" ({location!r})" if location else "")
