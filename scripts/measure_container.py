"""Where the bytes of a .moub go: format 1.2 packs vs one Tensor per site (1.1 style).

Run: .venv/bin/python scripts/measure_container.py [cls|rec|det|magika] ...

Every float tensor of >= 2 elements is quantized at one fixed setting (per-tensor
uniform step = std / 16, grid codebooks; tests/packing.py): big tensors (>= 1024
elements) one pack each with its own table, the small ones one shared pack and
table. The same quantization is also written as one Huffman Tensor per site, each
with an explicit float32 codebook and its own table, which decodes to the same
model; and with member offsets: each small tensor stores level - round(mean / step)
on the shared grid (the same levels, so the same model; a shorter grid and shorter
codes for the tensors far from zero). Fidelity is not the point here (std / 16 is
coarse for some tensors).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import onnx  # noqa: E402
import packing  # noqa: E402
import test_real_models  # noqa: E402

import moub_runtime  # noqa: E402
from moub_converters.encode import encode_model  # noqa: E402
from moub_format import constants as C  # noqa: E402
from moub_format import writer  # noqa: E402
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
            }))
    print(f"{name}: {len(packing.float_paths(model))} float tensors of >= 2 elements, "
          f"{sum(p.indices.size for p in packs)} weights; fp32 .onnx {model.ByteSize()} bytes")
    if len(packs) and len(packs[-1].paths) > 1:
        shared, centred = packs[-1], centred_packs[-1]
        print(f"shared pack: {len(shared.paths)} small tensors, {shared.indices.size} weights; grid of "
              f"{codebooks[shared.codebook].count} levels, {centred_codebooks[centred.codebook].count} with offsets "
              f"({sum(1 for o in packing.offsets_of(centred) if o)} non-zero offsets)")
    return out


def main(names: list[str]) -> None:
    for name in names or ["cls"]:
        table = rows(name)
        print(f"| {'layout':44} | total | index | graph | payload | padding |")
        print(f"|{'-' * 46}|------:|------:|------:|--------:|--------:|")
        for label, r in table:
            print(f"| {label:44} | {r['total']} | {r['index']} | {r['graph']} | {r['payload']} | {r['padding']} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
