"""Decode-and-load of one compressed file, timed in this (fresh) process; run by the harness.

    python -m benchmarks.loadtime PEER PATH    -> one JSON line: seconds, peak RSS

Everything a loader needs is imported before the clock starts (the interpreter and onnxruntime's
import cost the same for every method); the clock covers reading and decoding the file and
creating the onnxruntime session. Peak RSS is the process's high-water mark (and that of any
decoder subprocess, for NNCodec), so it includes Python and onnxruntime themselves: compare it
with the "fp32 original" row of the same table.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .memory import children_peak_kib, own_peak_kib


def main(argv: list[str]) -> None:
    peer, path = argv[0], Path(argv[1])
    import numpy  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401

    if peer == "original":
        from .fidelity import session as load_session
    else:
        import importlib

        from .peers import module

        peer_module = module(peer)
        for name in getattr(peer_module, "LOADER_IMPORTS", ()):  # the loader's own package, e.g. moub_runtime
            importlib.import_module(name)
        load_session = peer_module.load_session
    before = own_peak_kib()
    t = time.perf_counter()
    sess = load_session(path)
    seconds = time.perf_counter() - t
    peak = max(own_peak_kib(), children_peak_kib())
    assert sess.get_inputs()
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024, "rss_before_mb": before / 1024}))


if __name__ == "__main__":
    main(sys.argv[1:])
