"""A .moub file -> onnx.ModelProto or onnxruntime.InferenceSession.

The graph stored in the container is cross-checked against the tensors and
pack members the file provides before any tensor is decoded: every stored
tensor must name an existing site with the same element type and shape and no
data of its own, every pack member a float site of its element count, no site
is provided twice, and every other site must carry its own data. External-data references are
refused: a .moub is self-contained.
"""

from __future__ import annotations

import functools
import itertools
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from moub_format import DEFAULT_LIMITS, GraphError, LimitError, MoubFile, ReaderLimits
from moub_format.reader import DECODE_BATCH_ELEMENTS, default_decode_workers
from moub_format import dtypes
from moub_format.constants import FEATURE_CONSTANT_NAMES
from moub_format.dtypes import BFLOAT16

from .constant_names import restore_constant_names
from .payload import clear_payload, element_count, fill_payload, has_payload, mark_in_memory
from .sites import TensorSite, is_main_graph_initializer, iter_tensor_sites
from .tensor_walk import describe_external_reference, first_external_reference


def parse_graph(moub: MoubFile) -> onnx.ModelProto:
    """The embedded ModelProto, parsed after the byte-length cap and checksum, refused if any
    tensor in it (initializer, sparse tensor or attribute, at any depth) refers to external
    data, with Constant tensor names restored where the file left them out (format 1.3)."""
    data = moub.graph_bytes()  # checksum, bounded inflate: MoubFormatErrors of their own
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning variants
        raise GraphError(f"{moub.filename}: graph: embedded ONNX model does not parse ({exc})") from None
    reference = first_external_reference(model)
    if reference is not None:
        raise GraphError(f"{moub.filename}: graph {describe_external_reference(reference)}; a .moub must be self-contained")
    if moub.index.required_features & FEATURE_CONSTANT_NAMES:
        restore_constant_names(model, moub.filename)
    return model


def _match(moub: MoubFile, model: onnx.ModelProto) -> tuple[dict[str, TensorSite], dict[int, TensorSite]]:
    """Check the graph against the stored tensors and pack members, before any decoding.

    Returns (tensor path -> site, member site ordinal -> site). Every stored tensor
    names a site of the same element type and dims; every pack member's ordinal names
    a float site whose element count is the member's; neither keeps data of its own;
    no site is provided twice; every site without data (and with elements) is
    provided; and the exact decoded size (now that the graph gives the members' dtypes)
    is within ``limits.max_decoded_bytes``.
    """
    all_sites = list(iter_tensor_sites(model))
    ordinal_of: dict[str, int] = {}
    for ordinal, site in enumerate(all_sites):
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
            if len(dims) > moub.limits.max_rank or any(d < 0 for d in dims):
                raise GraphError(f"{where}: site {site.path!r} has dims {dims} (negative, or rank above {moub.limits.max_rank})")
            if element_count(tensor) != member.count:
                raise GraphError(
                    f"{where}: count {member.count} differs from the {element_count(tensor)} elements of site {site.path!r} (dims {dims})"
                )
            if has_payload(tensor):
                raise GraphError(f"{where}: site {site.path!r} is stored twice: the graph keeps its data too")
            members[member.site] = site
            provided.add(member.site)
            decoded += member.count * dtypes.STORAGE_DTYPES[tensor.data_type].itemsize
    if decoded > moub.limits.max_decoded_bytes:
        raise LimitError(f"{moub.filename}: decoded model size in bytes {decoded} exceeds the limit {moub.limits.max_decoded_bytes}")
    for ordinal, site in enumerate(all_sites):
        if ordinal not in provided and not has_payload(site.tensor) and element_count(site.tensor) > 0:
            raise GraphError(f"{moub.filename}: graph tensor {site.path!r} has no data and the file does not provide it")
    return matched, members


def match_sites(moub: MoubFile, model: onnx.ModelProto) -> dict[str, TensorSite]:
    """Check the graph against the stored tensors and pack members (see :func:`_match`);
    return path -> site for every stored one."""
    matched, members = _match(moub, model)
    return {**matched, **{site.path: site for site in members.values()}}


def iter_decoded(moub: MoubFile, matched: dict[str, TensorSite], members: dict[int, TensorSite]) -> Iterator[tuple[TensorSite, int, np.ndarray]]:
    """(site, ONNX element type, array in storage dtype and shape), one stored tensor at a
    time: tensors in file order, then pack members (each pack decoded whole, then split)."""
    for info, array in moub.iter_tensors():
        yield matched[info.path], info.dtype, array
    dtype_of = {ordinal: site.tensor.data_type for ordinal, site in members.items()}
    for member, array in moub.iter_pack_members(dtype_of):
        site = members[member.site]
        yield site, dtype_of[member.site], array.reshape(tuple(site.tensor.dims))


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


def _open(
    path: str | os.PathLike, limits: ReaderLimits, decode_workers: int | None = 1, batch_elements: int = DECODE_BATCH_ELEMENTS
) -> tuple[MoubFile, onnx.ModelProto, dict[str, TensorSite], dict[int, TensorSite]]:
    moub = MoubFile(path, limits, batch_elements=batch_elements, decode_workers=decode_workers)
    try:
        model = parse_graph(moub)
        return (moub, model, *_match(moub, model))
    except BaseException:
        moub.close()
        raise


# Elements decoded together when every decoded array is kept anyway (InferenceSession):
# the lane decoder's speed grows with the lanes (chunks) per NumPy call, and its scratch
# is about the compressed bytes of a window (at most DECODER_SCRATCH_BYTES), so windows
# are much bigger than for streaming (DECODE_BATCH_ELEMENTS).
SESSION_BATCH_ELEMENTS = 1 << 25


def decode_tensors(
    path: str | os.PathLike, limits: ReaderLimits = DEFAULT_LIMITS, decode_workers: int | None = 1
) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (site path, array in storage dtype and shape) one tensor at a time,
    pack members included (see :meth:`MoubFile.iter_pack_members` for their memory)."""
    moub, _, matched, members = _open(path, limits, decode_workers)
    with moub:
        for site, _, array in iter_decoded(moub, matched, members):
            yield site.path, array


def load(path: str | os.PathLike, limits: ReaderLimits = DEFAULT_LIMITS, decode_workers: int | None = 1) -> onnx.ModelProto:
    """Decode a .moub into an onnx.ModelProto with all weights inline (like onnx.load).
    Memory: the model, plus one decoding window (each array is freed once copied in)."""
    moub, model, matched, members = _open(path, limits, decode_workers)
    with moub:
        for site, _, array in iter_decoded(moub, matched, members):
            fill_payload(site.tensor, array)
    return model


# With this session config entry, onnxruntime uses the buffers given to
# SessionOptions.add_external_initializers_from_files_in_memory in place (1.32 has it;
# releases without it copy them, as they copy add_external_initializers' OrtValues).
DIRECT_BUFFERS_KEY = "session.use_external_initializer_file_buffers_directly"
_file_numbers = itertools.count()
_options_with_ortvalues: weakref.WeakSet = weakref.WeakSet()  # options given OrtValues (no in-memory files)


def _has_in_memory_files() -> bool:
    return hasattr(onnxruntime.SessionOptions, "add_external_initializers_from_files_in_memory")


def _in_memory_name() -> str:
    """A name for one in-memory "file" of initializer bytes, unique in this process (a
    caller's options object may carry the files of several sessions)."""
    return f"moub-weights-{os.getpid()}-{next(_file_numbers)}.bin"


def _stub(tensor: onnx.TensorProto, location: str, length: int) -> None:
    """Make ``tensor`` an external-data reference to the whole in-memory file ``location``."""
    clear_payload(tensor)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _hand_over(options: onnxruntime.SessionOptions, tensors: list[onnx.TensorProto], arrays: list[np.ndarray], dtypes_: list[int]) -> list:
    """Give ``arrays`` to onnxruntime through ``options`` for the stub ``tensors``; returns
    the objects that must stay alive as long as onnxruntime may read them.

    Where the binding exists, each array is an in-memory file used in place
    (DIRECT_BUFFERS_KEY); else they go as OrtValues (``add_external_initializers``).
    """
    if _has_in_memory_files():
        names = [_in_memory_name() for _ in arrays]
        buffers = [array.reshape(-1).view(np.uint8) for array in arrays]
        for tensor, name, buffer in zip(tensors, names, buffers):
            _stub(tensor, name, buffer.size)
        options.add_session_config_entry(DIRECT_BUFFERS_KEY, "1")
        options.add_external_initializers_from_files_in_memory(names, buffers, [b.size for b in buffers])
        return buffers
    if options in _options_with_ortvalues:
        raise ValueError(
            f"this SessionOptions object already carries the weights of an earlier moub_runtime session, and "
            f"onnxruntime {onnxruntime.__version__} cannot replace them (it has no in-memory initializer files): "
            f"pass a new SessionOptions for each session"
        )
    values = [_ort_value(array, dtype) for array, dtype in zip(arrays, dtypes_)]
    for tensor in tensors:
        mark_in_memory(tensor)
    options.add_external_initializers([t.name for t in tensors], values)
    _options_with_ortvalues.add(options)
    return values


@functools.lru_cache(maxsize=1)
def ort_copies_external_initializers() -> bool:
    """Whether this onnxruntime copies the weights :class:`InferenceSession` hands it.

    onnxruntime 1.32 uses in-memory initializer files in place when asked to
    (DIRECT_BUFFERS_KEY); older releases copy them, or the OrtValues given to
    ``add_external_initializers``, during session creation. Probed once per
    process on a 64-float weight whose buffer is overwritten after the session exists.
    """
    from onnx import TensorProto, helper

    weight = np.arange(1, 65, dtype=np.float32).reshape(1, 64)
    stub = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1, 64])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [stub],
    )
    options = onnxruntime.SessionOptions()
    keep = _hand_over(options, [graph.initializer[0]], [weight], [TensorProto.FLOAT])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    weight[...] = 0
    (result,) = session.run(None, {"x": np.zeros((1, 64), dtype=np.float32)})
    del keep
    return bool(np.array_equal(result, np.arange(1, 65, dtype=np.float32).reshape(1, 64)))


def _ort_value(array: np.ndarray, onnx_dtype: int) -> onnxruntime.OrtValue | None:
    """An OrtValue over ``array``'s memory (bfloat16 from its uint16 bits where supported)."""
    if onnx_dtype != BFLOAT16:
        return onnxruntime.OrtValue.ortvalue_from_numpy(array)
    make = getattr(onnxruntime.OrtValue, "ortvalue_from_numpy_with_onnx_type", None)
    return make(array, onnx_dtype) if make is not None else None


def _constant_node_index(path: str) -> int | None:
    """Node number of a main-graph ``Constant`` site path (``node:I/value``), else None."""
    if path.startswith("node:") and path.endswith("/value") and path.count("/") == 1:
        return int(path[len("node:") : -len("/value")])
    return None


def _keep_alive_with(options: onnxruntime.SessionOptions, objects: list) -> None:
    """Keep ``objects`` alive as long as ``options`` (a caller's options object points at
    them and may build more sessions)."""
    weakref.finalize(options, list.clear, objects)


class InferenceSession(onnxruntime.InferenceSession):
    """An onnxruntime session straight from a .moub file.

    Weights of the main graph (initializers, and ``Constant`` nodes, which
    onnxruntime turns into initializers anyway) are decoded into 64-byte-aligned
    arrays that onnxruntime uses in place: each is an in-memory initializer file
    (``SessionOptions.add_external_initializers_from_files_in_memory`` with
    ``session.use_external_initializer_file_buffers_directly``, the graph holding
    external-data stubs), so the decoded weights exist once, and this session
    holds them for its lifetime (``set_providers`` and fallback keep working).
    With ``sess_options`` given, that object points at the arrays too, so they
    also live as long as it does.

    An onnxruntime that copies them instead (releases without that entry, or
    without the in-memory files binding, which get OrtValues through
    ``add_external_initializers``; see :func:`ort_copies_external_initializers`)
    holds its own copy once the session exists: the arrays are then freed at once
    when the options are this class's own (such a session cannot switch
    providers), else they live as long as the caller's options object. Weights
    inside subgraphs are put back into the graph, which onnxruntime cannot be
    handed otherwise; so are initializers no node reads.

    ``decode_workers``: threads for decoding. Default None: one per core, up
    to 4 (:func:`default_decode_workers`). The stored bytes' checksums are then
    computed on the other threads while the calling thread decodes (hashlib
    releases the GIL), and windows of very many chunks are split between
    threads; a window of a few thousand chunks is not, since threads would
    take turns at the GIL around every NumPy call. 1: everything on the
    calling thread.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        sess_options: onnxruntime.SessionOptions | None = None,
        providers: list | None = None,
        limits: ReaderLimits = DEFAULT_LIMITS,
        decode_workers: int | None = None,
        **kwargs,
    ) -> None:
        options = sess_options if sess_options is not None else onnxruntime.SessionOptions()
        stubs: list[onnx.TensorProto] = []
        arrays: list[np.ndarray] = []
        element_types: list[int] = []
        workers = default_decode_workers() if decode_workers is None else decode_workers
        moub, model, matched, members = _open(path, limits, workers, SESSION_BATCH_ELEMENTS)
        consumed = consumed_names(model)
        graph_outputs = {output.name for output in model.graph.output}
        constants_to_lift: list[int] = []
        with moub:
            for site, dtype, array in iter_decoded(moub, matched, members):
                tensor = site.tensor
                node_index = _constant_node_index(site.path)
                name = model.graph.node[node_index].output[0] if node_index is not None else tensor.name
                liftable = is_main_graph_initializer(site.path) or (node_index is not None and name not in graph_outputs)
                usable = liftable and name in consumed and (_has_in_memory_files() or _ort_value(array, dtype) is not None)
                if not usable:
                    # onnxruntime drops unused initializers before replacing them, so those stay inline.
                    fill_payload(tensor, array)
                    continue
                if node_index is None:
                    stub = tensor
                else:
                    stub = model.graph.initializer.add()
                    stub.name, stub.data_type = name, tensor.data_type
                    stub.dims.extend(tensor.dims)
                    constants_to_lift.append(node_index)
                stubs.append(stub)
                arrays.append(array)
                element_types.append(dtype)
                del array
        for node_index in sorted(constants_to_lift, reverse=True):
            del model.graph.node[node_index]
        keep = _hand_over(options, stubs, arrays, element_types) if arrays else []
        self._moub_weights: list = [] if _has_in_memory_files() else keep
        self._moub_arrays: list[np.ndarray] = arrays  # onnxruntime reads (or copies) this memory
        graph = model.SerializeToString()
        del model, matched, members, stubs
        if arrays and sess_options is not None:
            _keep_alive_with(sess_options, [arrays, keep])
        del keep
        super().__init__(graph, sess_options=options, providers=providers or ["CPUExecutionProvider"], **kwargs)
        self.moub_path = Path(path)
        self._moub_released = False
        if arrays and sess_options is None and ort_copies_external_initializers():
            # onnxruntime holds its own copy now. Our options object still points at the
            # arrays, so it must never build a session again: no provider switch, no
            # fallback (both re-create the session from the initial options).
            self._moub_weights, self._moub_arrays = [], []
            self._moub_released = True
            self.disable_fallback()
            if hasattr(self, "_sess_options_initial"):
                self._sess_options_initial = None

    def set_providers(self, providers=None, provider_options=None) -> None:
        if getattr(self, "_moub_released", False):
            raise NotImplementedError(
                "moub_runtime.InferenceSession cannot switch providers once loaded; create a new session with providers=..."
            )
        super().set_providers(providers, provider_options)


EXTERNAL_MIN_BYTES = 1024     # tensors at least this big go to the data file of a large model
EXTERNAL_ALIGNMENT = 4096     # offsets in the data file: page-aligned, so onnxruntime can map them
EXTERNAL_THRESHOLD = 2**31 - 2**26  # a model this big gets a data file (protobuf's hard limit is 2 GiB)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for site in iter_tensor_sites(model):
        yield site.tensor


def fits_inline(model: onnx.ModelProto, external_threshold: int) -> bool:
    """Whether ``model`` serializes below ``external_threshold`` bytes (a protobuf near or
    past 2 GiB cannot even be measured: its ByteSize raises, which means no)."""
    try:
        return model.ByteSize() < external_threshold
    except Exception:  # google.protobuf.message.EncodeError: "Failed to serialize proto"
        return False


class _DataFile:
    """The ``OUT.data`` file of a large model, written to a temporary name: tensors go
    in one after the other at page-aligned offsets and become external-data references
    (onnx's relative-location convention)."""

    def __init__(self, out: Path) -> None:
        folder = out.parent if str(out.parent) else Path(".")
        self.name = out.name + ".data"
        self.final = folder / self.name
        self.tmp = folder / f".{self.name}.tmp"
        self.handle = open(self.tmp, "wb")
        self.position = 0

    def put(self, tensor: onnx.TensorProto, data) -> None:
        """Write ``data`` (bytes or an array) and point ``tensor`` at it."""
        if isinstance(data, np.ndarray):
            view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        else:
            view = memoryview(data).cast("B")
        self.position = -(-self.position // EXTERNAL_ALIGNMENT) * EXTERNAL_ALIGNMENT
        self.handle.seek(self.position)
        self.handle.write(view)
        clear_payload(tensor)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.name), ("offset", str(self.position)), ("length", str(view.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.position += view.nbytes

    def move_inline_tensors(self, model: onnx.ModelProto) -> None:
        """Move every inline tensor of at least EXTERNAL_MIN_BYTES to the file, one at a time."""
        for tensor in _all_tensors(model):
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                self.put(tensor, tensor.raw_data)

    def commit(self, model: onnx.ModelProto, out: Path) -> None:
        """fsync the data, write the model beside it, rename both into place."""
        from moub_format.writer import write_atomic

        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        write_atomic(out, model.SerializeToString())
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def save_onnx(model: onnx.ModelProto, out_path: str | os.PathLike, external_threshold: int = EXTERNAL_THRESHOLD) -> None:
    """Save ``model`` atomically as ONNX.

    A model whose protobuf would reach ``external_threshold`` bytes (protobuf's
    hard limit is 2 GiB) is written with external data: every tensor of at least
    1 KiB goes to ``OUT.data`` beside ``OUT`` (page-aligned offsets, onnx's
    relative-location convention), moved out of ``model`` one tensor at a time;
    ``model`` is left referring to that file. Both files are written to temporary
    names in the target folder, fsynced and renamed.
    """
    from moub_format.writer import write_atomic

    out = Path(out_path)
    if fits_inline(model, external_threshold):
        write_atomic(out, model.SerializeToString())
        return
    data = _DataFile(out)
    try:
        data.move_inline_tensors(model)
        data.commit(model, out)
    except BaseException:
        data.discard()
        raise


def decode_to_onnx(path: str | os.PathLike, out_path: str | os.PathLike, limits: ReaderLimits = DEFAULT_LIMITS,
                   external_threshold: int = EXTERNAL_THRESHOLD) -> None:
    """``moub decode``: write the runnable ONNX model of a .moub, atomically.

    A model whose decoded tensors and graph reach ``external_threshold`` bytes is
    written as :func:`save_onnx` writes a large model, but each stored tensor goes to
    ``OUT.data`` as soon as it is decoded: memory holds one decoded tensor (or one
    window of packs) at a time, never the model, and no protobuf near 2 GiB is built
    (:func:`load` then :func:`save_onnx` holds the model twice: 13.4 GB at the peak for
    a 4.25 GiB model, and protobuf could not serialize it).
    """
    out = Path(out_path)
    moub, model, matched, members = _open(path, limits)
    with moub:
        sites = [*matched.values(), *members.values()]
        decoded = sum(element_count(s.tensor) * dtypes.STORAGE_DTYPES[s.tensor.data_type].itemsize for s in sites)
        if decoded < external_threshold and fits_inline(model, external_threshold - decoded):
            for site, _, array in iter_decoded(moub, matched, members):
                fill_payload(site.tensor, array)
            save_onnx(model, out, external_threshold)
            return
        data = _DataFile(out)
        try:
            for site, _, array in iter_decoded(moub, matched, members):
                if array.nbytes >= EXTERNAL_MIN_BYTES:
                    data.put(site.tensor, array)
                else:
                    fill_payload(site.tensor, array)
                del array
            data.move_inline_tensors(model)
            data.commit(model, out)
        except BaseException:
            data.discard()
            raise
