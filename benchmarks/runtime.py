"""Runtime benchmark: decode throughput, peak RSS and load time of ``.moub`` -> session.

For a ~20 M-weight transformer-shaped model built with ``onnx.helper`` and for
the real models that ship in PyPI wheels (magika, rapidocr cls/rec/det), each
quantized with equal-width bins (k = 256, float tensors of >= 1024 elements):

* decode throughput: Huffman-coded weights decoded per second on ONE core
  (process CPU time, ``decode_workers=1``), in the windows ``InferenceSession``
  uses, and in the smaller windows of ``load`` and streaming ``decode_tensors``.
  ``--reference`` adds a baseline: bitarray's ``canonical_decode``, chunk by chunk, on the
  same file, and on the same model in the baseline layout (65536-element chunks, codes up
  to 20 bits; reported as "before"), plus the lane decoder on that baseline file;
* peak RSS of ``.moub`` -> ``moub_runtime.InferenceSession`` in a fresh
  subprocess (default arguments), counted above the RSS right after importing
  numpy, onnx and onnxruntime (importing moub_runtime is counted against the
  load), next to the same figure for ``.onnx`` -> ``onnxruntime.InferenceSession``,
  and the RSS once the session exists;
* load time ``.moub`` -> session against ``.onnx`` -> session, best of a few, two ways:
  with default arguments on both sides (onnxruntime's default threads; moub's
  default ``decode_workers``, one thread per core up to 4: checksums and output
  copies beside the decoding thread), as wall time: what a user waits;
  and on one core (one intra-op and one inter-op thread, ``decode_workers=1``),
  as process CPU time, which other processes on a shared machine do not inflate.

Targets: >= 25 M weights/s on one core; peak RSS <= 1.3 x decoded
fp32 size + 64 MB; load time <= 2 x the plain ONNX load (judged on the wall
time with default arguments; the one-core CPU ratio is reported beside it).

Then, per model, normal against compact sessions (``moub_runtime.InferenceSession(compact=...)``)
on an adaptive-layout file whose levels fit int8 (as ``--ram int8`` writes), and for models with
MatMul/Gemm weights one whose such weights fit 4 bits (``--ram int4``): resident weight
bytes, peak RSS above the imports, load time, latency per sample on one thread and on
onnxruntime's default threads, which weights run as MatMulNBits (4 bits, packed)
and which run at every inference, and the outputs against the normal session.

Run: ``.venv/bin/python -m benchmarks.runtime [--models synthetic,magika,...]``; ``--compact``
for the compact section only, ``--no-compact`` without it.
Writes ``benchmarks/out/runtime.json`` (``compact.json`` with ``--compact``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "runtime"
OUT = ROOT / "out"
BINS = 256
MIN_ELEMENTS = 1024
CACHE_VERSION = "2"       # bump when the synthetic model or the encoding changes
MODELS = ("synthetic", "magika", "cls", "rec", "det")
TARGET_WEIGHTS_PER_S = 25e6
TARGET_RSS_FACTOR, TARGET_RSS_CONSTANT = 1.3, 64 * 2**20
TARGET_LOAD_RATIO = 2.0

# ---------------------------------------------------------------- models


def transformer_model(seed: int = 0, vocab: int = 8192, d: int = 512, layers: int = 6, ff: int = 1536, seq: int = 32):
    """A transformer-shaped graph: embedding Gather, then pre-LN blocks of single-head
    attention and a GELU-ish MLP; weights random with realistic scales
    (N(0, 0.02) matrices, LayerNorm gains near 1, small biases). About 20 M weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits: list = []

    def weight(name: str, shape: tuple[int, ...], scale: float = 0.02, mean: float = 0.0) -> str:
        values = (rng.standard_normal(shape) * scale + mean).astype(np.float32)
        inits.append(numpy_helper.from_array(values, name))
        return name

    nodes = [helper.make_node("Gather", [weight("embed", (vocab, d)), "ids"], ["h0"])]
    h = "h0"
    inv_sqrt_d = numpy_helper.from_array(np.array(1.0 / np.sqrt(d), np.float32), "inv_sqrt_d")
    inits.append(inv_sqrt_d)
    for i in range(layers):
        p = f"l{i}."
        g1, b1 = weight(p + "ln1.g", (d,), 0.05, 1.0), weight(p + "ln1.b", (d,), 0.02)
        nodes.append(helper.make_node("LayerNormalization", [h, g1, b1], [p + "x"], axis=-1))
        for proj in ("q", "k", "v"):
            nodes.append(helper.make_node("MatMul", [p + "x", weight(p + "W" + proj, (d, d))], [p + proj]))
        nodes += [
            helper.make_node("Transpose", [p + "k"], [p + "kt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", [p + "q", p + "kt"], [p + "s0"]),
            helper.make_node("Mul", [p + "s0", "inv_sqrt_d"], [p + "s"]),
            helper.make_node("Softmax", [p + "s"], [p + "a"], axis=-1),
            helper.make_node("MatMul", [p + "a", p + "v"], [p + "c"]),
            helper.make_node("MatMul", [p + "c", weight(p + "Wo", (d, d))], [p + "o"]),
            helper.make_node("Add", [h, p + "o"], [p + "r1"]),
        ]
        g2, b2 = weight(p + "ln2.g", (d,), 0.05, 1.0), weight(p + "ln2.b", (d,), 0.02)
        nodes += [
            helper.make_node("LayerNormalization", [p + "r1", g2, b2], [p + "y"], axis=-1),
            helper.make_node("MatMul", [p + "y", weight(p + "W1", (d, ff))], [p + "f0"]),
            helper.make_node("Add", [p + "f0", weight(p + "b1", (ff,), 0.01)], [p + "f1"]),
            helper.make_node("Relu", [p + "f1"], [p + "f2"]),
            helper.make_node("MatMul", [p + "f2", weight(p + "W2", (ff, d))], [p + "f3"]),
            helper.make_node("Add", [p + "f3", weight(p + "b2", (d,), 0.01)], [p + "f4"]),
            helper.make_node("Add", [p + "r1", p + "f4"], [p + "out"]),
        ]
        h = p + "out"
    nodes.append(helper.make_node("MatMul", [h, "embed_t"], ["logits"]))
    embed_t = numpy_helper.to_array(inits[0]).T.copy()
    inits.append(numpy_helper.from_array((embed_t[:, :1024] * 1.0).astype(np.float32), "embed_t"))
    graph = helper.make_graph(
        nodes,
        "transformer",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, seq, 1024])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="moub-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def real_model_path(name: str) -> Path:
    from .models import model_path

    return model_path(name)


def equal_width(model, k: int = BINS, min_elements: int = MIN_ELEMENTS):
    """One pooled codebook of k equal-width bins (member means) over every float
    tensor site with at least ``min_elements`` values; (codebook, {path: assignment})."""
    from moub_converters.encode import TensorAssignment
    from onnx import numpy_helper

    from moub_format import dtypes
    from moub_runtime.sites import iter_tensor_sites

    sites = []
    for site in iter_tensor_sites(model):
        count = 1
        for dim in site.tensor.dims:
            count *= int(dim)
        if site.tensor.data_type in dtypes.FLOAT_DTYPES and count >= min_elements:
            sites.append(site)
    arrays = {s.path: np.asarray(numpy_helper.to_array(s.tensor), dtype=np.float32).ravel() for s in sites}
    pooled = np.concatenate(list(arrays.values()))
    lo, hi = float(pooled.min()), float(pooled.max())

    def bins(values: np.ndarray) -> np.ndarray:
        return np.clip(((values.astype(np.float64) - lo) / (hi - lo) * k).astype(np.int64), 0, k - 1)

    pooled_bins = bins(pooled)
    counts = np.bincount(pooled_bins, minlength=k)
    used = np.flatnonzero(counts)
    remap = np.full(k, -1, dtype=np.int64)
    remap[used] = np.arange(used.size)
    codebook = (np.bincount(pooled_bins, weights=pooled, minlength=k)[used] / counts[used]).astype(np.float32)
    return codebook, {p: TensorAssignment(0, remap[bins(a)]) for p, a in arrays.items()}


def prepare(name: str) -> tuple[Path, Path]:
    """(.onnx, .moub) paths for a benchmark model, built and cached on first use."""
    import onnx
    from moub_converters.encode import encode_model

    from moub_format.writer import write_atomic

    folder = CACHE / f"v{CACHE_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    if name == "synthetic":
        onnx_path = folder / "transformer.onnx"
        if not onnx_path.exists():
            tmp = onnx_path.with_suffix(".tmp")
            onnx.save_model(transformer_model(), tmp)
            os.replace(tmp, onnx_path)
    else:
        onnx_path = real_model_path(name)
    moub_path = folder / f"{name}.moub"
    if not moub_path.exists():
        model = onnx.load(onnx_path)
        codebook, assignments = equal_width(model)
        write_atomic(moub_path, encode_model(model, [codebook], assignments, {"moub.benchmark": "runtime"}))
    return onnx_path, moub_path


ADAPTIVE_DIVISOR = 16.0  # step = std / this: levels spread over a few hundred values, like the adaptive mode's


def adaptive_packs(model, divisor: float = ADAPTIVE_DIVISOR, min_elements: int = MIN_ELEMENTS, ram: str = "float"):
    """What the adaptive mode writes, without its search: every float tensor site with at
    least ``min_elements`` values is one pack over its own grid codebook, levels
    ``round(x / step)`` with ``step = std / divisor``, no finer than the converter's ``--ram``
    floor for ``ram`` (int8: every tensor's levels span at most 256 values; int4: a weight one MatMul
    or Gemm alone reads at most 16); (codebooks, packs)."""
    from moub_converters.uniform import RAM_LEVEL_LIMITS

    from moub_converters.encode import PackAssignment
    from onnx import numpy_helper

    from moub_format import dtypes
    from moub_format.writer import OWN, GridCodebook
    from moub_runtime.compact import four_bit_weights, target_name
    from moub_runtime.sites import iter_tensor_sites

    limit = RAM_LEVEL_LIMITS[ram]
    sites = list(iter_tensor_sites(model))
    main = {name: site for site in sites if (name := target_name(site)) is not None}   # initializers and Constants
    four_bit_names = four_bit_weights(model.graph, {name: list(site.tensor.dims) for name, site in main.items()})
    four_bit = {main[name].path for name in four_bit_names}
    codebooks, packs = [], []
    for site in sites:
        count = 1
        for dim in site.tensor.dims:
            count *= int(dim)
        if site.tensor.data_type not in dtypes.FLOAT_DTYPES or count < min_elements:
            continue
        x = np.asarray(numpy_helper.to_array(site.tensor), dtype=np.float32).ravel()
        std = float(np.std(x.astype(np.float64)))
        step = std / divisor if std > 0 else 1.0
        if limit.levels is not None:
            window = limit.four_bit_levels if limit.four_bit_levels and site.path in four_bit else limit.levels
            span = max(float(x.max()) - float(x.min()), float(np.abs(x).max()))
            step = max(step, span / (window - 2))
        step = np.float32(step)
        levels = np.rint(x / step).astype(np.int64)
        first = int(levels.min())
        codebooks.append(GridCodebook(first, int(levels.max()) - first + 1))
        packs.append(PackAssignment((site.path,), (float(step),), levels - first, len(codebooks) - 1, OWN))
    return codebooks, packs


def prepare_adaptive(name: str, ram: str = "float") -> tuple[Path, Path]:
    """(.onnx, .moub) for a benchmark model in the adaptive layout (:func:`adaptive_packs`, with
    the ``--ram`` floor ``ram``), built and cached on first use: the files a compact session can
    hold as integers."""
    import onnx
    from moub_converters.encode import encode_model

    from moub_format.writer import write_atomic

    onnx_path = prepare(name)[0] if name == "synthetic" else real_model_path(name)
    folder = CACHE / f"v{CACHE_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    moub_path = folder / (f"{name}.adaptive.moub" if ram == "float" else f"{name}.adaptive-{ram}.moub")
    if not moub_path.exists():
        model = onnx.load(onnx_path)
        codebooks, packs = adaptive_packs(model, ram=ram)
        write_atomic(moub_path, encode_model(model, codebooks, {}, {"moub.benchmark": "runtime adaptive"}, packs=packs))
    return onnx_path, moub_path


# ---------------------------------------------------------------- measurements


def _decode_all(moub) -> int:
    """Decode every stored tensor and pack member once; return the
    Huffman-coded weights among them."""
    from moub_format import constants as C

    for _tensor, _array in moub.iter_tensors():
        pass
    for _member, _array in moub.iter_pack_members():
        pass
    return sum(t.n_elements for t in moub.index.tensors if t.encoding == C.ENCODING_HUFFMAN) + sum(
        p.n_elements for p in moub.index.packs
    )


def decode_throughput(moub_path: Path, repeats: int = 3, reference: bool = False) -> dict:
    """Best-of-``repeats`` Huffman weights/s of the lane decoder on the calling thread
    (process CPU time, so other processes on the machine do not count), in the windows
    of ``InferenceSession`` and in those of ``load`` and streaming ``decode_tensors``."""
    from moub_format import MoubFile
    from moub_format import constants as C
    from moub_format.reader import DECODE_BATCH_ELEMENTS
    from moub_runtime.loader import SESSION_BATCH_ELEMENTS

    result: dict = {}
    for key, batch in (("", SESSION_BATCH_ELEMENTS), ("streaming_", DECODE_BATCH_ELEMENTS)):
        with MoubFile(moub_path, batch_elements=batch, decode_workers=1) as moub:
            best_cpu = best_wall = float("inf")
            for _ in range(repeats):
                moub._lookups.clear()
                moub._value_tables.clear()
                wall, cpu = time.perf_counter(), time.process_time()
                weights = _decode_all(moub)
                best_cpu = min(best_cpu, time.process_time() - cpu)
                best_wall = min(best_wall, time.perf_counter() - wall)
        result[key + "weights"] = weights
        result[key + "seconds_cpu"] = best_cpu
        result[key + "seconds_wall"] = best_wall
        result[key + "weights_per_s"] = weights / best_cpu if best_cpu else float("inf")
    if reference:
        with MoubFile(moub_path) as moub:
            huff = [t for t in moub.index.tensors if t.encoding == C.ENCODING_HUFFMAN]
            result["reference_weights_per_s"] = _reference_throughput(moub, huff)
        name = moub_path.stem
        old = old_style_file(name)
        with MoubFile(old, batch_elements=SESSION_BATCH_ELEMENTS, decode_workers=1) as moub:
            huff = [t for t in moub.index.tensors if t.encoding == C.ENCODING_HUFFMAN]
            result["before_weights_per_s"] = _reference_throughput(moub, huff)  # baseline decoder on the baseline layout
            cpu = time.process_time()
            weights = _decode_all(moub)
            result["old_file_weights_per_s"] = weights / (time.process_time() - cpu)
    return result


def old_style_file(name: str) -> Path:
    """The model in the baseline layout, for a decoder that reads chunk by chunk: 65536-element
    chunks and codes of up to 20 bits (cached)."""
    import onnx
    from moub_converters.encode import container_specs

    from moub_format import huffman, writer

    path = CACHE / f"v{CACHE_VERSION}" / f"{name}.old.moub"
    if not path.exists():
        onnx_path, _ = prepare(name)
        model = onnx.load(onnx_path)
        codebook, assignments = equal_width(model)
        graph, specs = container_specs(model, assignments)
        freq = np.zeros(codebook.size, dtype=np.int64)
        for spec in specs:
            if isinstance(spec, writer.HuffmanTensor):
                freq += np.bincount(spec.indices, minlength=codebook.size)
        tables = [huffman.code_lengths(freq, 20)]
        writer.write_atomic(path, writer.build(graph, [codebook], specs, {}, tables=tables, chunk_elements=65536))
    return path


def _reference_throughput(moub, tensors) -> float:
    """bitarray canonical_decode chunk by chunk: the baseline the lane decoder is measured against."""
    from moub_format.huffman import CanonicalDecoder

    weights = sum(t.n_elements for t in tensors)
    cpu = time.process_time()
    decoders: dict[int, CanonicalDecoder] = {}
    for tensor in tensors:
        decoder = decoders.setdefault(tensor.table, CanonicalDecoder(moub.index.tables[tensor.table]))
        data = moub.stored_bytes(tensor.data)
        position = 0
        for c, bits in enumerate(tensor.chunk_bits):
            count = min(tensor.chunk_elements, tensor.n_elements - c * tensor.chunk_elements)
            length = (bits + 7) // 8
            decoder.decode(data[position : position + length], bits, count)
            position += length
    return weights / (time.process_time() - cpu)


_RSS_CHILD = r"""
import json, sys, time
import numpy, onnx, onnxruntime

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
except OSError:
    pass
base = status("VmRSS")
kind, path = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if kind != "onnx":  # default options: the decoded arrays are freed once onnxruntime has its copy
    import moub_runtime
    session = moub_runtime.InferenceSession(path, compact={"moub": False, "normal": False, "compact": True, "smallest": "smallest"}[kind])
else:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
seconds = time.perf_counter() - start
figures = {"base": base, "peak": status("VmHWM"), "after": status("VmRSS"), "seconds": seconds}
if len(sys.argv) > 3:  # then run it: some kernels (onnxruntime's 8-bit MatMulNBits) allocate at the first runs
    with numpy.load(sys.argv[3]) as feed:
        feed = dict(feed)
    for _ in range(int(sys.argv[4])):
        session.run(None, feed)
    figures["peak_with_runs"] = status("VmHWM")
print(json.dumps(figures))
"""
RSS_RUNS = 10  # inferences after loading in the peak-RSS child of the compact table


def peak_rss(kind: str, path: Path, feed: dict[str, np.ndarray] | None = None, runs: int = RSS_RUNS) -> dict:
    """Peak RSS of loading ``path`` into a session, in a fresh interpreter, above its RSS right
    after importing numpy, onnx and onnxruntime; with ``feed``, also the peak once the session
    has run it ``runs`` times (``peak_with_runs_above_base``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT.parent))
    with tempfile.TemporaryDirectory(prefix="moub-rss-") as folder:
        extra = []
        if feed is not None:
            np.savez(Path(folder) / "feed.npz", **feed)
            extra = [str(Path(folder) / "feed.npz"), str(runs)]
        result = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, kind, str(path), *extra], capture_output=True, text=True, env=env,
            check=True
        )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["peak_above_base"] = figures["peak"] - figures["base"]
    if "peak_with_runs" in figures:
        figures["peak_with_runs_above_base"] = figures["peak_with_runs"] - figures["base"]
    return figures


def load_times(onnx_path: Path, moub_path: Path, repeats: int = 5) -> dict:
    """Best-of-``repeats`` time of path -> session for both formats, interleaved:

    * ``default``: default arguments on both sides (onnxruntime's own thread
      settings; moub's default decode_workers), wall time and process
      CPU time (all threads);
    * ``one_core``: one intra-op and one inter-op thread, moub decoding on the calling
      thread only (``decode_workers=1``), process CPU time and wall time. On an idle
      machine the two agree; on a shared one CPU time is the stable figure.
    """
    import onnxruntime

    import moub_runtime

    def one_thread():
        o = onnxruntime.SessionOptions()
        o.intra_op_num_threads = 1
        o.inter_op_num_threads = 1
        return o

    runs = {
        "default": (lambda: onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]),
                    lambda: moub_runtime.InferenceSession(moub_path)),
        "one_core": (lambda: onnxruntime.InferenceSession(str(onnx_path), sess_options=one_thread(),
                                                          providers=["CPUExecutionProvider"]),
                     lambda: moub_runtime.InferenceSession(moub_path, sess_options=one_thread(), decode_workers=1)),
    }
    best = {f"{mode}_{kind}_{clock}": float("inf") for mode in runs for kind in ("onnx", "moub") for clock in ("wall", "cpu")}
    moub_runtime.InferenceSession(moub_path)  # one-time probe and imports
    for _ in range(repeats):
        for mode, (plain, moub) in runs.items():
            for kind, make in (("onnx", plain), ("moub", moub)):
                wall, cpu = time.perf_counter(), time.process_time()
                session = make()
                best[f"{mode}_{kind}_cpu"] = min(best[f"{mode}_{kind}_cpu"], time.process_time() - cpu)
                best[f"{mode}_{kind}_wall"] = min(best[f"{mode}_{kind}_wall"], time.perf_counter() - wall)
                del session
    for mode in runs:
        for clock in ("wall", "cpu"):
            best[f"{mode}_ratio_{clock}"] = best[f"{mode}_moub_{clock}"] / best[f"{mode}_onnx_{clock}"]
    return best


def decoded_fp32_bytes(moub_path: Path) -> int:
    """Bytes of every stored tensor and pack member decoded, counting float ones at 4
    bytes per element, plus the graph (what the decoded .onnx holds)."""
    from moub_format import MoubFile, dtypes

    with MoubFile(moub_path) as moub:
        total = moub.index.graph.decoded_length
        for t in moub.index.tensors:
            total += t.n_elements * (4 if t.dtype in dtypes.FLOAT_DTYPES else dtypes.STORAGE_DTYPES[t.dtype].itemsize)
        total += 4 * sum(p.n_elements for p in moub.index.packs)  # pack members are float
    return total


# ---------------------------------------------------------------- compact sessions

# One input per model for the latency figures (random, of the shape the bench's data has).
SAMPLE_SHAPES = {"cls": (1, 3, 48, 192), "rec": (1, 3, 48, 320), "det": (1, 3, 320, 320)}
# The sessions the compact section compares: plain .onnx, normal .moub, and a .moub in each compact mode.
SESSION_KINDS = ("onnx", "normal", "compact", "smallest")
COMPACT_ARGUMENT = {"compact": True, "smallest": "smallest"}   # kind -> InferenceSession's compact=
COMPACT_RAM = "int8"   # the compact section's files: levels within int8, as the converter's --ram int8 writes


def sample_feed(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if name == "magika":
        return {"bytes": rng.integers(0, 257, (1, 2048)).astype(np.int32)}
    if name == "synthetic":
        return {"ids": rng.integers(0, 8192, (1, 32)).astype(np.int64)}
    return {"x": rng.standard_normal(SAMPLE_SHAPES[name]).astype(np.float32)}


def latencies(makers: dict, feed: dict, threads: int | None, runs: int) -> dict[str, float]:
    """Median seconds per run of one sample for each session kind, with ``threads`` intra-op
    threads (None: onnxruntime's default), after two warm-up runs; the kinds take turns run by
    run, so that load from other processes falls on all of them alike."""
    import onnxruntime

    def options() -> onnxruntime.SessionOptions:  # one per session: moub_runtime writes entries into it
        o = onnxruntime.SessionOptions()
        if threads is not None:
            o.intra_op_num_threads = threads
            o.inter_op_num_threads = 1
        return o

    sessions = {kind: make(options()) for kind, make in makers.items()}
    for session in sessions.values():
        for _ in range(2):
            session.run(None, feed)
    times: dict[str, list[float]] = {kind: [] for kind in sessions}
    for _ in range(runs):
        for kind, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[kind].append(time.perf_counter() - start)
    return {kind: float(np.median(values)) for kind, values in times.items()}


def optimized_ops(moub_path: Path, compact: bool | str) -> dict:
    """What onnxruntime made of a compact session's DequantizeLinear nodes: its optimized model
    (``SessionOptions.optimized_model_filepath``, extended level: the hardware-independent
    fusions) counted by op, and the ops that still read a DequantizeLinear at every run."""
    import tempfile
    from collections import Counter

    import onnx
    import onnxruntime

    import moub_runtime

    with tempfile.TemporaryDirectory() as tmp:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        moub_runtime.InferenceSession(moub_path, sess_options=options, compact=compact)
        model = onnx.load(options.optimized_model_filepath, load_external_data=False)
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    readers = Counter(n.op_type for n in model.graph.node for name in n.input if name in dequantized)
    return {"DequantizeLinear": len(dequantized), "MatMulNBits": sum(n.op_type == "MatMulNBits" for n in model.graph.node),
            "dequantized_for": dict(sorted(readers.items()))}


def compact_measure(name: str, repeats: int, ram: str = COMPACT_RAM) -> dict:
    """Plain .onnx, normal and compact sessions (both modes) on one model's adaptive-layout file
    (``--ram`` floor ``ram``): resident weight bytes, peak RSS, load time, latency, fusions,
    outputs against the normal session."""
    import onnxruntime

    import moub_runtime
    from moub_runtime.compact import plan_compact
    from moub_runtime.conv_layout import compact_mode_here
    from moub_runtime.loader import consumed_names
    from moub_runtime.validation import open_checked

    onnx_path, moub_path = prepare_adaptive(name, ram)
    with open_checked(moub_path) as checked:
        consumed = consumed_names(checked.model)
        modes = {kind: compact_mode_here(argument) for kind, argument in COMPACT_ARGUMENT.items()}
        plans = {kind: plan_compact(checked, consumed, mode).summary(checked.members) for kind, mode in modes.items()}
        quantized = sum(m.count for p in checked.moub.index.packs for m in p.members)
    kinds = [k for k in SESSION_KINDS if k != "smallest" or plans["smallest"] != plans["compact"]]
    row: dict = {"model": name, "ram": ram, "quantized_weights": quantized, "kinds": kinds, "compact_mode": modes["compact"],
                 "plans": {k: v for k, v in plans.items() if k in kinds}}
    row["resident_weight_bytes"] = {"onnx": 4 * quantized, "normal": 4 * quantized}
    for kind, plan in row["plans"].items():
        kept = sum(v["weights"] for v in plan["kept_float"].values())
        row["resident_weight_bytes"][kind] = plan["held_weight_bytes"] + 4 * kept
    row["rss"] = {kind: peak_rss(kind, onnx_path if kind == "onnx" else moub_path, sample_feed(name)) for kind in kinds}
    makers = {
        "onnx": lambda o=None: onnxruntime.InferenceSession(str(onnx_path), sess_options=o, providers=["CPUExecutionProvider"]),
        "normal": lambda o=None: moub_runtime.InferenceSession(moub_path, sess_options=o),
        **{kind: (lambda o=None, c=COMPACT_ARGUMENT[kind]: moub_runtime.InferenceSession(moub_path, sess_options=o, compact=c))
           for kind in kinds if kind in COMPACT_ARGUMENT},
    }
    for make in makers.values():
        make()  # imports, the one-time probe
    loads: dict[str, list[float]] = {kind: [] for kind in makers}
    for _ in range(repeats):
        for kind, make in makers.items():
            start = time.perf_counter()
            make()
            loads[kind].append(time.perf_counter() - start)
    row["load_s"] = {kind: min(times) for kind, times in loads.items()}
    feed = sample_feed(name)
    runs = max(20, 8 * repeats)
    row["latency_s"] = {label: latencies(makers, feed, threads, runs) for label, threads in (("1_thread", 1), ("default", None))}
    expected = makers["normal"]().run(None, feed)
    row["outputs"], row["optimized"] = {}, {}
    for kind in row["plans"]:
        got = makers[kind]().run(None, feed)
        row["outputs"][kind] = {
            "bit_identical": all(np.array_equal(a, b) for a, b in zip(expected, got)),
            "max_relative_difference": max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)) for a, b in zip(expected, got)),
        }
        row["optimized"][kind] = optimized_ops(moub_path, COMPACT_ARGUMENT[kind])
    return row


def format_compact_table(rows: list[dict]) -> list[str]:
    """One line per model and session kind, then per compact kind what it holds, what onnxruntime fused
    and how its outputs compare with the normal session's."""
    ram = rows[0]["ram"] if rows else COMPACT_RAM
    floor = "" if ram == "float" else f", no finer than --ram {ram}'s floor"
    mode = rows[0]["compact_mode"] if rows else "?"
    lines = [
        "Normal against compact sessions (adaptive-layout files: every float tensor of >= 1024 values one pack, "
        f"step = std/{ADAPTIVE_DIVISOR:g}{floor}). compact = compact=True ('{mode}' with this onnxruntime; 'fast' keeps "
        "grouped Convs' weights float32), smallest = compact='smallest' (shown where it differs). "
        "Latency: median per sample, the sessions taking turns.",
        f"{'model':9} {'session':9} {'resident weights':>19} {'peak RSS above imports, MB':>27} {'load':>8} "
        f"{'latency 1 thread':>18} {'latency default thr.':>21}",
        f"{'':9} {'':9} {'MB':>8} {'B/weight':>10} {'loaded':>13} {f'+{RSS_RUNS} runs':>13} {'ms':>8} {'ms':>9} "
        f"{'x normal':>8} {'ms':>10} {'x normal':>10}",
    ]
    for r in rows:
        one, default = r["latency_s"]["1_thread"], r["latency_s"]["default"]
        for kind in r["kinds"]:
            resident = r["resident_weight_bytes"][kind]
            lines.append(
                f"{r['model']:9} {kind:9} {resident / 2**20:8.2f} {resident / r['quantized_weights']:10.2f} "
                f"{r['rss'][kind]['peak_above_base'] / 2**20:13.1f} "
                f"{r['rss'][kind].get('peak_with_runs_above_base', float('nan')) / 2**20:13.1f} {r['load_s'][kind] * 1e3:8.1f} "
                f"{one[kind] * 1e3:9.2f} {one[kind] / one['normal']:8.2f} {default[kind] * 1e3:10.2f} {default[kind] / default['normal']:10.2f}"
            )
        for kind, plan in r["plans"].items():
            held = ", ".join(f"{v['tensors']} as {k}" for k, v in sorted(plan["held"].items())) or "nothing"
            kept = "; ".join(f"{v['tensors']} {k}" for k, v in sorted(plan["kept_float"].items())) or "none"
            o, out = r["optimized"][kind], r["outputs"][kind]
            same = "bit-identical" if out["bit_identical"] else f"max relative difference {out['max_relative_difference']:.2g}"
            lines.append(
                f"{'':9} {kind}: held {held}; kept float32: {kept}. {o['MatMulNBits']} MatMulNBits (4-bit weights kept packed); "
                f"{o['DequantizeLinear']} DequantizeLinear run at every inference, for {o['dequantized_for']}. Outputs vs normal: {same}"
            )
    return lines


# ---------------------------------------------------------------- driver


def converter_bench_file(name: str) -> Path | None:
    """The smallest default-mode (``moub_best``) file the converter bench wrote for this
    model in this run's output folder, if any: the k = 256 files above have one code
    table, while the converter's default writes a table per pack, and its load depends on
    how the reader interleaves many tables' lanes: these are the files users get."""
    folder = OUT / "full" / name / "moub_best"
    files = sorted(folder.glob("*.moub")) if folder.is_dir() else []
    return min(files, key=lambda f: (f.stat().st_size, f.name)) if files else None


def measure(name: str, repeats: int, reference: bool) -> dict:
    onnx_path, moub_path = prepare(name)
    row: dict = {"model": name, "onnx_bytes": onnx_path.stat().st_size, "moub_bytes": moub_path.stat().st_size}
    row["decode"] = decode_throughput(moub_path, repeats, reference)
    decoded = decoded_fp32_bytes(moub_path)
    row["decoded_fp32_bytes"] = decoded
    rss_moub = peak_rss("moub", moub_path)
    rss_onnx = peak_rss("onnx", onnx_path)
    row["rss"] = {"moub": rss_moub, "onnx": rss_onnx,
                  "limit": TARGET_RSS_FACTOR * decoded + TARGET_RSS_CONSTANT}
    row["load"] = load_times(onnx_path, moub_path, repeats)
    row["targets"] = {
        "throughput": row["decode"]["weights_per_s"] >= TARGET_WEIGHTS_PER_S,
        "rss": rss_moub["peak_above_base"] <= row["rss"]["limit"],
        "load": row["load"]["default_ratio_wall"] <= TARGET_LOAD_RATIO,
        "load_one_core": row["load"]["one_core_ratio_cpu"] <= TARGET_LOAD_RATIO,
    }
    default_file = converter_bench_file(name) if name != "synthetic" else None
    if default_file is not None:
        row["load_default_mode"] = {"file": str(default_file.relative_to(ROOT.parent)),
                                    **load_times(onnx_path, default_file, repeats)}
        row["targets"]["load_default_mode"] = row["load_default_mode"]["default_ratio_wall"] <= TARGET_LOAD_RATIO
    return row


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def format_table(rows: list[dict]) -> list[str]:
    lines = [
        f"{'':10} {'':9} {'decode M/s, 1 core':>18} {'peak RSS above base, MB':>25}   "
        f"{'load, defaults (wall ms)':>24}   {'load, one core (CPU ms)':>23}",
        f"{'model':10} {'weights':>9} {'session':>8} {'stream':>9} {'moub':>7} {'limit':>7} {'onnx':>7}   "
        f"{'moub':>7} {'onnx':>7} {'ratio':>6}   {'moub':>7} {'onnx':>7} {'ratio':>5}  targets",
    ]
    for r in rows:
        ok = " ".join(f"{k}:{'ok' if v else 'MISSED'}" for k, v in r["targets"].items())
        load, dec = r["load"], r["decode"]
        lines.append(
            f"{r['model']:10} {dec['weights'] / 1e6:8.2f}M {dec['weights_per_s'] / 1e6:8.1f} "
            f"{dec['streaming_weights_per_s'] / 1e6:9.1f} {_mb(r['rss']['moub']['peak_above_base']):>7} "
            f"{_mb(r['rss']['limit']):>7} {_mb(r['rss']['onnx']['peak_above_base']):>7}   "
            f"{load['default_moub_wall'] * 1e3:7.1f} {load['default_onnx_wall'] * 1e3:7.1f} {load['default_ratio_wall']:6.2f}   "
            f"{load['one_core_moub_cpu'] * 1e3:7.1f} {load['one_core_onnx_cpu'] * 1e3:7.1f} {load['one_core_ratio_cpu']:5.2f}  {ok}"
        )
        if "load_default_mode" in r:
            d = r["load_default_mode"]
            lines.append(
                f"{'':10} default-mode file {d['file']}: load {d['default_moub_wall'] * 1e3:.1f} ms vs {d['default_onnx_wall'] * 1e3:.1f} "
                f"(ratio {d['default_ratio_wall']:.2f}); one core {d['one_core_moub_cpu'] * 1e3:.1f} vs "
                f"{d['one_core_onnx_cpu'] * 1e3:.1f} CPU ms (ratio {d['one_core_ratio_cpu']:.2f})"
            )
        if "before_weights_per_s" in dec:
            lines.append(
                f"{'':10} reference decoder {dec['reference_weights_per_s'] / 1e6:.1f} M/s; before (old decoder, old file) "
                f"{dec['before_weights_per_s'] / 1e6:.1f} M/s; today's reader on the old file {dec['old_file_weights_per_s'] / 1e6:.1f} M/s"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=7, help="best of this many runs")
    parser.add_argument("--reference", action="store_true", help="also time bitarray's decoder (the one used before)")
    parser.add_argument("--out", default=None, help="JSON output (default: benchmarks/out/runtime.json, or compact.json)")
    parser.add_argument("--compact", action="store_true",
                        help="only the normal against compact sessions section (peak RSS, resident weights, load, latency, "
                             "fusions on each model's adaptive-layout file)")
    parser.add_argument("--no-compact", action="store_true", help="skip the normal against compact sessions section")
    parser.add_argument("--ram", choices=("int8", "int4", "float"), default=COMPACT_RAM,
                        help="the compact section's files: levels within int8 (as --ram int8 writes), MatMul/Gemm weights' "
                             "within int4 (as --ram int4 writes), or std/16 steps only")
    args = parser.parse_args(argv)
    if args.compact:
        return compact_main(args)
    args.out = args.out or str(OUT / "runtime.json")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_start = os.getloadavg()
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        try:
            rows.append(measure(name, args.repeats, args.reference))
        except Exception as exc:  # a missing wheel must not hide the other rows
            if type(exc).__name__ != "ModelUnavailable":
                raise
            print(f"{name}: skipped ({exc})", file=sys.stderr)
    for line in format_table(rows):
        print(line)
    compact_tables = {} if args.no_compact else compact_tables_for(args.models, args.repeats, args.ram)
    for table in compact_tables.values():
        print()
        for line in format_compact_table(table):
            print(line)
    compact_rows = [row for table in compact_tables.values() for row in table]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load_end = os.getloadavg()
    out.write_text(json.dumps({"rows": rows, "compact_rows": compact_rows, "load_average_start": load_start,
                               "load_average": load_end, "cpus": os.cpu_count()}, indent=2) + "\n")
    print(f"wrote {out} (load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end, on {os.cpu_count()} CPUs)")
    return 0


def compact_rows_for(models: str, repeats: int, ram: str = COMPACT_RAM) -> list[dict]:
    """:func:`compact_measure` for each model whose wheel is installed."""
    rows = []
    for name in [m for m in models.split(",") if m]:
        try:
            rows.append(compact_measure(name, repeats, ram))
        except Exception as exc:  # a missing wheel must not hide the other rows
            if type(exc).__name__ != "ModelUnavailable":
                raise
            print(f"{name}: skipped ({exc})", file=sys.stderr)
    return rows


def holds_four_bits(row: dict) -> bool:
    """Whether a compact row's compact=True session holds any weight in 4 bits."""
    return any(kind in ("int4", "uint4") for kind in row["plans"]["compact"]["held"])


def compact_tables_for(models: str, repeats: int, ram: str) -> dict[str, list[dict]]:
    """The compact rows for ``ram``; with the default int8, also ``--ram int4`` rows for the models
    whose MatMul/Gemm weights a compact session then holds in 4 bits (the mode such models need)."""
    tables = {ram: compact_rows_for(models, repeats, ram)}
    if ram == COMPACT_RAM:
        tables["int4"] = [row for row in compact_rows_for(models, repeats, "int4") if holds_four_bits(row)]
    return {key: rows for key, rows in tables.items() if rows}


def compact_main(args: argparse.Namespace) -> int:
    load_start = os.getloadavg()
    tables = compact_tables_for(args.models, args.repeats, args.ram)
    for index, table in enumerate(tables.values()):
        if index:
            print()
        for line in format_compact_table(table):
            print(line)
    rows = [row for table in tables.values() for row in table]
    out = Path(args.out or OUT / "compact.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    load_end = os.getloadavg()
    print(f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end, on {os.cpu_count()} CPUs")
    out.write_text(json.dumps({"rows": rows, "load_average_start": load_start, "load_average": load_end, "cpus": os.cpu_count(),
                               "onnxruntime": __import__("onnxruntime").__version__}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
