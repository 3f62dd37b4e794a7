"""Convert on x86, load and infer on (emulated) arm64, compare.

Three steps, run by ``make test-arm64`` (see arm64.mk):

  prepare WORK   x86, project venv: convert real models to .moub with fixed
                 bins, decode them (sha256 of every decoded tensor), run them on
                 seeded inputs; writes WORK/manifest.json, WORK/*.moub and
                 WORK/<name>.x86.npz.
  device WORK    arm64 root (runtime dependencies only): decode the same files
                 and run the same inputs; writes WORK/<name>.<machine>.json and
                 .npz (machine = aarch64). Imports nothing but the runtime. Run
                 natively on x86 too, it gives the native peak memory to set
                 beside the emulated one.
  compare WORK   x86: decoded weights must be bit-identical (sha256 per tensor),
                 outputs within tolerance; prints a summary, exits 1 on mismatch.

The device step is one process per model (``--model``) so that each model's
peak memory is its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

# Real pretrained models that ship inside PyPI wheels (installed in the x86 venv
# by moub[models]); no model hub is needed.
MODELS = {
    "rapidocr_cls": ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "magika_v3_3": ("magika", "models/standard_v3_3/model.onnx"),
}
BINS = 256
SEED = 20240611
# ARM (NEON) and x86 (AVX2/AVX-512) onnxruntime kernels sum in different orders
# and fuse multiply-adds differently; the outputs are probabilities in [0, 1].
RTOL, ATOL = 1e-4, 1e-5


def _model_path(package: str, rel: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"smoke: {package} is not installed in this venv (pip install -e '.[models]')")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def _feeds(session, name: str) -> dict[str, np.ndarray]:
    """Seeded inputs of each model's real shape and dtype (batch 2)."""
    rng = np.random.default_rng(SEED)
    feeds = {}
    for inp in session.get_inputs():
        if name == "rapidocr_cls":  # normalized 48x192 text-line crops
            feeds[inp.name] = rng.uniform(-1.0, 1.0, (2, 3, 48, 192)).astype(np.float32)
        elif name == "magika_v3_3":  # 2048 byte values, 256 = padding
            feeds[inp.name] = rng.integers(0, 257, (2, 2048)).astype(np.int32)
        else:
            raise SystemExit(f"smoke: no inputs defined for {name}")
    return feeds


def _convert(src: Path, out: Path) -> str:
    """Fixed bins with the converter CLI when it exists, else the Python encode step."""
    try:
        from moub_converters import cli as converter_cli  # noqa: F401

        has_cli = hasattr(converter_cli, "convert_main")
    except ImportError:
        has_cli = False
    if has_cli:
        rc = converter_cli.convert_main([str(src), "-o", str(out), "--bins", str(BINS)])
        if rc not in (0, None):
            raise SystemExit(f"smoke: moub convert {src} failed ({rc})")
        return f"moub convert --bins {BINS}"
    import onnx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for modelzoo
    import modelzoo
    from moub_converters.encode import write_model

    model = onnx.load(str(src))
    codebook, assignments = modelzoo.equal_width_assignments(model, k=BINS)
    write_model(out, model, [codebook], assignments, {"source": src.name})
    return f"encode_model + equal_width_assignments(k={BINS})"


def _digests(path: Path) -> dict[str, str]:
    import moub_runtime

    return {p: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() + f":{a.dtype.str}:{list(a.shape)}"
            for p, a in moub_runtime.decode_tensors(path)}


def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    import moub_runtime

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = moub_runtime.InferenceSession(path, sess_options=options)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _model_sha256(path: Path) -> str:
    """The whole decoded model (graph, inline and decoded weights) as onnx.load would give it."""
    import moub_runtime

    return hashlib.sha256(moub_runtime.load(path).SerializeToString(deterministic=True)).hexdigest()


def _cpu_features() -> list[str]:
    """SIMD features numpy detected at run time (from AT_HWCAP, which qemu sets
    from the emulated CPU): proof of which core the guest saw."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return sorted(k for k, v in features.items() if v)


def _address_space_mib() -> float | None:
    """This process's mapped address space now, from /proc/self/maps. Under
    qemu-user that file lists the guest's mappings only (qemu's own are
    hidden), so this is what --mem limits."""
    try:
        total = 0
        for line in Path("/proc/self/maps").read_text().splitlines():
            start, end = line.split()[0].split("-")
            total += int(end, 16) - int(start, 16)
        return round(total / 2**20, 1)
    except OSError:
        return None


def _peak_kib() -> dict[str, int]:
    """Peak resident memory of this process. Under qemu-user both read the qemu
    process (guest + translator), since qemu passes getrusage and
    /proc/self/status through."""
    peak = {"ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmPeak:")):
                key, value = line.split(":", 1)
                peak[key + "_kib"] = int(value.split()[0])
    except OSError:
        pass
    return peak


def prepare(work: Path) -> None:
    import onnxruntime as ort

    work.mkdir(parents=True, exist_ok=True)
    manifest = {"bins": BINS, "rtol": RTOL, "atol": ATOL, "models": {}}
    for name, (package, rel) in MODELS.items():
        src = _model_path(package, rel)
        out = work / f"{name}.moub"
        how = _convert(src, out)
        plain = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
        feeds = _feeds(plain, name)
        outputs = _run(out, feeds)
        np.savez(work / f"{name}.inputs.npz", **feeds)
        np.savez(work / f"{name}.x86.npz", **outputs)
        manifest["models"][name] = {
            "source": f"{package}/{rel}",
            "onnx_bytes": src.stat().st_size,
            "moub_bytes": out.stat().st_size,
            "converted_with": how,
            "tensors": _digests(out),
            "model_sha256": _model_sha256(out),
        }
        print(f"prepare: {name}: {src.stat().st_size} B onnx -> {out.stat().st_size} B moub "
              f"({len(manifest['models'][name]['tensors'])} tensors; {how})")
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def device(work: Path, name: str) -> None:
    import onnxruntime as ort

    start = time.perf_counter()
    path = work / f"{name}.moub"
    with np.load(work / f"{name}.inputs.npz") as data:
        feeds = {k: data[k] for k in data.files}
    digests = _digests(path)
    t_decode = time.perf_counter() - start
    outputs = _run(path, feeds)
    t_total = time.perf_counter() - start
    machine = platform.machine()
    np.savez(work / f"{name}.{machine}.npz", **outputs)
    result = {
        "machine": machine,
        "cpu_features": _cpu_features(),
        "model_sha256": _model_sha256(path),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "tensors": digests,
        "peak": _peak_kib(),
        "address_space_mib_at_exit": _address_space_mib(),
        "emulated_seconds": {"decode": round(t_decode, 2), "decode_session_run": round(t_total, 2)},
        "forbidden_modules_loaded": sorted(m for m in ("torch", "pymoo", "moub_converters") if m in sys.modules),
    }
    (work / f"{name}.{machine}.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"device: {name}: {machine} [{' '.join(result['cpu_features'])}] python {result['python']} numpy {np.__version__} "
          f"onnxruntime {ort.__version__}; {len(digests)} tensors; peak {result['peak']}")


def compare(work: Path) -> int:
    manifest = json.loads((work / "manifest.json").read_text())
    failures = 0
    for name, expected in manifest["models"].items():
        got = json.loads((work / f"{name}.aarch64.json").read_text())
        native = work / f"{name}.x86_64.json"
        native_peak = json.loads(native.read_text()) if native.exists() else None
        bad_tensors = sorted(p for p in set(expected["tensors"]) | set(got["tensors"])
                             if expected["tensors"].get(p) != got["tensors"].get(p))
        if got["machine"] != "aarch64":
            print(f"FAIL {name}: device step ran on {got['machine']}, not aarch64")
            failures += 1
        if got["forbidden_modules_loaded"]:
            print(f"FAIL {name}: device step imported {got['forbidden_modules_loaded']}")
            failures += 1
        if bad_tensors:
            print(f"FAIL {name}: {len(bad_tensors)} decoded tensors differ from x86, e.g. {bad_tensors[:3]}")
            failures += 1
        if got["model_sha256"] != expected["model_sha256"]:
            print(f"FAIL {name}: the decoded model (graph + all weights) differs from the x86 decode")
            failures += 1
        with np.load(work / f"{name}.x86.npz") as a, np.load(work / f"{name}.aarch64.npz") as b:
            if sorted(a.files) != sorted(b.files):
                print(f"FAIL {name}: outputs {sorted(b.files)} != {sorted(a.files)}")
                failures += 1
                continue
            for key in a.files:
                x, y = a[key], b[key]
                diff = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
                ok = x.shape == y.shape and x.dtype == y.dtype and np.allclose(y, x, rtol=manifest["rtol"], atol=manifest["atol"])
                same_argmax = x.ndim == 2 and bool(np.array_equal(x.argmax(-1), y.argmax(-1)))
                print(f"{'ok  ' if ok else 'FAIL'} {name}: output {key} {list(y.shape)} max |arm64 - x86| = {diff:.3g}"
                      f" (rtol {manifest['rtol']}, atol {manifest['atol']}); same top-1: {same_argmax}")
                failures += not ok
        if not bad_tensors and got["model_sha256"] == expected["model_sha256"]:
            print(f"ok   {name}: {len(got['tensors'])} decoded tensors and the whole decoded model bit-identical to x86 (sha256)")
        print(f"     {name}: {expected['onnx_bytes']} B onnx -> {expected['moub_bytes']} B moub; "
              f"aarch64 numpy {got['numpy']} onnxruntime {got['onnxruntime']}; CPU features {' '.join(got['cpu_features'])}")
        forbidden = set(filter(None, os.environ.get("SMOKE_FORBID_CPU_FEATURES", "").split(",")))
        if forbidden & set(got["cpu_features"]):
            print(f"FAIL {name}: the guest saw CPU features {sorted(forbidden & set(got['cpu_features']))}, "
                  "which the emulated board does not have")
            failures += 1
        native_rss = f"{native_peak['peak']['ru_maxrss_kib'] / 1024:.0f} MiB" if native_peak else "n/a"
        native_as = f"{native_peak['address_space_mib_at_exit']:.0f} MiB" if native_peak else "n/a"
        print(f"     {name}: peak RSS {got['peak'].get('ru_maxrss_kib', 0) / 1024:.0f} MiB emulated (whole qemu process: "
              f"guest + translator), {native_rss} native x86; address space at exit "
              f"{got['address_space_mib_at_exit']:.0f} MiB guest, {native_as} native x86")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "device", "compare", "models"])
    parser.add_argument("work", type=Path, nargs="?")
    parser.add_argument("--model", help="device step: one model name (default: all)")
    args = parser.parse_args(argv)
    if args.step == "models":
        print(" ".join(MODELS))
        return 0
    if args.work is None:
        parser.error("WORK is required")
    if args.step == "prepare":
        prepare(args.work)
    elif args.step == "device":
        for name in [args.model] if args.model else MODELS:
            device(args.work, name)
    else:
        return compare(args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
