"""Turn a model plus codebook assignments into .moub bytes.

The graph keeps every node, opset, function and metadata entry; only the
payloads of stored tensors leave it. Quantized sites become Huffman tensors, or
members of packs (format 1.2: several sites, one stream, a scale per site);
other tensors with a raw payload of at least ``raw_min_bytes`` move to the
payload section byte for byte (zlib-packed when that saves space); everything
smaller stays inside the graph untouched.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from moub_format import constants as C
from moub_format import dtypes, writer
from moub_runtime.constant_names import elide_constant_names as elide_names
from moub_runtime.payload import clear_payload
from moub_runtime.sites import iter_tensor_sites, tensor_sites
from moub_runtime.tensor_walk import describe_external_reference, first_external_reference

RAW_MIN_BYTES = 4096
ZLIB_MIN_SAVING = 0.05  # pack a raw tensor only if zlib saves at least this fraction


@dataclass(frozen=True)
class TensorAssignment:
    """One quantized site: which codebook, and one index per element (C order)."""

    codebook: int
    indices: np.ndarray


@dataclass(frozen=True)
class PackAssignment:
    """Quantized sites coded as one stream (format 1.2): one codebook and table, a scale
    and an integer offset per site. ``indices`` are the sites' indices concatenated in
    ``paths`` order (C order within each); site ``paths[i]`` decodes to
    ``float32(codebook[idx] + offsets[i]) * float32(scales[i])`` cast to its dtype (see
    :func:`dequantize_scaled`). ``offsets``: None = all zero; non-zero offsets need a grid
    codebook, and every level ``first + offset .. first + count - 1 + offset`` must lie
    within (-2^24, 2^24): with levels ``q = round(x / step)``, a member centred far from
    zero stores ``q - offset`` on the shared grid instead of stretching it. ``table``:
    None = the shared table of ``codebook``, ``writer.OWN`` = a table of this pack's
    indices alone, or an index into the ``tables`` build option."""

    paths: tuple[str, ...]
    scales: tuple[float, ...]
    indices: np.ndarray
    codebook: int
    table: int | str | None = None
    offsets: tuple[int, ...] | None = None


def dequantize(codebook: np.ndarray | writer.GridCodebook, indices: np.ndarray, onnx_dtype: int) -> np.ndarray:
    """The exact storage values the runtime will decode (same function, same bits)."""
    return dtypes.cast_from_float32(writer.codebook_values(codebook)[indices], onnx_dtype)


def dequantize_scaled(
    codebook: np.ndarray | writer.GridCodebook, indices: np.ndarray, scale: float, onnx_dtype: int, offset: int = 0
) -> np.ndarray:
    """The exact storage values the runtime decodes for a pack member (same function, same bits)."""
    from moub_format.reader import scale_member

    return scale_member(writer.codebook_values(codebook)[indices], float(np.float32(scale)), onnx_dtype, offset)


def _raw_codec(data: bytes) -> int:
    if len(data) < RAW_MIN_BYTES:
        return C.CODEC_NONE
    packed = len(zlib.compress(data, writer.ZLIB_LEVEL))
    return C.CODEC_ZLIB if packed <= len(data) * (1 - ZLIB_MIN_SAVING) else C.CODEC_NONE


def container_specs(
    model: onnx.ModelProto,
    assignments: Mapping[str, TensorAssignment],
    raw_min_bytes: int = RAW_MIN_BYTES,
) -> tuple[bytes, list[writer.TensorSpec]]:
    """Strip stored payloads from a copy of ``model``; return (graph bytes, tensor specs)."""
    graph, specs, *_ = container_parts(model, assignments, (), raw_min_bytes)
    return graph, specs


def _pack_specs(stripped: onnx.ModelProto, packs: Sequence[PackAssignment]) -> list[writer.PackSpec]:
    """Packs with site paths turned into ordinals (members sorted by ordinal, their index
    slices, scales and offsets with them); the members' payloads are cleared in ``stripped``."""
    ordinals: dict[str, int] = {}
    all_sites = list(iter_tensor_sites(stripped))
    for ordinal, site in enumerate(all_sites):
        ordinals.setdefault(site.path, ordinal)
    specs = []
    for pack in packs:
        if not len(pack.paths) == len(pack.scales):
            raise ValueError(f"pack of {len(pack.paths)} sites has {len(pack.scales)} scales")
        offsets = tuple(pack.offsets) if pack.offsets is not None else (0,) * len(pack.paths)
        if len(offsets) != len(pack.paths):
            raise ValueError(f"pack of {len(pack.paths)} sites has {len(offsets)} offsets")
        unknown = [p for p in pack.paths if p not in ordinals]
        if unknown:
            raise ValueError(f"pack member {unknown[0]!r} is not a tensor site of the model")
        indices = np.asarray(pack.indices).reshape(-1)
        members, start = [], 0
        for path, scale, offset in zip(pack.paths, pack.scales, offsets):
            tensor = all_sites[ordinals[path]].tensor
            if tensor.data_type not in dtypes.FLOAT_DTYPES:
                raise ValueError(f"pack member {path!r} has element type {tensor.data_type}, not a float type")
            count = 1
            for dim in tensor.dims:
                count *= int(dim)
            members.append((ordinals[path], count, scale, indices[start : start + count], offset))
            start += count
        if start != indices.size:
            raise ValueError(f"pack of {list(pack.paths)[:3]}...: {indices.size} indices for {start} elements")
        in_site_order = all(a[0] < b[0] for a, b in zip(members, members[1:]))
        members.sort(key=lambda m: m[0])
        for ordinal, *_ in members:
            clear_payload(all_sites[ordinal].tensor)
        # already in site order (the adaptive mode's packs are): no copy of the pack's indices
        ordered = indices if in_site_order or not members else np.concatenate([m[3] for m in members])
        specs.append(writer.PackSpec(
            tuple(m[0] for m in members), tuple(m[1] for m in members), tuple(m[2] for m in members),
            ordered, pack.codebook, pack.table, tuple(m[4] for m in members),
        ))
    return specs


def container_parts(
    model: onnx.ModelProto,
    assignments: Mapping[str, TensorAssignment],
    packs: Sequence[PackAssignment] = (),
    raw_min_bytes: int = RAW_MIN_BYTES,
    elide_constant_names: bool = False,
) -> tuple[bytes, list[writer.TensorSpec], list[writer.PackSpec], int]:
    """Strip stored payloads from a copy of ``model``; return (graph bytes, tensor specs,
    pack specs, the graph's required-feature bits). With ``elide_constant_names``,
    Constant tensors named like their node's output lose the copy of the name where
    a reader can restore it (:mod:`moub_runtime.constant_names`)."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    sites = tensor_sites(stripped)
    missing = sorted(set(assignments) - set(sites))
    if missing:
        raise ValueError(f"assignment for unknown tensor site {missing[0]!r}")
    packed = {path for pack in packs for path in pack.paths}
    both = sorted(packed & set(assignments))
    if both:
        raise ValueError(f"site {both[0]!r} is both a tensor assignment and a pack member")
    reference = first_external_reference(stripped)
    if reference is not None:
        raise ValueError(f"{describe_external_reference(reference)}; load the model with its data")
    pack_specs = _pack_specs(stripped, packs)
    specs: list[writer.TensorSpec] = []
    for path, site in sites.items():
        tensor = site.tensor
        dims = tuple(int(d) for d in tensor.dims)
        if path in assignments:
            assignment = assignments[path]
            specs.append(
                writer.HuffmanTensor(path, tensor.name, tensor.data_type, dims, np.asarray(assignment.indices), assignment.codebook)
            )
            clear_payload(tensor)
        elif path in packed:
            continue
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= raw_min_bytes and tensor.data_type in dtypes.STORAGE_DTYPES:
            data = bytes(tensor.raw_data)
            specs.append(writer.RawTensor(path, tensor.name, tensor.data_type, dims, data, _raw_codec(data)))
            clear_payload(tensor)
    features = C.FEATURE_CONSTANT_NAMES if elide_constant_names and elide_names(stripped) else 0
    return stripped.SerializeToString(deterministic=True), specs, pack_specs, features


def model_pieces(
    model: onnx.ModelProto,
    codebooks: Sequence[np.ndarray | writer.GridCodebook],
    assignments: Mapping[str, TensorAssignment],
    metadata: Mapping[str, str] | None = None,
    packs: Sequence[PackAssignment] = (),
    elide_constant_names: bool = False,
    **build_options,
) -> list[bytes | memoryview]:
    """The pieces of the .moub file (:func:`moub_format.writer.assemble`) for ``model``
    with ``assignments`` quantized and ``packs`` stored as packs, for joining
    (:func:`encode_model`) or streaming to a file (:func:`write_model`).
    ``build_options`` go to the writer (for example ``graph_codec=CODEC_LZMA``,
    ``raw_codec=writer.SMALLEST``, ``alignment=8``, ``tables=``, ``chunk_elements=4096``:
    one chunk size for every Huffman tensor and pack). ``elide_constant_names``: see
    :func:`container_parts` (a 1.3 feature bit, so only for files that need a newer
    reader anyway)."""
    graph, specs, pack_specs, graph_features = container_parts(model, assignments, packs,
                                                               elide_constant_names=elide_constant_names)
    return writer.assemble(graph, codebooks, specs, metadata or {}, packs=pack_specs, graph_features=graph_features,
                           **build_options)


def encode_model(*args, **kwargs) -> bytes:
    """The complete .moub bytes (arguments: :func:`model_pieces`)."""
    return b"".join(model_pieces(*args, **kwargs))


def write_model(path: str | os.PathLike, *args, **kwargs) -> int:
    """The .moub file (arguments: :func:`model_pieces`), written atomically to ``path``
    piece by piece, never joined in memory; returns its size."""
    pieces = model_pieces(*args, **kwargs)
    writer.write_atomic(path, pieces)
    return sum(len(piece) for piece in pieces)
