"""Uniform quantization into packs, for tests and measurements (independent of the converter).

Each group of site paths becomes one pack over one grid codebook: member ``i``
is quantized with its own step ``scales[i]`` (the site's standard deviation
divided by ``divisor``), ``round(x / step)`` are the integers (levels), and the
pack's grid covers their range. With ``centre``, member ``i`` also gets the
offset ``round(mean / step)`` and stores ``level - offset`` on the grid, so a
member far from zero (BatchNorm variances) does not stretch the shared grid.
The expected decode is computed here in plain NumPy, independently of the reader.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from modelzoo import tensor_as_float32
from moub_converters.encode import PackAssignment
from moub_format import dtypes
from moub_format.writer import GridCodebook
from moub_runtime.sites import tensor_sites


def step_of(values: np.ndarray, divisor: float) -> np.float32:
    std = float(np.std(values.astype(np.float64))) if values.size else 0.0
    if not std > 0:
        std = float(np.abs(values).max()) if values.size and np.abs(values).max() > 0 else 1.0
    return np.float32(std / divisor)


def uniform_packs(
    model: onnx.ModelProto, groups: Sequence[Sequence[str]], divisor: float = 16.0, table=None, first_codebook: int = 0,
    centre: bool = False,
) -> tuple[list[GridCodebook], list[PackAssignment]]:
    """One grid codebook and one pack per group (codebook numbers from ``first_codebook``);
    ``centre``: each member offset by round(mean / step) (None when all are zero)."""
    sites = tensor_sites(model)
    codebooks, packs = [], []
    for group in groups:
        scales, ints, offsets = [], [], []
        for path in group:
            x = tensor_as_float32(sites[path].tensor).ravel()
            step = step_of(x, divisor)
            offset = int(np.rint(float(np.mean(x.astype(np.float64))) / float(step))) if centre and x.size else 0
            ints.append(np.rint(x / step).astype(np.int64) - offset)
            scales.append(float(step))
            offsets.append(offset)
        q = np.concatenate(ints)
        first = int(q.min())
        codebooks.append(GridCodebook(first, int(q.max()) - first + 1))
        packs.append(PackAssignment(tuple(group), tuple(scales), q - first, first_codebook + len(codebooks) - 1, table,
                                    tuple(offsets) if any(offsets) else None))
    return codebooks, packs


def offsets_of(pack: PackAssignment) -> tuple[int, ...]:
    return tuple(pack.offsets) if pack.offsets is not None else (0,) * len(pack.paths)


def member_values(values: np.ndarray, indices: np.ndarray, offset: int, scale: float) -> np.ndarray:
    """float32(values[indices] + offset) * float32(scale), the sum exact in float64."""
    levels = (values[indices].astype(np.float64) + offset).astype(np.float32)
    product = levels * np.float32(scale)
    assert product.dtype == np.float32
    return product


def expected_members(model: onnx.ModelProto, codebooks, packs: Sequence[PackAssignment]) -> dict[str, bytes]:
    """path -> the bytes a reader must decode: cast(float32(codebook[idx] + offset) * float32(scale)), in NumPy."""
    sites = tensor_sites(model)
    out = {}
    for pack in packs:
        cb = codebooks[pack.codebook]
        values = cb.values() if isinstance(cb, GridCodebook) else np.asarray(cb, dtype=np.float32)
        start = 0
        for path, scale, offset in zip(pack.paths, pack.scales, offsets_of(pack)):
            tensor = sites[path].tensor
            n = int(np.prod(tensor.dims, dtype=np.int64))
            product = member_values(values, pack.indices[start : start + n], offset, scale)
            out[path] = dtypes.cast_from_float32(product, tensor.data_type).tobytes()
            start += n
    return out


def codebook_pack(model: onnx.ModelProto, group: Sequence[str], codebook: np.ndarray, codebook_id: int, table=None) -> PackAssignment:
    """One pack over an explicit float codebook of normalised values: member ``i`` has
    scale = its standard deviation, indices = the nearest codebook value to x / scale."""
    sites = tensor_sites(model)
    codebook = np.asarray(codebook, dtype=np.float32)
    scales, indices = [], []
    for path in group:
        x = tensor_as_float32(sites[path].tensor).ravel()
        scale = step_of(x, 1.0)
        indices.append(np.abs((x / scale)[:, None] - codebook[None, :]).argmin(axis=1))
        scales.append(float(scale))
    return PackAssignment(tuple(group), tuple(scales), np.concatenate(indices), codebook_id, table)


def float_paths(model: onnx.ModelProto, min_elements: int = 2) -> list[str]:
    """Every float site with at least ``min_elements`` elements, in site order."""
    from moub_runtime.sites import iter_tensor_sites

    return [
        s.path for s in iter_tensor_sites(model)
        if s.tensor.data_type in dtypes.FLOAT_DTYPES and int(np.prod(s.tensor.dims, dtype=np.int64)) >= min_elements
    ]


def adaptive_layout(model: onnx.ModelProto, divisor: float = 16.0, small: int = 1024, centre: bool = False):
    """Every float tensor of >= 2 elements quantized with step = std / divisor: tensors of
    >= ``small`` elements one pack each (own grid, own table), the rest one shared pack
    (one grid, one table; ``centre``: each member offset by round(mean / step), so the
    shared grid spans the members' spreads, not their means). Returns (codebooks, packs)."""
    from moub_format.writer import OWN

    sites = tensor_sites(model)
    paths = float_paths(model)
    size = {p: int(np.prod(sites[p].tensor.dims, dtype=np.int64)) for p in paths}
    big = [[p] for p in paths if size[p] >= small]
    little = [p for p in paths if size[p] < small]
    codebooks, packs = uniform_packs(model, big, divisor, table=OWN)
    if little:
        more, (shared,) = uniform_packs(model, [little], divisor, table=None, first_codebook=len(codebooks), centre=centre)
        codebooks += more
        packs.append(shared)
    return codebooks, packs


def as_tensors(model: onnx.ModelProto, codebooks, packs: Sequence[PackAssignment]):
    """The same quantization written the 1.1 way: one Huffman Tensor per site, each with its
    own explicit float32 codebook (its used grid values plus its offset, x its scale: the
    same float32 products, so it decodes to the same bits) and so its own table.
    Returns (codebooks, {path: TensorAssignment})."""
    from moub_converters.encode import TensorAssignment

    sites = tensor_sites(model)
    out_codebooks, assignments = [], {}
    for pack in packs:
        cb = codebooks[pack.codebook]
        values = cb.values() if isinstance(cb, GridCodebook) else np.asarray(cb, dtype=np.float32)
        start = 0
        for path, scale, offset in zip(pack.paths, pack.scales, offsets_of(pack)):
            n = int(np.prod(sites[path].tensor.dims, dtype=np.int64))
            idx = pack.indices[start : start + n]
            used, local = np.unique(idx, return_inverse=True)
            out_codebooks.append(member_values(values, used, offset, scale))
            assignments[path] = TensorAssignment(len(out_codebooks) - 1, local.reshape(-1))
            start += n
    return out_codebooks, assignments
