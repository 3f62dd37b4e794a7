"""Runs inside NNCodec's own virtual environment (numpy<2): encode or decode a dict of arrays.

    python nncodec_worker.py encode ARRAYS.npz QP OUT.nnc   -> JSON {"seconds": ...} on stdout
    python nncodec_worker.py decode IN.nnc OUT.npz          -> JSON {"seconds": ...} on stdout

Imports nothing from the benchmark package (it is not installed in that environment). NNCodec's
`nncodec.nnc` imports its PyTorch/TensorFlow front ends (torch, torchvision, pandas, h5py) only to
recognise model objects; array coding never reaches them, so they are replaced by stubs that
recognise nothing, and any attempt to use them fails loudly.
"""
from __future__ import annotations

import json
import os
import sys
import time
import types


def _stub_frameworks() -> None:
    def refuse(*_args, **_kwargs):
        raise RuntimeError("NNCodec's framework front ends are stubbed out in the benchmark")

    names = ("tensorflow_model", "pytorch_model", "use_case_init")
    package = types.ModuleType("nncodec.framework")
    sys.modules["nncodec.framework"] = package
    for short in names:
        mod = types.ModuleType(f"nncodec.framework.{short}")
        mod.is_tef_model = lambda *_a, **_k: False
        mod.is_pyt_model = lambda *_a, **_k: False
        mod.use_cases = {}
        mod.__getattr__ = lambda attr: refuse  # create_NNC_model_instance_* and friends
        sys.modules[mod.__name__] = mod
        setattr(package, short, mod)


def main(argv: list[str]) -> None:
    # This file's folder holds the benchmark's own nncodec.py: never let it shadow the package.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    _stub_frameworks()
    import numpy as np
    from nncodec import nnc

    if argv[0] == "encode":
        src, qp, dst = argv[1], int(argv[2]), argv[3]
        with np.load(src) as z:
            params = {k: np.ascontiguousarray(z[k], dtype=np.float32) for k in z.files}
        t = time.perf_counter()
        # NNCodec's own defaults for array coding (nncodec.tensor.nncargs): dependent quantization,
        # parameter optimisation and row skipping on; tensors of one dimension get nonweight_qp.
        bitstream = nnc.compress(params, bitstream_path=None, qp=qp, use_dq=True, param_opt=True,
                                 row_skipping=True, return_bitstream=True, verbose=False)
        seconds = time.perf_counter() - t
        with open(dst, "wb") as f:
            f.write(bitstream)
    elif argv[0] == "decode":
        src, dst = argv[1], argv[2]
        with open(src, "rb") as f:
            bitstream = bytearray(f.read())
        t = time.perf_counter()
        params = nnc.decompress(bitstream, verbose=False)
        seconds = time.perf_counter() - t
        np.savez(dst, **{k: np.asarray(v, dtype=np.float32) for k, v in params.items()})
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")
    stubbed = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "pandas", "h5py"))
    print(json.dumps({"seconds": seconds, "heavy_imports": stubbed}))


if __name__ == "__main__":
    main(sys.argv[1:])
