"""What a .moub holds, and whether it is intact: the library behind
``moub inspect`` and ``moub verify``.

``verify`` takes the validation path every loader takes (:mod:`.validation`), so it accepts
exactly the files ``load`` accepts; it adds only the reporting of every damaged blob by name."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from moub_format import DEFAULT_LIMITS, MoubFile, MoubFormatError, ReaderLimits
from moub_format import constants as C
from moub_format import dtypes

from .sites import iter_tensor_sites
from .validation import open_checked, parse_graph


@dataclass
class TensorSummary:
    path: str
    name: str
    dtype: int
    dims: list[int]
    encoding: str
    elements: int
    stored_bytes: int
    bits_per_weight: float
    codebook: int | None


def _chunk_entry_bytes(stream) -> int:
    """Index bytes of one chunk_bits entry: 8, or 4 in a compact pack (1.3)."""
    return 4 if getattr(stream, "compact", False) else 8


def _member_index_bytes(pack) -> int:
    """Index bytes of a pack's member vectors (site, count, scale, offset if any)."""
    per_member = (12 + 4 * bool(pack.offsets)) if pack.compact else (16 + 8 * bool(pack.offsets))
    return per_member * len(pack.sites)


@dataclass
class PackSummary:
    """One pack: its members and what it costs. ``bits_per_weight`` counts the stored
    stream; ``bits_per_weight_with_index`` adds the pack's share of the index: 16 bytes
    per member (site, count, scale; 24 with an offset), 8 per chunk (chunk_bits); 12, 16
    and 4 with the compact vectors of format 1.3; and its
    Huffman table as stored (one byte per code length, or its packed bytes; whole if only
    this pack uses it, else shared by elements). Each member lists its ``scale`` and
    ``offset`` (level = grid value + offset)."""

    number: int
    members: list[dict]
    elements: int
    stored_bytes: int
    chunks: int
    codebook: int
    table: int
    index_bytes: int
    bits_per_weight: float
    bits_per_weight_with_index: float


@dataclass
class Summary:
    file: str
    file_bytes: int
    format_version: str
    producer: str
    decoded_bytes: int
    ratio: float
    quantized_weights: int
    quantized_bytes: int
    bits_per_weight: float
    codebooks: list[dict]
    tensors: list[TensorSummary]
    metadata: dict[str, str] = field(default_factory=dict)
    packs: list[PackSummary] = field(default_factory=list)
    integer_weights: int = 0   # elements of integer Huffman tensors (lossless, format 1.4)
    integer_bytes: int = 0     # their streams, chunk entries, codebooks and tables
    # Where the file's bytes go: index + payload = file; payload = graph + tensors + packs + padding.
    index_bytes: int = 0
    graph_bytes: int = 0
    tensor_bytes: int = 0
    pack_bytes: int = 0
    padding_bytes: int = 0
    # Code-length tables inside the index: how many, how many stored packed (1.2), their
    # code lengths and the bytes they take (plain: one per length; packed: the DEFLATE stream).
    tables: int = 0
    packed_tables: int = 0
    table_entries: int = 0
    table_bytes: int = 0
    # What a compact session holds as integers and which quantized tensors stay float, and why
    # (:meth:`.compact.CompactPlan.summary`); None when the file's graph cannot be checked.
    compact: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _graph_sites(moub: MoubFile) -> list[tuple[str, int]] | None:
    """Site ordinal -> (path, element type), from the embedded graph (None if the file has
    no packs or the graph does not parse: inspect then shows ordinals and counts pack
    elements as float32)."""
    if not moub.index.packs:
        return None
    try:
        return [(site.path, site.tensor.data_type) for site in iter_tensor_sites(parse_graph(moub))]
    except MoubFormatError:
        return None


def _codebook_bytes(index, i: int) -> int:
    """Index bytes of codebook ``i``: 12 for a grid, 4 per explicit value."""
    return 12 if index.grids and index.grids[i] else 4 * index.codebook_size(i)


def summarize(path: str | os.PathLike, limits: ReaderLimits = DEFAULT_LIMITS) -> Summary:
    """Read the index (and, for pack member names, the graph; no weights are decoded) and summarise it."""
    with MoubFile(path, limits, plan_decoding=False) as moub:
        index = moub.index
        tensors = []
        for t in index.tensors:
            huff = t.encoding == C.ENCODING_HUFFMAN
            tensors.append(
                TensorSummary(
                    path=t.path,
                    name=t.name,
                    dtype=t.dtype,
                    dims=list(t.dims),
                    encoding=C.ENCODINGS[t.encoding] + (f"+{C.CODECS[t.data.codec]}" if t.data.codec else ""),
                    elements=t.n_elements,
                    stored_bytes=t.data.length,
                    bits_per_weight=round(8 * t.data.length / t.n_elements, 4) if t.n_elements else 0.0,
                    codebook=t.codebook if huff else None,
                )
            )
        # Integer Huffman tensors (format 1.4) are lossless codings of integer weights, counted apart
        # from the quantized float weights: their bytes say nothing about the quantizer.
        huffman = [t for t in index.tensors if t.encoding == C.ENCODING_HUFFMAN]
        integers = [t for t in huffman if t.dtype in dtypes.INTEGER_RANGES]
        quantized = [t for t in huffman if t.dtype not in dtypes.INTEGER_RANGES]
        streams = quantized + list(index.packs)
        q_weights = sum(s.n_elements for s in streams)
        table_users: dict[int, int] = {}
        for s in streams:
            table_users[s.table] = table_users.get(s.table, 0) + s.n_elements
        graph_sites = _graph_sites(moub)
        stored_table_bytes = index.table_bytes or tuple(t.size for t in index.tables)

        def site_info(ordinal: int) -> tuple[str | None, int]:
            if graph_sites and ordinal < len(graph_sites) and graph_sites[ordinal][1] in dtypes.STORAGE_DTYPES:
                return graph_sites[ordinal]
            return None, dtypes.FLOAT

        packs = []
        for p in index.packs:
            table_bytes = stored_table_bytes[p.table] * p.n_elements / max(table_users[p.table], 1)
            index_bytes = _member_index_bytes(p) + _chunk_entry_bytes(p) * len(p.chunk_bits) + table_bytes
            members = [
                {"site": m.site, "path": site_info(m.site)[0], "elements": m.count, "scale": m.scale, "offset": m.offset}
                for m in p.members
            ]
            packs.append(
                PackSummary(
                    number=p.number,
                    members=members,
                    elements=p.n_elements,
                    stored_bytes=p.data.length,
                    chunks=len(p.chunk_bits),
                    codebook=p.codebook,
                    table=p.table,
                    index_bytes=round(index_bytes),
                    bits_per_weight=round(8 * p.data.length / p.n_elements, 4) if p.n_elements else 0.0,
                    bits_per_weight_with_index=round(8 * (p.data.length + index_bytes) / p.n_elements, 4) if p.n_elements else 0.0,
                )
            )
        # Stored indices, their chunk_bits entries and pack member entries in the index,
        # codebooks (4 bytes per value, 12 per grid) and code-length tables as stored.
        q_bytes = sum(s.data.length + _chunk_entry_bytes(s) * len(s.chunk_bits) for s in streams)
        q_bytes += sum(_member_index_bytes(p) for p in index.packs)
        float_codebooks = {s.codebook for s in streams}
        float_tables = {s.table for s in streams}
        q_bytes += sum(_codebook_bytes(index, i) for i in float_codebooks)
        q_bytes += sum(stored_table_bytes[t] for t in float_tables)
        i_bytes = sum(t.data.length + _chunk_entry_bytes(t) * len(t.chunk_bits) for t in integers)
        i_bytes += sum(_codebook_bytes(index, i) for i in {t.codebook for t in integers} - float_codebooks)
        i_bytes += sum(stored_table_bytes[t] for t in {t.table for t in integers} - float_tables)
        decoded = sum(t.decoded_bytes for t in index.tensors) + index.graph.decoded_length
        decoded += sum(m.count * dtypes.STORAGE_DTYPES[site_info(m.site)[1]].itemsize for p in index.packs for m in p.members)
        tables_of: dict[int, set[int]] = {}
        for s in huffman + list(index.packs):
            tables_of.setdefault(s.codebook, set()).add(s.table)
        codebooks = [
            {
                "entries": index.codebook_size(i),
                "min": float(index.grids[i][0]) if index.grids and index.grids[i] else float(cb.min()),
                "max": float(sum(index.grids[i]) - 1) if index.grids and index.grids[i] else float(cb.max()),
                "grid": bool(index.grids and index.grids[i]),
                "longest_code": max((int(index.tables[t].max()) for t in tables_of.get(i, ())), default=None),
            }
            for i, cb in enumerate(index.codebooks)
        ]
        tensor_bytes = sum(t.data.length for t in index.tensors)
        pack_bytes = sum(p.data.length for p in index.packs)
        payload = index.file_size - index.payload_offset
        return Summary(
            file=str(path),
            file_bytes=index.file_size,
            format_version=f"{index.format_major}.{index.format_minor}",
            producer=index.producer,
            decoded_bytes=decoded,
            ratio=round(decoded / index.file_size, 4),
            quantized_weights=q_weights,
            quantized_bytes=q_bytes,
            integer_weights=sum(t.n_elements for t in integers),
            integer_bytes=i_bytes,
            bits_per_weight=round(8 * q_bytes / q_weights, 4) if q_weights else 0.0,
            codebooks=codebooks,
            tensors=tensors,
            metadata=dict(index.metadata),
            packs=packs,
            index_bytes=index.payload_offset,
            tables=len(index.tables),
            packed_tables=sum(index.table_is_packed(t) for t in range(len(index.tables))),
            table_entries=sum(int(t.size) for t in index.tables),
            table_bytes=sum(stored_table_bytes),
            graph_bytes=index.graph.length,
            tensor_bytes=tensor_bytes,
            pack_bytes=pack_bytes,
            padding_bytes=payload - index.graph.length - tensor_bytes - pack_bytes,
            compact=compact_summary(path, limits),
        )


def compact_summary(path: str | os.PathLike, limits: ReaderLimits = DEFAULT_LIMITS) -> dict | None:
    """The compact plan's counts (nothing decoded), or None when the file fails a check that
    precedes decoding (``moub verify`` names it)."""
    from .compact import plan_compact
    from .conv_layout import compact_mode_here
    from .loader import consumed_names

    mode = compact_mode_here(True)
    try:
        with open_checked(path, limits) as checked:
            consumed = consumed_names(checked.model)
            summary = plan_compact(checked, consumed, mode).summary(checked.members)
            smallest = summary if mode == "smallest" else plan_compact(checked, consumed, "smallest").summary(checked.members)
    except MoubFormatError:
        return None
    kept = sum(v["weights"] for v in smallest["kept_float"].values())
    return {"mode": mode, **summary, "smallest_resident_bytes": smallest["held_weight_bytes"] + 4 * kept}


def verify_file(path: str | os.PathLike, limits: ReaderLimits = DEFAULT_LIMITS) -> list[str]:
    """Check a file exactly as loading it does; return its problems (empty list: intact).

    What fails before decoding (structure, index digest, memory plan, graph, sites) raises,
    as it does for ``load``: nothing else can be trusted after it. Then the whole-payload
    digest and every blob's checksum are checked, each mismatch reported by name; if all
    match, every tensor and pack is decoded as ``load`` decodes them, and the first problem
    met is reported.
    """
    with open_checked(path, limits) as checked:
        moub = checked.moub
        problems: list[str] = []
        try:
            moub.verify_payload_digest()
        except MoubFormatError as exc:
            problems.append(str(exc))
        problems += moub.blob_problems()
        if problems:
            return problems
        try:
            with moub.allocating("the decoded model"):
                for _ in checked.decoded(payload_checked=True):
                    pass
        except MoubFormatError as exc:
            problems.append(str(exc))
    return problems
