"""Lossless: the fp32 .onnx compressed by zstd at level 19 (the `zstandard` package)."""
from __future__ import annotations

import time
from pathlib import Path

from .. import config as C
from . import Candidate, Context, Unavailable

METHOD = f"zstd -{C.ZSTD_LEVEL} (lossless)"


def _zstd():
    try:
        import zstandard
    except ImportError as exc:
        raise Unavailable("zstandard is not installed (pip install '.[bench]')") from exc
    return zstandard


def run(ctx: Context) -> list[Candidate]:
    zstandard = _zstd()
    raw = ctx.onnx_path.read_bytes()
    t = time.perf_counter()
    packed = zstandard.ZstdCompressor(level=C.ZSTD_LEVEL).compress(raw)
    encode_s = time.perf_counter() - t
    out = ctx.work / "model.onnx.zst"
    out.write_bytes(packed)
    decoded = ctx.work / "decoded.onnx"
    restored = zstandard.ZstdDecompressor().decompress(packed)
    decoded.write_bytes(restored)
    cand = Candidate(f"level {C.ZSTD_LEVEL}", out, len(packed), encode_s, decoded)
    if restored == raw and ctx.reference is not None:
        # Byte-identical to the original: its behaviour is the original's, already measured.
        cand.fidelity = ctx.reference
        cand.extra["note"] = "decodes to the original bytes"
    else:
        cand.fidelity = ctx.evaluate(decoded)
    return [cand]


def load_session(path: Path):
    from ..fidelity import session

    return session(_zstd().ZstdDecompressor().decompress(path.read_bytes()))
