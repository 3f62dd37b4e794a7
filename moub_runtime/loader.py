"""A .moub file -> onnx.ModelProto or onnxruntime.InferenceSession.

The graph stored in the container is cross-checked against the tensors the
file provides before any tensor is decoded: every stored tensor must name an
existing site with the same element type and shape and no data of its own,
and every other site must carry its own data. External-data references are
refused: a .moub is self-contained.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from moub_format import DEFAULT_LIMITS, GraphError, MoubFile, ReaderLimits
from moub_format.dtypes import BFLOAT16

from .payload import element_count, fill_payload, has_payload, mark_in_memory
from .sites import TensorSite, is_main_graph_initializer, tensor_sites


def parse_graph(moub: MoubFile) -> onnx.ModelProto:
    """The embedded ModelProto, parsed after the byte-length cap and checksum."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(moub.graph_bytes())
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning variants
        raise GraphError(f"{moub.filename}: graph: embedded ONNX model does not parse ({exc})") from None
    return model


def match_sites(moub: MoubFile, model: onnx.ModelProto) -> dict[str, TensorSite]:
    """Check the graph against the stored tensors; return path -> site for stored ones."""
    sites = tensor_sites(model)
    for path, site in sites.items():
        tensor = site.tensor
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            raise GraphError(f"{moub.filename}: graph tensor {path!r} refers to external data; a .moub must be self-contained")
    matched: dict[str, TensorSite] = {}
    for info in moub.index.tensors:
        site = sites.get(info.path)
        if site is None:
            raise GraphError(f"{moub.filename}: tensor {info.path!r} has no matching tensor in the graph")
        tensor = site.tensor
        if tensor.data_type != info.dtype:
            raise GraphError(
                f"{moub.filename}: tensor {info.path!r}: element type {info.dtype} differs from the graph's {tensor.data_type}"
            )
        if tuple(tensor.dims) != info.dims:
            raise GraphError(f"{moub.filename}: tensor {info.path!r}: dims {list(info.dims)} differ from the graph's {list(tensor.dims)}")
        if has_payload(tensor):
            raise GraphError(f"{moub.filename}: tensor {info.path!r} is stored twice: the graph keeps its data too")
        matched[info.path] = site
    for path, site in sites.items():
        if path not in matched and not has_payload(site.tensor) and element_count(site.tensor) > 0:
            raise GraphError(f"{moub.filename}: graph tensor {path!r} has no data and the file does not provide it")
    return matched


def consumed_names(model: onnx.ModelProto) -> set[str]:
    """Every value name read by a node (any depth) or produced as a graph output."""
    names = {output.name for output in model.graph.output}
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            names.update(node.input)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)
    for function in model.functions:
        for node in function.node:
            names.update(node.input)
    return names


def _open(path: str | os.PathLike, limits: ReaderLimits) -> tuple[MoubFile, onnx.ModelProto, dict[str, TensorSite]]:
    moub = MoubFile(path, limits)
    try:
        model = parse_graph(moub)
        return moub, model, match_sites(moub, model)
    except BaseException:
        moub.close()
        raise


def decode_tensors(path: str | os.PathLike, limits: ReaderLimits = DEFAULT_LIMITS) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (site path, array in storage dtype) one tensor at a time."""
    moub, _, _ = _open(path, limits)
    with moub:
        for info, array in moub.iter_tensors():
            yield info.path, array


def load(path: str | os.PathLike, limits: ReaderLimits = DEFAULT_LIMITS) -> onnx.ModelProto:
    """Decode a .moub into an onnx.ModelProto with all weights inline (like onnx.load)."""
    moub, model, sites = _open(path, limits)
    with moub:
        for info, array in moub.iter_tensors():
            fill_payload(sites[info.path].tensor, array)
    return model


class InferenceSession(onnxruntime.InferenceSession):
    """An onnxruntime session straight from a .moub file.

    Main-graph weights reach onnxruntime as OrtValues over the decoded numpy
    arrays (``SessionOptions.add_external_initializers``, the graph holding
    external-data stubs in their place): no serialized copy of the weights is
    ever made. (``add_initializer`` over a stub with no data fails validation
    in onnxruntime for tensors above 127 bytes.) Weights inside subgraphs and Constant nodes are put
    back into the graph, which onnxruntime cannot be handed otherwise.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        sess_options: onnxruntime.SessionOptions | None = None,
        providers: list | None = None,
        limits: ReaderLimits = DEFAULT_LIMITS,
        **kwargs,
    ) -> None:
        options = sess_options if sess_options is not None else onnxruntime.SessionOptions()
        names: list[str] = []
        self._moub_weights: list[onnxruntime.OrtValue] = []
        self._moub_arrays: list[np.ndarray] = []
        moub, model, sites = _open(path, limits)
        consumed = consumed_names(model)
        with moub:
            for info, array in moub.iter_tensors():
                tensor = sites[info.path].tensor
                # onnxruntime drops unused initializers before replacing them, so those stay inline.
                if is_main_graph_initializer(info.path) and info.dtype != BFLOAT16 and tensor.name in consumed:
                    array = np.ascontiguousarray(array)
                    self._moub_arrays.append(array)  # the OrtValue borrows this memory
                    self._moub_weights.append(onnxruntime.OrtValue.ortvalue_from_numpy(array))
                    names.append(tensor.name)
                    mark_in_memory(tensor)
                else:
                    fill_payload(tensor, array)
        if names:
            options.add_external_initializers(names, self._moub_weights)
        graph = model.SerializeToString()
        del model
        super().__init__(graph, sess_options=options, providers=providers or ["CPUExecutionProvider"], **kwargs)
        self.moub_path = Path(path)


def save_onnx(model: onnx.ModelProto, out_path: str | os.PathLike, external_threshold: int = 2**31 - 2**26) -> None:
    """Save atomically; models too big for one protobuf get an external-data file beside them."""
    from moub_format.writer import write_atomic

    out = Path(out_path)
    size = model.ByteSize()
    if size < external_threshold:
        write_atomic(out, model.SerializeToString())
        return
    data_name = out.name + ".data"
    tmp_model = out.with_name(f".{out.name}.tmp")
    onnx.save_model(model, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    os.replace(tmp_model, out)
