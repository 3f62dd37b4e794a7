"""NNCodec, Fraunhofer HHI's reference implementation of MPEG Neural Network Coding (ISO/IEC 15938-17):
uniform quantisation with dependent quantisation and DeepCABAC arithmetic coding.

NNCodec pins numpy<2 and drags in torch, torchvision, pandas and h5py, none of which array coding
uses, so it lives in its own virtual environment under benchmarks/.cache (built once from the PyPI
sdist with `pip install --no-deps`) and runs as a subprocess (nncodec_worker.py).

Every pooled weight tensor (the same pool as the other lossy peers) is coded in one NNC bitstream
with one qp (NNCodec's own defaults otherwise); the sweep runs over qp. File layout:
    b"NNC1" | u32 n | zstd(graph) in n bytes (the ONNX model, pooled payloads removed) | NNC bitstream
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from .. import config as C
from . import Candidate, Context, Unavailable, sweep
from .weights import fill, load_lifted, pack_graph, pool_arrays, pool_names, strip, unpack_graph

METHOD = f"NNCodec {C.NNCODEC_VERSION} (MPEG NNC, DeepCABAC)"
MAGIC = b"NNC1"
WORKER = Path(__file__).with_name("nncodec_worker.py")
SETUP_TIMEOUT_S = 1200
CODE_TIMEOUT_S = 900


def _python() -> Path:
    return C.NNCODEC_VENV / "bin" / "python"


def _works() -> bool:
    if not _python().is_file():
        return False
    probe = subprocess.run([str(_python()), "-c", "import nncodec.extensions.deepCABAC"],
                           capture_output=True, timeout=120, cwd=tempfile.gettempdir())
    return probe.returncode == 0


def ensure_venv(log=print) -> float:
    """Build NNCodec's environment if it is missing; returns the seconds spent (0 when cached)."""
    if _works():
        return 0.0
    t = time.perf_counter()
    log(f"  nncodec: building its environment in {C.NNCODEC_VENV} (once; a few minutes)")
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(C.NNCODEC_VENV)],
        [str(_python()), "-m", "pip", "install", "-q", "numpy<2"],
        [str(_python()), "-m", "pip", "install", "-q", "--no-deps", f"nncodec=={C.NNCODEC_VERSION}"],
    ]
    for cmd in steps:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SETUP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"setting up NNCodec timed out after {SETUP_TIMEOUT_S} s: {' '.join(cmd[2:])}") from None
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            why = lines[-1][:200] if lines else f"exit {proc.returncode}"
            raise Unavailable(f"NNCodec {C.NNCODEC_VERSION} could not be installed ({' '.join(cmd[2:])}): {why}")
    if not _works():
        raise Unavailable(f"NNCodec {C.NNCODEC_VERSION} installed but its DeepCABAC extension does not import")
    return time.perf_counter() - t


def _worker(*args: str) -> dict:
    cmd = [str(_python()), str(WORKER), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CODE_TIMEOUT_S,
                              cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        raise Unavailable(f"NNCodec {args[0]} timed out after {CODE_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise Unavailable(f"NNCodec {args[0]} failed: {lines[-1][:200] if lines else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decode(path: Path) -> onnx.ModelProto:
    """The runnable model from a file of this peer (decodes the bitstream with NNCodec)."""
    blob = path.read_bytes()
    if blob[:4] != MAGIC:
        raise ValueError(f"{path}: not an NNC1 file")
    graph, pos = unpack_graph(blob, 4)
    stripped = onnx.ModelProto()
    stripped.ParseFromString(graph)
    names = pool_names(stripped)
    with tempfile.TemporaryDirectory() as tmp:
        bits, out = Path(tmp) / "w.nnc", Path(tmp) / "w.npz"
        bits.write_bytes(blob[pos:])
        _worker("decode", str(bits), str(out))
        with np.load(out) as z:
            arrays = {name: z[f"t{i}"] for i, name in enumerate(names)}
    return fill(graph, arrays)


def run(ctx: Context) -> list[Candidate]:
    if ctx.smoke and not _works():
        raise Unavailable(f"skipped: {C.NNCODEC_VENV.name} is not built and --smoke does not build it "
                          "(`make bench` or `python -m benchmarks.peers.nncodec` does)")
    setup_s = ensure_venv()
    model = load_lifted(ctx.onnx_path)
    if not pool_names(model):
        raise Unavailable(f"no float32/float16 weight tensor of >= {C.MIN_ELEMENTS} values to code")
    t = time.perf_counter()
    names = pool_names(model)
    arrays = pool_arrays(model)
    graph = pack_graph(strip(model, names))
    prep_s = time.perf_counter() - t
    src = ctx.work / "pool.npz"
    np.savez(src, **{f"t{i}": arrays[n] for i, n in enumerate(names)})
    n_weights = sum(int(a.size) for a in arrays.values())

    def one(qp: int) -> Candidate:
        bits = ctx.work / f"nnc_qp{qp}.bits"
        info = _worker("encode", str(src), str(qp), str(bits))
        out = ctx.work / f"nnc_qp{qp}.nnc"
        payload = bits.read_bytes()
        out.write_bytes(MAGIC + graph + payload)
        decoded = ctx.work / f"nnc_qp{qp}.onnx"
        onnx.save(decode(out), str(decoded))
        extra = {"bits/weight": 8 * len(payload) / n_weights}
        if info.get("heavy_imports"):
            extra["note"] = f"imported {', '.join(info['heavy_imports'])}"
        return Candidate(f"qp={qp}", out, out.stat().st_size, prep_s + info["seconds"], decoded, extra=extra)

    qps = list(C.NNCODEC_QPS[:2] if ctx.smoke else C.NNCODEC_QPS)
    cands = sweep(ctx, qps, one, midpoint=lambda a, b: (a + b) // 2, bisect=True)
    if setup_s:
        cands[0].extra["note"] = f"environment built first in {setup_s:.0f} s (not counted)"
    return cands


def load_session(path: Path):
    from ..fidelity import session

    return session(decode(path).SerializeToString())


if __name__ == "__main__":  # python -m benchmarks.peers.nncodec: build the environment only
    print(f"ready ({ensure_venv():.0f} s)")
    os._exit(0)
