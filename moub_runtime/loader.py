"""A .moub file -> onnx.ModelProto or onnxruntime.InferenceSession.

Every entry point opens the file through :func:`.validation.open_checked` and decodes it with
:meth:`.validation.CheckedFile.decoded`: the one validation path ``moub verify`` takes too, so
whatever it accepts loads, and whatever it refuses does not.
"""

from __future__ import annotations

import functools
import itertools
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime

from moub_format import DEFAULT_LIMITS, ReaderLimits
from moub_format.dtypes import BFLOAT16
from moub_format.reader import Source, default_decode_workers

from . import onnx_proto
from .compact import CompactGraph, compact_decoded, plan_compact
from .conv_layout import compact_mode_here
from .onnx_output import EXTERNAL_THRESHOLD, decode_to_onnx, fits_inline, save_onnx
from .onnx_proto import ATTRIBUTE_GRAPH, ATTRIBUTE_GRAPHS, DATA_LOCATION_EXTERNAL
from .payload import clear_payload, fill_payload, mark_in_memory
from .sites import is_main_graph_initializer
from .validation import open_checked, parse_graph

if TYPE_CHECKING:
    import onnx

__all__ = ["EXTERNAL_THRESHOLD", "InferenceSession", "decode_tensors", "decode_to_onnx", "fits_inline", "load", "parse_graph",
           "save_onnx"]


def consumed_names(model: onnx.ModelProto) -> set[str]:
    """Every value name read by a node (any depth) or produced as a graph output."""
    names = {output.name for output in model.graph.output}
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            names.update(node.input)
            for attr in node.attribute:
                if attr.type == ATTRIBUTE_GRAPH:
                    stack.append(attr.g)
                elif attr.type == ATTRIBUTE_GRAPHS:
                    stack.extend(attr.graphs)
    for function in model.functions:
        for node in function.node:
            names.update(node.input)
    return names


# Elements decoded together when every decoded array is kept anyway (InferenceSession):
# the lane decoder's speed grows with the lanes (chunks) per NumPy call, and its scratch
# is about the compressed bytes of a window (at most DECODER_SCRATCH_BYTES), so windows
# are much bigger than for streaming (DECODE_BATCH_ELEMENTS).
SESSION_BATCH_ELEMENTS = 1 << 25


def decode_tensors(
    path: Source, limits: ReaderLimits = DEFAULT_LIMITS, decode_workers: int | None = 1
) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (site path, array in storage dtype and shape) one tensor at a time,
    pack members included (see :meth:`MoubFile.iter_pack_members` for their memory)."""
    with open_checked(path, limits, decode_workers) as checked:
        for site, _, array in checked.decoded():
            yield site.path, array


def load(path: Source, limits: ReaderLimits = DEFAULT_LIMITS, decode_workers: int | None = 1,
         compact: bool | str = False) -> onnx.ModelProto:
    """Decode a .moub (a path, its bytes or a binary file object) into an onnx.ModelProto
    with all weights inline (like onnx.load).
    Memory: the model, plus one decoding window (each array is freed once copied in).
    ``limits.memory_budget`` bounds what the file may make the reader materialise.
    The one entry point that imports onnx: it returns onnx's own class. ``compact``: True
    (the mode for this onnxruntime) or a mode of :data:`.compact.COMPACT_MODES`: the weights
    that can be are integer initializers behind DequantizeLinear (:mod:`.compact`)."""
    import onnx

    mode = compact_mode_here(compact)
    with open_checked(path, limits, decode_workers, message=onnx.ModelProto) as checked:
        compact_graph = CompactGraph(checked.model) if mode else None
        with checked.moub.allocating("the decoded model"):
            for site, _, array, compact_stub in _decoded(checked, compact_graph, consumed_names(checked.model), mode):
                fill_payload(compact_stub if compact_stub is not None else site.tensor, array)
        if compact_graph is not None:
            compact_graph.finish()
        return checked.model


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
    tensor.data_location = DATA_LOCATION_EXTERNAL
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
    weight = np.arange(1, 65, dtype=np.float32).reshape(1, 64)
    model = _probe_model()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # no thread pool to start: a third of the probe's time
    keep = _hand_over(options, [model.graph.initializer[0]], [weight], [onnx_proto.TensorProto.FLOAT])
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    weight[...] = 0
    (result,) = session.run(None, {"x": np.zeros((1, 64), dtype=np.float32)})
    del keep
    return bool(np.array_equal(result, np.arange(1, 65, dtype=np.float32).reshape(1, 64)))


def _probe_model() -> onnx.ModelProto:
    """y = x + w for x, w of shape [1, 64]; w a stub for the weights handed over."""
    model = onnx_proto.ModelProto(ir_version=8, opset_import=[onnx_proto.OperatorSetIdProto(domain="", version=13)])
    graph = model.graph
    graph.name = "probe"
    graph.node.add(op_type="Add", input=["x", "w"], output=["y"])
    graph.initializer.add(name="w", data_type=onnx_proto.TensorProto.FLOAT, dims=[1, 64])
    for values, name in ((graph.input, "x"), (graph.output, "y")):
        tensor_type = values.add(name=name).type.tensor_type
        tensor_type.elem_type = onnx_proto.TensorProto.FLOAT
        for dim in (1, 64):
            tensor_type.shape.dim.add(dim_value=dim)
    return model


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


# onnxruntime fuses a DequantizeLinear feeding MatMul into MatMulNBits (8 or 4 bits, the weights
# kept packed); this entry sets the arithmetic it computes in. onnxruntime's default (4) quantizes
# the activations to int8, which moves outputs by far more than rounding (a PP-OCR classifier's
# probabilities by 2e-4): a compact session computes in float32 (1) unless the caller's options say.
MATMULNBITS_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
MATMULNBITS_FLOAT32 = "1"


def _keep_float_arithmetic(options: onnxruntime.SessionOptions) -> None:
    try:
        if options.get_session_config_entry(MATMULNBITS_ACCURACY_KEY):
            return
    except Exception:  # onnxruntime raises when the entry was never set
        pass
    options.add_session_config_entry(MATMULNBITS_ACCURACY_KEY, MATMULNBITS_FLOAT32)


def _decoded(checked, compact_graph: CompactGraph | None, consumed: set[str], mode: str | None) -> Iterator[tuple]:
    """(site, element type, array, stub or None): the normal decode, or with ``compact_graph``
    the tensors ``mode`` plans as integers (:func:`.compact.compact_decoded`)."""
    if compact_graph is None:
        for site, dtype, array in checked.decoded():
            yield site, dtype, array, None
        return
    yield from compact_decoded(checked, plan_compact(checked, consumed, mode), compact_graph)


def _keep_alive_with(options: onnxruntime.SessionOptions, objects: list) -> None:
    """Keep ``objects`` alive as long as ``options`` (a caller's options object points at
    them and may build more sessions)."""
    weakref.finalize(options, list.clear, objects)


class InferenceSession(onnxruntime.InferenceSession):
    """An onnxruntime session straight from a .moub file (a path, its bytes, or a binary
    file object read from its position to the end).

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

    ``compact``: the weights :mod:`.compact` can express stay 8/16-bit integers behind
    ``DequantizeLinear`` nodes (the same weights, a quarter or half of the memory); ``"fast"``
    keeps float the weights of grouped Convs, ``"smallest"`` holds those too, True picks
    ``"fast"`` where this onnxruntime runs Convs in NCHWc (:mod:`.conv_layout`); and
    MatMulNBits fusions compute in float32 (``session.qdq_matmulnbits_accuracy_level`` 1,
    written into the options unless they set it).

    ``decode_workers``: threads for decoding. Default None: one per core, up
    to 4 (:func:`default_decode_workers`). The stored bytes' checksums and the
    whole-payload digest are then computed on the other threads while the calling thread decodes (hashlib
    releases the GIL), and windows of very many chunks are split between
    threads; a window of a few thousand chunks is not, since threads would
    take turns at the GIL around every NumPy call. 1: everything on the
    calling thread.
    """

    def __init__(
        self,
        path: Source,
        sess_options: onnxruntime.SessionOptions | None = None,
        providers: list | None = None,
        limits: ReaderLimits = DEFAULT_LIMITS,
        decode_workers: int | None = None,
        compact: bool | str = False,
        **kwargs,
    ) -> None:
        mode = compact_mode_here(compact)
        options = sess_options if sess_options is not None else onnxruntime.SessionOptions()
        stubs: list[onnx.TensorProto] = []
        arrays: list[np.ndarray] = []
        element_types: list[int] = []
        workers = default_decode_workers() if decode_workers is None else decode_workers
        checked = open_checked(path, limits, workers, SESSION_BATCH_ELEMENTS)
        moub, model = checked.moub, checked.model
        consumed = consumed_names(model)
        graph_outputs = {output.name for output in model.graph.output}
        constants_to_lift: list[int] = []
        compact_graph = CompactGraph(model) if mode else None
        with checked, moub.allocating("the decoded model"):
            for site, dtype, array, compact_stub in _decoded(checked, compact_graph, consumed, mode):
                if compact_stub is not None:  # integers behind a DequantizeLinear or in a MatMulNBits, handed over like any weight
                    stubs.append(compact_stub)
                    arrays.append(array)
                    element_types.append(dtype)
                    del array
                    continue
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
        if compact_graph is not None:
            compact_graph.finish()
            _keep_float_arithmetic(options)
        self._moub_weights: list = [] if _has_in_memory_files() else keep
        self._moub_arrays: list[np.ndarray] = arrays  # onnxruntime reads (or copies) this memory
        graph = model.SerializeToString()
        del model, checked, stubs
        if arrays and sess_options is not None:
            _keep_alive_with(sess_options, [arrays, keep])
        del keep
        super().__init__(graph, sess_options=options, providers=providers or ["CPUExecutionProvider"], **kwargs)
        self.moub_path = Path(path) if isinstance(path, (str, os.PathLike)) else None  # None: read from bytes or a file object
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
