"""The one validation path: every check a .moub passes before and while it is decoded.

``load``, ``InferenceSession``, ``decode_tensors``, ``moub decode`` and ``moub verify`` all
open a file with :func:`open_checked` and decode it with :meth:`CheckedFile.decoded`, so they
accept exactly the same files. Before any tensor is decoded: the index and its memory plan
(:class:`moub_format.MoubFile`), the graph (parsed within the budget, no tensor anywhere
referring to external data, every name defined once per graph, no negative dims), and the
graph against the stored tensors and pack members: every stored tensor names an existing site
with the same element type and shape and no data of its own, every pack member a float site of
its element count, no site is provided twice, every other site carries its own data, and no
weight decodes to infinity in its site's element type. While decoding: every blob's checksum
(before a raw tensor's array exists), every Huffman stream exactly, and the whole-payload
digest before the last result is handed out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from moub_format import DEFAULT_LIMITS, GraphError, LimitError, MoubFile, ReaderLimits
from moub_format import dtypes
from moub_format.constants import FEATURE_CONSTANT_NAMES
from moub_format.index import check_member_ranges
from moub_format.reader import DECODE_BATCH_ELEMENTS, Source

from .constant_names import restore_constant_names
from .onnx_proto import ModelProto
from .payload import element_count, has_payload
from .sites import TensorSite, iter_tensor_sites
from .tensor_walk import describe_external_reference, first_external_reference

if TYPE_CHECKING:
    import onnx


def parse_graph(moub: MoubFile, message: type = ModelProto) -> onnx.ModelProto:
    """The embedded ModelProto, parsed after the byte-length cap and checksum (its memory is
    in the file's plan), refused if any tensor in it (initializer, sparse tensor or
    attribute, at any depth) refers to external data, with Constant tensor names restored
    where the file left them out (format 1.3). ``message``: the class to parse into,
    :mod:`.onnx_proto`'s (no onnx import) or ``onnx.ModelProto`` (same schema, same result)."""
    data = moub.graph_bytes()  # checksum, bounded inflate: MoubFormatErrors of their own
    model = message()
    try:
        model.ParseFromString(data)
    except MemoryError:
        raise moub.out_of_memory("graph") from None
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning variants
        raise GraphError(f"{moub.filename}: graph: embedded ONNX model does not parse ({exc})") from None
    del data
    reference = first_external_reference(model)
    if reference is not None:
        raise GraphError(f"{moub.filename}: graph {describe_external_reference(reference)}; a .moub must be self-contained")
    if moub.index.required_features & FEATURE_CONSTANT_NAMES:
        restore_constant_names(model, moub.filename)
    return model


def _graphs(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The main graph and every subgraph (If/Loop/Scan bodies, at any depth), with a path prefix."""
    stack = [("", model.graph)]
    while stack:
        prefix, graph = stack.pop()
        yield prefix, graph
        for i, node in enumerate(graph.node):
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append((f"{prefix}node:{i}/{attr.name}/", attr.g))
                for j, sub in enumerate(attr.graphs):
                    stack.append((f"{prefix}node:{i}/{attr.name}[{j}]/", sub))


def check_unique_definitions(model: onnx.ModelProto, filename: str) -> None:
    """Within each graph, every value name is defined once: by an initializer, a sparse
    initializer or a node output. onnxruntime keeps the last of duplicated initializers
    (and a Constant node's output over an initializer), so a second definition would run
    other weights than the ones the file stores and verify checks."""
    for prefix, graph in _graphs(model):
        defined: dict[str, str] = {}
        definitions = [(t.name, "an initializer") for t in graph.initializer]
        definitions += [(s.values.name, "a sparse initializer") for s in graph.sparse_initializer]
        definitions += [(name, f"node {i} ({node.op_type})") for i, node in enumerate(graph.node) for name in node.output]
        for name, what in definitions:
            if not name:
                continue  # an omitted optional output
            if name in defined:
                raise GraphError(
                    f"{filename}: graph{' ' + prefix.rstrip('/') if prefix else ''}: {name!r} is defined twice, "
                    f"by {defined[name]} and by {what}"
                )
            defined[name] = what


def _match(moub: MoubFile, model: onnx.ModelProto) -> tuple[dict[str, TensorSite], dict[int, TensorSite]]:
    """Check the graph against the stored tensors and pack members, before any decoding.

    Returns (tensor path -> site, member site ordinal -> site). No site has negative dims;
    every stored tensor names a site of the same element type and dims; every pack member's
    ordinal names a float site whose element count is the member's; neither keeps data of
    its own; no site is provided twice; every site without data (and with elements) is
    provided; no member decodes to infinity in its site's element type; and the exact
    decoded size (now that the graph gives the members' element types) is within
    ``limits.max_decoded_bytes`` and the memory budget.
    """
    all_sites = list(iter_tensor_sites(model))
    ordinal_of: dict[str, int] = {}
    for ordinal, site in enumerate(all_sites):
        if any(d < 0 for d in site.tensor.dims):
            raise GraphError(f"{moub.filename}: graph tensor {site.path!r} has negative dims {list(site.tensor.dims)}")
        ordinal_of.setdefault(site.path, ordinal)
    matched: dict[str, TensorSite] = {}
    provided: set[int] = set()
    for info in moub.index.tensors:
        ordinal = ordinal_of.get(info.path)
        if ordinal is None:
            raise GraphError(f"{moub.filename}: tensor {info.path!r} has no matching tensor in the graph")
        site = all_sites[ordinal]
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
        provided.add(ordinal)
    members: dict[int, TensorSite] = {}
    decoded = sum(t.decoded_bytes for t in moub.index.tensors)
    wider = 0  # bytes members of 8-byte types need beyond the 4 per element the plan counted
    for pack in moub.index.packs:
        for member in pack.members:
            where = f"{moub.filename}: {member.subject}"
            if member.site >= len(all_sites):
                raise GraphError(f"{where}: site ordinal {member.site} does not exist (the graph has {len(all_sites)} tensor sites)")
            site = all_sites[member.site]
            tensor = site.tensor
            if member.site in provided:
                raise GraphError(f"{where}: site {site.path!r} is provided twice (by a tensor and a pack member)")
            if tensor.data_type not in dtypes.FLOAT_DTYPES:
                raise GraphError(f"{where}: site {site.path!r} has element type {tensor.data_type}; pack members must be float")
            dims = [int(d) for d in tensor.dims]
            if len(dims) > moub.limits.max_rank:
                raise GraphError(f"{where}: site {site.path!r} has dims {dims} (rank above {moub.limits.max_rank})")
            if element_count(tensor) != member.count:
                raise GraphError(
                    f"{where}: count {member.count} differs from the {element_count(tensor)} elements of site {site.path!r} (dims {dims})"
                )
            if has_payload(tensor):
                raise GraphError(f"{where}: site {site.path!r} is stored twice: the graph keeps its data too")
            members[member.site] = site
            provided.add(member.site)
            itemsize = dtypes.STORAGE_DTYPES[tensor.data_type].itemsize
            decoded += member.count * itemsize
            wider += member.count * max(0, itemsize - 4)
    if decoded > moub.limits.max_decoded_bytes:
        raise LimitError(f"{moub.filename}: decoded model size in bytes {decoded} exceeds the limit {moub.limits.max_decoded_bytes}")
    for ordinal, site in enumerate(all_sites):
        if ordinal not in provided and not has_payload(site.tensor) and element_count(site.tensor) > 0:
            raise GraphError(f"{moub.filename}: graph tensor {site.path!r} has no data and the file does not provide it")
    check_member_ranges(moub.index, lambda ordinal: members[ordinal].tensor.data_type)
    moub.budget.charge(wider, "the pack members of 8-byte element types")
    return matched, members


@dataclass
class CheckedFile:
    """A .moub whose index, graph and sites passed every check that precedes decoding.
    Use as a context manager (it closes the file)."""

    moub: MoubFile
    model: onnx.ModelProto
    matched: dict[str, TensorSite]    # stored tensor path -> its site
    members: dict[int, TensorSite]    # pack member site ordinal -> its site

    def __enter__(self) -> CheckedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.moub.close()

    @property
    def sites(self) -> list[TensorSite]:
        """Every site the file provides (stored tensors, then pack members)."""
        return [*self.matched.values(), *self.members.values()]

    def decoded(self, payload_checked: bool = False) -> Iterator[tuple[TensorSite, int, np.ndarray]]:
        """(site, ONNX element type, array in storage dtype and shape), one stored tensor at a
        time: tensors in file order, then pack members (each pack decoded whole, then split).
        The whole-payload digest is checked first with one decoding thread, else beside the
        decoding, and always before this generator ends (``payload_checked``: the caller
        already checked it)."""
        moub = self.moub
        finish_payload_check = (lambda: None) if payload_checked else moub.start_payload_check()
        for info, array in moub.iter_tensors():
            yield self.matched[info.path], info.dtype, array
        dtype_of = {ordinal: site.tensor.data_type for ordinal, site in self.members.items()}
        for member, array in moub.iter_pack_members(dtype_of):
            site = self.members[member.site]
            yield site, dtype_of[member.site], array.reshape(tuple(site.tensor.dims))
        finish_payload_check()

    def decoded_levels(self, level_of) -> Iterator[tuple[TensorSite, int, np.ndarray, int | None]]:
        """:meth:`decoded`, with the pack members ``level_of(member)`` plans (integer dtype
        string, zero point) as their integer levels plus the zero point, never as floats:
        (site, ONNX element type, array, zero point or None); the same checks, in the same
        order (:meth:`moub_format.MoubFile.iter_pack_levels`)."""
        moub = self.moub
        finish_payload_check = moub.start_payload_check()
        for info, array in moub.iter_tensors():
            yield self.matched[info.path], info.dtype, array, None
        dtype_of = {ordinal: site.tensor.data_type for ordinal, site in self.members.items()}
        for member, array, zero_point in moub.iter_pack_levels(level_of, dtype_of):
            site = self.members[member.site]
            yield site, dtype_of[member.site], array.reshape(tuple(site.tensor.dims)), zero_point
        finish_payload_check()


def open_checked(path: Source, limits: ReaderLimits = DEFAULT_LIMITS, decode_workers: int | None = 1,
                 batch_elements: int = DECODE_BATCH_ELEMENTS, message: type = ModelProto) -> CheckedFile:
    """Open ``path`` and run every check that precedes decoding (see the module docstring);
    raises a MoubFormatError subclass naming the file and the problem. ``message``: the
    ModelProto class of :attr:`CheckedFile.model` (see :func:`parse_graph`)."""
    moub = MoubFile(path, limits, batch_elements=batch_elements, decode_workers=decode_workers)
    try:
        model = parse_graph(moub, message)
        check_unique_definitions(model, moub.filename)
        matched, members = _match(moub, model)
        return CheckedFile(moub, model, matched, members)
    except BaseException:
        moub.close()
        raise
