"""Deep Compression's weight sharing without pruning or retraining: 1-D k-means over all pooled
weights (one shared codebook, linear initialisation as in Han et al. 2016) and one canonical
Huffman table over the cluster indices.

k-means runs on the sorted pool: in one dimension every cluster is a contiguous run of the sorted
values, so a Lloyd step is a `searchsorted` of the k-1 midpoints plus prefix sums — O(k log N) per
iteration after one O(N log N) sort, instead of O(N k).

File layout (little-endian), everything a decoder needs:
    b"KMH1" | u32 n | zstd(graph) in n bytes (the ONNX model, pooled payloads removed)
    | u32 k | f32[k] codebook | u8[k] code lengths | u64 payload bits | payload
The payload is the Huffman code of every pooled weight, tensors in graph order. The Huffman code
is plain (bitarray's), made canonical by (length, symbol) so the lengths alone define it; it does
not use moub's codec, so the peer stands on its own.
"""
from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import onnx

from .. import config as C
from . import Candidate, Context, Unavailable, sweep
from .weights import fill, load_lifted, pack_graph, pool_arrays, pool_names, strip, unpack_graph

METHOD = "1-D k-means + Huffman (one codebook)"
MAGIC = b"KMH1"


def kmeans_1d(sorted_values: np.ndarray, k: int, iters: int = C.KMEANS_ITERS) -> np.ndarray:
    """Centroids (ascending, no empty cluster) of Lloyd's k-means on already sorted values."""
    x = np.asarray(sorted_values, dtype=np.float64)
    n = x.size
    prefix = np.concatenate([[0.0], np.cumsum(x)])
    lo, hi = float(x[0]), float(x[-1])
    if k <= 1 or lo == hi:
        return np.array([x.mean()], dtype=np.float64)
    centres = np.linspace(lo, hi, k)  # Deep Compression's linear initialisation
    for _ in range(iters):
        cuts = np.searchsorted(x, (centres[:-1] + centres[1:]) / 2)
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [n]])
        counts = ends - starts
        keep = counts > 0
        new = (prefix[ends[keep]] - prefix[starts[keep]]) / counts[keep]
        if new.size == centres.size and np.allclose(new, centres, rtol=0, atol=1e-12):
            centres = new
            break
        centres = new
    return centres


def assign(values: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for every value (centres ascending)."""
    mids = (centres[:-1] + centres[1:]) / 2
    return np.searchsorted(mids, values.astype(np.float64), side="left").astype(np.int64)


def code_lengths(freq: np.ndarray) -> np.ndarray:
    """Huffman code length per symbol (0 = unused; a lone symbol gets 1 bit)."""
    from bitarray.util import huffman_code

    used = {int(s): int(f) for s, f in enumerate(freq) if f > 0}
    lengths = np.zeros(freq.size, dtype=np.uint8)
    if len(used) == 1:
        lengths[next(iter(used))] = 1
        return lengths
    for sym, code in huffman_code(used).items():
        lengths[sym] = len(code)
    return lengths


def _canonical(lengths: np.ndarray) -> tuple[list[int], list[int]]:
    """(count per length, symbols in canonical order) as bitarray's canonical_decode takes them."""
    count = np.bincount(lengths.astype(np.int64), minlength=int(lengths.max()) + 1).tolist()
    count[0] = 0
    order = np.lexsort((np.arange(lengths.size), lengths))
    return count, [int(s) for s in order if lengths[s] > 0]


def huffman_encode(indices: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    from bitarray import bitarray

    count, symbols = _canonical(lengths)
    codes, code, pos = {}, 0, 0
    for length in range(1, len(count)):
        code <<= 1
        for sym in symbols[pos:pos + count[length]]:
            codes[sym] = bitarray(format(code, f"0{length}b"))
            code += 1
        pos += count[length]
    bits = bitarray()
    bits.encode(codes, indices.tolist())
    return bits.tobytes(), len(bits)


def huffman_decode(data: bytes, nbits: int, lengths: np.ndarray, n: int) -> np.ndarray:
    from bitarray import bitarray
    from bitarray.util import canonical_decode

    count, symbols = _canonical(lengths)
    if len(symbols) == 1:
        return np.full(n, symbols[0], dtype=np.int64)
    bits = bitarray()
    bits.frombytes(data)
    del bits[nbits:]
    return np.fromiter(canonical_decode(bits, count, symbols), dtype=np.int64, count=n)


def encode(model: onnx.ModelProto, k: int) -> tuple[bytes, dict]:
    """The whole file for one k, and facts for the table."""
    names = pool_names(model)
    arrays = pool_arrays(model)
    flat = np.concatenate([arrays[n].ravel() for n in names])
    centres = kmeans_1d(np.sort(flat), k)
    indices = assign(flat, centres)
    codebook = centres.astype(np.float32)
    freq = np.bincount(indices, minlength=codebook.size)
    lengths = code_lengths(freq)
    payload, nbits = huffman_encode(indices, lengths)
    graph = strip(model, names)
    blob = b"".join([
        MAGIC, pack_graph(graph),
        struct.pack("<I", codebook.size), codebook.astype("<f4").tobytes(), lengths.astype(np.uint8).tobytes(),
        struct.pack("<Q", nbits), payload,
    ])
    p = freq[freq > 0] / flat.size
    facts = {
        "clusters used": int(codebook.size),
        "bits/weight": nbits / flat.size,
        "entropy": float(-(p * np.log2(p)).sum()),
        "weights": int(flat.size),
    }
    return blob, facts


def decode(blob: bytes) -> onnx.ModelProto:
    """The runnable model from a file written by :func:`encode`."""
    if blob[:4] != MAGIC:
        raise ValueError("not a k-means+Huffman file")
    graph, pos = unpack_graph(blob, 4)
    (k,) = struct.unpack_from("<I", blob, pos)
    pos += 4
    codebook = np.frombuffer(blob, "<f4", k, pos)
    pos += 4 * k
    lengths = np.frombuffer(blob, np.uint8, k, pos)
    pos += k
    (nbits,) = struct.unpack_from("<Q", blob, pos)
    pos += 8
    stripped = onnx.ModelProto()
    stripped.ParseFromString(graph)
    names = pool_names(stripped)
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in stripped.graph.initializer}
    sizes = [int(np.prod(shapes[n], dtype=np.int64)) for n in names]
    indices = huffman_decode(blob[pos:], nbits, lengths, sum(sizes))
    values = codebook[indices]
    arrays, start = {}, 0
    for name, size in zip(names, sizes):
        arrays[name] = values[start:start + size]
        start += size
    return fill(graph, arrays)


def run(ctx: Context) -> list[Candidate]:
    model = load_lifted(ctx.onnx_path)
    if not pool_names(model):
        raise Unavailable(f"no float32/float16 weight tensor of >= {C.MIN_ELEMENTS} values to code")

    def one(k: int) -> Candidate:
        t = time.perf_counter()
        blob, facts = encode(model, k)
        encode_s = time.perf_counter() - t
        out = ctx.work / f"kmeans_k{k}.kmh"
        out.write_bytes(blob)
        decoded = ctx.work / f"kmeans_k{k}.onnx"
        onnx.save(decode(blob), str(decoded))
        return Candidate(f"k={k}", out, len(blob), encode_s, decoded, extra=facts)

    ks = list(C.KMEANS_KS[:3] if ctx.smoke else C.KMEANS_KS)
    return sweep(ctx, ks, one, midpoint=_midpoint, bisect=True)


def _midpoint(a: int, b: int) -> int | None:
    m = int(round((a * b) ** 0.5))
    return m if a < m < b else None


def load_session(path: Path):
    from ..fidelity import session

    return session(decode(path.read_bytes()).SerializeToString())
