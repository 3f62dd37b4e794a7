"""Where the bytes of a .moub go: format 1.2 packs vs one Tensor per site (1.1 style).

Run: .venv/bin/python experiments/measure_container.py [cls|rec|det|magika] ...

Every float tensor of >= 2 elements is quantized at one fixed setting (per-tensor
uniform step = std / 16, grid codebooks; tests/packing.py): big tensors (>= 1024
elements) one pack each with its own table, the small ones one shared pack and
table. The same quantization is also written as one Huffman Tensor per site, each
with an explicit float32 codebook and its own table, which decodes to the same
model; and with member offsets: each small tensor stores level - round(mean / step)
on the shared grid (the same levels, so the same model; a shorter grid and shorter
codes for the tensors far from zero). Fidelity is not the point here (std / 16 is
coarse for some tensors). The "tables" column is the code-length tables' bytes in the
index: format 1.2 stores a long table as a DEFLATE stream (packed) when that is smaller;
the "plain tables" row is the same file with every table plain, as a format-1.1 writer stores them.
What it decided: docs/decisions/0006-shared-huffman-packs.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import onnx  # noqa: E402
import packing  # noqa: E402
import test_real_models  # noqa: E402

import moub_runtime  # noqa: E402
from moub_converters.encode import encode_model  # noqa: E402
from moub_format import constants as C  # noqa: E402
from moub_format import huffman, writer  # noqa: E402
from moub_runtime.inspect import summarize  # noqa: E402


def rows(name: str) -> list[tuple[str, dict]]:
    model = onnx.load(test_real_models.model_file(name))
    codebooks, packs = packing.adaptive_layout(model, divisor=16.0)
    centred_codebooks, centred_packs = packing.adaptive_layout(model, divisor=16.0, centre=True)
    tensor_codebooks, assignments = packing.as_tensors(model, codebooks, packs)
    best = {"graph_codec": C.CODEC_LZMA, "raw_codec": writer.SMALLEST, "alignment": 8}
    variants = {
        "1.1 style: Tensor per site, zlib graph, align 64": lambda: encode_model(model, tensor_codebooks, assignments),
        "Tensor per site, lzma graph, align 8": lambda: encode_model(
            model, tensor_codebooks, assignments, graph_codec=C.CODEC_LZMA, alignment=8),
        "1.2 packs, zlib graph, align 64": lambda: encode_model(model, codebooks, {}, packs=packs),
        "1.2 packs, lzma graph, align 64": lambda: encode_model(
            model, codebooks, {}, packs=packs, graph_codec=C.CODEC_LZMA, raw_codec=writer.SMALLEST),
        "1.2 packs, lzma graph, align 8": lambda: encode_model(
            model, codebooks, {}, packs=packs, graph_codec=C.CODEC_LZMA, raw_codec=writer.SMALLEST, alignment=8),
        "1.2 packs, lzma, align 8, chunks 4096": lambda: encode_model(
            model, codebooks, {}, packs=packs, **best, chunk_elements=4096),
        "1.2 packs + offsets, lzma, align 8, plain tables": lambda: plain_tables(
            lambda: encode_model(model, centred_codebooks, {}, packs=centred_packs, **best)),
        "1.2 packs + offsets, lzma, align 8": lambda: encode_model(model, centred_codebooks, {}, packs=centred_packs, **best),
        "1.2 packs + offsets, lzma, align 8, chunks 4096": lambda: encode_model(
            model, centred_codebooks, {}, packs=centred_packs, **best, chunk_elements=4096),
    }
    out = []
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for label, make in variants.items():
            path = Path(tmp) / "m.moub"
            path.write_bytes(make())
            decoded = moub_runtime.load(path).SerializeToString()
            reference = reference or decoded
            assert decoded == reference, f"{label} decodes to another model"
            s = summarize(path)
            out.append((label, {
                "total": s.file_bytes, "index": s.index_bytes, "graph": s.graph_bytes,
                "payload": s.tensor_bytes + s.pack_bytes, "padding": s.padding_bytes,
                "entries": len(s.tensors) + sum(len(p.members) for p in s.packs), "packs": len(s.packs),
                "tables": s.table_bytes, "lengths": s.table_entries, "packed": s.packed_tables, "n_tables": s.tables,
                "weights": s.quantized_weights,
            }))
    print(f"{name}: {len(packing.float_paths(model))} float tensors of >= 2 elements, "
          f"{sum(p.indices.size for p in packs)} weights; fp32 .onnx {model.ByteSize()} bytes")
    if len(packs) and len(packs[-1].paths) > 1:
        shared, centred = packs[-1], centred_packs[-1]
        print(f"shared pack: {len(shared.paths)} small tensors, {shared.indices.size} weights; grid of "
              f"{codebooks[shared.codebook].count} levels, {centred_codebooks[centred.codebook].count} with offsets "
              f"({sum(1 for o in packing.offsets_of(centred) if o)} non-zero offsets)")
    return out


def plain_tables(make):
    """``make()`` with every code-length table stored plain (as a format-1.1 writer stores them)."""
    with mock.patch.object(huffman, "packed_table", lambda lengths: None):
        return make()


def main(names: list[str]) -> None:
    for name in names or ["cls"]:
        table = rows(name)
        print(f"| {'layout':50} | total | index | tables (packed/all) | graph | payload | padding |")
        print(f"|{'-' * 52}|------:|------:|-------------------:|------:|--------:|--------:|")
        for label, r in table:
            tables = f"{r['tables']} ({r['packed']}/{r['n_tables']})"
            print(f"| {label:50} | {r['total']} | {r['index']} | {tables:>18} | {r['graph']} | {r['payload']} | {r['padding']} |")
        plain, packed = (dict(table)[k] for k in ("1.2 packs + offsets, lzma, align 8, plain tables", "1.2 packs + offsets, lzma, align 8"))
        print(f"\ncode-length tables: {plain['tables']} -> {packed['tables']} bytes ({plain['lengths']} code lengths, "
              f"{8 * plain['tables'] / plain['weights']:.3f} -> {8 * packed['tables'] / packed['weights']:.3f} bits/weight); "
              f"file {plain['total']} -> {packed['total']} bytes ({100 * (plain['total'] - packed['total']) / plain['total']:.2f}% smaller)")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
