"""Regenerate the golden file of the current format version (old goldens stay as they are).

Run: .venv/bin/python tests/golden/make_golden.py

The 1.2 golden uses everything 1.2 added: a pack over a grid codebook with its
own table holding fp16/bf16/fp64 members and a tiny vector, each member offset
by round(mean / step) (the tiny vector's offset is non-zero), a pack over an
explicit codebook with per-member scales whose members live in a Constant node,
If and Loop subgraphs and a function, a plain Huffman tensor, an LZMA graph, an
LZMA raw tensor and alignment 8; two of its three code-length tables are long
enough to be stored packed (a raw DEFLATE stream), the third stays plain.
The 1.3 golden is the same file with what 1.3 added: both packs store their
counts, chunk bit lengths and offsets in the 32-bit vectors, the function's
Constant tensor (named like its node's output) is stored unnamed while the main
graph's (named otherwise) keeps its name, and the LZMA blobs are the smallest of
the writer's LZMA2 tunings. The 1.4 golden adds an int8 weight behind DequantizeLinear stored
as an integer Huffman tensor over the grid of its own integers (the converter's lossless
coding). ``test_golden`` rebuilds it byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

import modelzoo  # noqa: E402
import packing  # noqa: E402

import moub_runtime  # noqa: E402
from moub_converters.encode import encode_model  # noqa: E402
from moub_format import FORMAT_MAJOR, FORMAT_MINOR, writer  # noqa: E402
from moub_format import constants as C  # noqa: E402
from moub_format.writer import write_atomic  # noqa: E402

GRID_MEMBERS = ["init:W_half", "init:W_bf16", "init:W_double", "init:small_bias"]
CODEBOOK_MEMBERS = ["node:0/value", "node:12/then_branch/init:W_then", "node:13/body/init:W_loop", "func:0/node:0/value"]


def with_int8_weight(model):
    """``model`` with an int8 weight ``W_int8`` [32, 32] dequantized into a graph output ``w_int8``."""
    from onnx import TensorProto, helper, numpy_helper

    levels = np.clip(np.round(np.random.default_rng(14).laplace(0.0, 6.0, (32, 32))), -127, 127).astype(np.int8)
    model.graph.initializer.extend([numpy_helper.from_array(levels, "W_int8"),
                                    numpy_helper.from_array(np.array(0.01, np.float32), "int8_scale")])
    model.graph.node.append(helper.make_node("DequantizeLinear", ["W_int8", "int8_scale"], ["w_int8"]))
    model.graph.output.append(helper.make_tensor_value_info("w_int8", TensorProto.FLOAT, [32, 32]))
    return model


def golden_inputs():
    """(model, codebooks, assignments, packs, build options) of the current golden."""
    from moub_converters.integers import integer_coding

    model = with_int8_weight(modelzoo.everything_model())
    codebook, assignments = modelzoo.equal_width_assignments(model, k=40)
    assignments = {"init:W_shared": assignments["init:W_shared"]}
    normalised = np.linspace(-3.0, 3.0, 25, dtype=np.float32)
    grids, (grid_pack,) = packing.uniform_packs(
        model, [GRID_MEMBERS], divisor=8.0, table=writer.OWN, first_codebook=2, centre=True)
    packs = [grid_pack, packing.codebook_pack(model, CODEBOOK_MEMBERS, normalised, 1)]
    options = {"chunk_elements": 300, "graph_codec": C.CODEC_LZMA, "raw_codec": C.CODEC_LZMA, "alignment": 8,
               "elide_constant_names": True}
    codebooks, assignments = integer_coding(model).extend([codebook, normalised, *grids], assignments)
    return model, codebooks, assignments, packs, options


def golden_bytes() -> bytes:
    model, codebooks, assignments, packs, options = golden_inputs()
    return encode_model(model, codebooks, assignments, {"purpose": "golden"}, packs=packs, **options)


def main() -> None:
    name = f"everything_v{FORMAT_MAJOR}_{FORMAT_MINOR}"
    path = HERE / f"{name}.moub"
    write_atomic(path, golden_bytes())
    digests = {p: hashlib.sha256(a.tobytes()).hexdigest() for p, a in moub_runtime.decode_tensors(path)}
    (HERE / f"{name}.json").write_text(json.dumps({"file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "tensors": digests}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
