"""Reproduce the hostile-file report: build each crafted file, run the reader on it in a fresh
process, and print exit code, first line of output and peak RSS.

The files are built with this checkout's ``tests/hostile_cases.py`` (byte by byte, like the
test corpus); the reader measured is the ``moub`` of ``--python`` (default: this interpreter),
so the same files can be run through an older checkout's virtualenv for a before/after table::

    .venv/bin/python tools/hostile_repro.py --out /tmp/repro                      # after
    .venv/bin/python tools/hostile_repro.py --out /tmp/repro --python OLD/.venv/bin/python

Every child runs under an address-space limit (``--as-limit``, default 8 GiB) so that a reader
that over-allocates fails there instead of exhausting the machine, and with a time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import hostile_cases as H  # noqa: E402

SECRET = b"TOP-SECRET-BYTES"   # written to secret.txt beside the files (16 bytes)


@dataclass(frozen=True)
class Case:
    item: str
    name: str
    build: Callable[[Path], Path]
    actions: tuple[str, ...]


def _file(name: str, make: Callable[[], bytes]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / f"{name}.moub"
        if not path.exists():
            path.write_bytes(make())
        return path
    return build


def _npz(name: str, make: Callable[[Path], Path]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / f"{name}.npz"
        if not path.exists():
            make(path)
        return path
    return build


MOUB_ACTIONS = ("verify", "load", "decode", "inspect")
CASES = [
    *[Case("1", f"external-{place}", _file(f"external-{place}", lambda p=place: H.external_data_file(p)),
           ("verify", "load", "session", "decode")) for place in H.EXTERNAL_PLACES],
    Case("1", "convert-external", lambda folder: _external_onnx(folder), ("convert",)),
    Case("2", "shared-values-4096", _file("shared-values-4096", H.shared_values_file), MOUB_ACTIONS),
    Case("2", "grid-tables-11", _file("grid-tables-11", lambda: H.grid_tables_file(11)), MOUB_ACTIONS),
    Case("2", "grid-tables-85", _file("grid-tables-85", lambda: H.grid_tables_file(85)), MOUB_ACTIONS),
    Case("2", "deep-tables-300", _file("deep-tables-300", lambda: H.deep_tables_file(300)), MOUB_ACTIONS),
    Case("3", "raw-bomb-wrong-checksum", _file("raw-bomb-wrong-checksum", H.raw_bomb_file), ("verify", "load", "decode")),
    Case("4", "graph-2gib", _file("graph-2gib", H.lzma_graph_file), ("verify", "load", "decode")),
    Case("4", "tensor-1gib", _file("tensor-1gib", H.lzma_tensor_file), ("verify", "load", "decode", "load-as-2g")),
    Case("5", "float16-overflow", _file("float16-overflow", H.float16_overflow_file), ("verify", "load", "decode")),
    Case("5", "wrong-payload-digest", _file("wrong-payload-digest", H.wrong_payload_digest_file), ("verify", "load", "decode")),
    Case("6", "npz-2gib", _npz("npz-2gib", lambda p: H.npz_zip_bomb(p, 8_400_000)), ("convert-data",)),
    Case("6", "npz-4tib-header", _npz("npz-4tib-header", H.npz_header_claims), ("convert-data",)),
    Case("7", "terminal-control", _file("terminal-control", H.terminal_control_file), ("inspect-raw",)),
    Case("7", "negative-dims", _file("negative-dims", H.negative_dims_file), ("verify", "load")),
    Case("7", "shadowed-weight", _file("shadowed-weight", H.shadowed_weight_file), ("verify", "load-run")),
    Case("7", "shadowed-by-constant", _file("shadowed-by-constant", H.constant_shadow_file), ("verify", "load-run")),
    Case("7", "version-1.0-with-1.2-bits", _file("version-1.0-with-1.2-bits", H.old_version_with_new_features_file), ("verify", "load")),
    Case("7", "decode-onto-input", _file("decode-onto-input", lambda: H.K.build(H.K.valid_spec())), ("decode-self",)),
    Case("7", "output-mode", _file("output-mode", lambda: H.K.build(H.K.valid_spec())), ("decode-umask077",)),
    Case("7", "pair", lambda folder: _two_versions(folder), ("pair-crash", "pair-race")),
    Case("7", "full-disk", _file("full-disk", lambda: _raw_file(1 << 20)), ("decode-full-disk",)),
    Case("7", "killed-writes", _file("killed-writes", lambda: H.K.build(H.K.valid_spec())), ("kill-write",)),
]


def _two_versions(folder: Path) -> Path:
    """v1 and v2 of one model (W and B of 4 KiB each, so they go to the data file), for the pair cases."""
    first, second = folder / "pair.moub", folder / "pair.v2.moub"
    if not first.exists():
        v1, v2 = H.weight_versions()
        first.write_bytes(v1)
        second.write_bytes(v2)
    return first


def _raw_file(n: int) -> bytes:
    import numpy as np
    from moub_format import constants as C

    data = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8).tobytes()
    tensor = H.K.Tensor("init:X", "X", 2, [n], C.ENCODING_RAW, H.K.Blob(data))
    return H.K.build(H.K.Spec(graph=H._graph_with("X", [n], 2), codebooks=[], tables=[], tensors=[tensor], metadata=[]))


def _external_onnx(folder: Path) -> Path:
    path = folder / "external-sparse.onnx"
    return path if path.exists() else H.external_data_onnx(path)


CHILD = r"""
import json, os, sys, zlib
action, path, workdir = sys.argv[1:4]
os.chdir(workdir)
def report(code, text):
    print(json.dumps({"code": code, "text": text}))
    sys.exit(0)
try:
    if action == "load":
        import moub_runtime
        moub_runtime.load(path)
        report(0, "loaded")
    if action == "load-as-2g":
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, resource.RLIM_INFINITY))
        import moub_runtime
        moub_runtime.load(path)
        report(0, "loaded under a 2 GiB address-space limit")
    if action == "load-run":
        import numpy as np, onnxruntime, moub_runtime
        model = moub_runtime.load(path)
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = session.run(None, {"x": np.ones((1, 8), np.float32)})[0]
        report(0, f"loaded; onnxruntime runs it: y[0, :3] = {y[0, :3].round(2).tolist()}")
    if action in ("pair-crash", "pair-race"):
        import os, subprocess, onnx, moub_runtime
        v1, v2, out = path, path.replace(".moub", ".v2.moub"), os.path.join(workdir, "model.onnx")
        def decode(source):
            moub_runtime.decode_to_onnx(source, out, external_threshold=100)  # the model gets a data file
        references = {}
        def weights():  # "model vX, data vY": what the model file says, whose weights it loads
            model = onnx.load(out)
            data = b"".join(onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer)
            return f"model {model.doc_string}, weights {references.get(data, 'of neither')}"
        for name, source in (("v1", v1), ("v2", v2)):
            decode(source)
            references[b"".join(onnx.numpy_helper.to_array(t).tobytes() for t in onnx.load(out).graph.initializer)] = name
        if action == "pair-crash":
            decode(v1)
            real, calls = os.replace, []
            def crash_on_second(*args, **kwargs):  # the process dies between the two renames
                calls.append(args)
                if len(calls) == 2:
                    raise KeyboardInterrupt
                return real(*args, **kwargs)
            os.replace = crash_on_second
            try:
                decode(v2)
            except KeyboardInterrupt:
                pass
            os.replace = real
            try:
                got = weights()
            except Exception as exc:
                got = f"unloadable ({type(exc).__name__})"
            data_names = sorted(n for n in os.listdir(workdir) if ".data" in n)
            report(0, f"after a crash between the renames of decoding v2 over v1: {got}"
                      f"{' (the old pair, intact)' if got == 'model v1, weights v1' else ' (a mismatched pair)'}; data files: {data_names}")
        code = "import sys, moub_runtime\nfor _ in range(10): moub_runtime.decode_to_onnx(sys.argv[1], sys.argv[2], external_threshold=100)\n"
        children = [subprocess.Popen([sys.executable, "-c", code, source, out], stderr=subprocess.DEVNULL) for source in (v1, v2, v1, v2)]
        codes = [child.wait() for child in children]
        try:
            got = weights()
        except Exception as exc:
            got = f"unloadable ({type(exc).__name__})"
        left = sorted(name for name in os.listdir(workdir) if name not in ("model.onnx", "secret.txt"))
        report(0, f"4 concurrent decoders x 10 (exit codes {codes}): {got}; beside model.onnx: {left}")
    if action == "kill-write":
        import os, signal, subprocess
        from moub_format.writer import write_atomic
        target = os.path.join(workdir, "model.onnx")
        killer = ("import os, signal, sys\nfrom moub_format.writer import write_atomic\n"
                  "def pieces():\n    yield b'x' * 4096\n    os.kill(os.getpid(), signal.SIGKILL)\n"
                  "write_atomic(sys.argv[1], pieces())\n")
        for _ in range(5):
            subprocess.run([sys.executable, "-c", killer, target])
        after_kills = len([n for n in os.listdir(workdir) if n.endswith(".tmp")])
        write_atomic(target, b"complete")
        after_write = len([n for n in os.listdir(workdir) if n.endswith(".tmp")])
        report(0, f"5 writes killed: {after_kills} temp file(s) left; after one more successful write: {after_write}")
    if action == "session":
        import numpy as np, moub_runtime
        session = moub_runtime.InferenceSession(path)
        x = np.ones((1, 8), np.float32)
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x})))
        leak = bytes(np.asarray(outputs["leak"]).astype(np.uint8).tobytes())
        secret = open("secret.txt", "rb").read()
        source = " (the bytes of secret.txt)" if leak == secret else " (secret.txt's first byte)" if set(leak) == {secret[0]} else ""
        report(0, f"session output 'leak' = {leak[:16]!r}{source}")
except SystemExit:
    raise
except BaseException as exc:
    from moub_format import MoubFormatError
    report(2 if isinstance(exc, MoubFormatError) else 1, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
"""


def _cli(python: str, *args: str) -> list[str]:
    return [python, "-m", "moub_runtime.cli", *args]


def command_for(action: str, path: Path, work: Path, python: str) -> tuple[list[str], dict]:
    env = dict(os.environ)
    if action in ("verify", "inspect", "inspect-raw"):
        return _cli(python, "inspect" if action.startswith("inspect") else "verify", str(path)), env
    if action == "decode":
        return _cli(python, "decode", str(path), "-o", str(work / "decoded.onnx")), env
    if action == "decode-self":
        return _cli(python, "decode", str(path), "-o", str(path)), env
    if action == "decode-umask077":
        return ["sh", "-c", f"umask 077 && {python} -m moub_runtime.cli decode {path} -o {work / 'private.onnx'} "
                            f"&& stat -c 'mode %a' {work / 'private.onnx'}"], env
    if action == "decode-full-disk":
        full = work / "full"
        return ["sh", "-c", f"mkdir -p {full} && mount -t tmpfs -o size=256k tmpfs {full} && "
                            f"{{ {python} -m moub_runtime.cli decode {path} -o {full / 'out.onnx'}; code=$?; "
                            f"echo \"left in the folder: $(ls -A {full} | wc -l) file(s)\"; umount {full}; exit $code; }}"], env
    if action == "convert":
        return _cli(python, "convert", str(path), "-o", str(work / "converted.moub"), "--data",
                    str(ROOT / "converters" / "data" / "digits_val.npz"), "--quiet"), env
    if action == "convert-data":
        return _cli(python, "convert", str(ROOT / "converters" / "data" / "digits_cnn.onnx"), "-o", str(work / "converted.moub"),
                    "--data", str(path), "--quiet"), env
    return [python, "-c", CHILD, action, str(path), str(work)], env


WRAPPER = r"""
import json, os, resource, subprocess, sys
limit, timeout = int(sys.argv[1]), float(sys.argv[2])
command = json.loads(sys.argv[3])
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=cap)
try:
    out, err = child.communicate(timeout=timeout)
    timed_out = False
except subprocess.TimeoutExpired:
    child.kill()
    out, err = child.communicate()
    timed_out = True
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"returncode": child.returncode, "peak_mb": round(peak_kb / 1024, 1), "timed_out": timed_out,
                  "out": out.decode("utf-8", "backslashreplace"), "err": err.decode("utf-8", "backslashreplace")}))
"""


def measure(command: list[str], env: dict, cwd: Path, as_limit: int, timeout: float) -> dict:
    """Run ``command`` from a wrapper process whose only child it is, so that the wrapper's
    RUSAGE_CHILDREN maximum is that command's peak RSS (a shell in between counts too: the
    maximum over the shell and its child is the child's)."""
    start = time.perf_counter()
    wrapper = subprocess.run([sys.executable, "-c", WRAPPER, str(as_limit), str(timeout), json.dumps(command)],
                             cwd=cwd, env=env, capture_output=True, text=True)
    result = json.loads(wrapper.stdout)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def summary(action: str, result: dict) -> tuple[int | str, str]:
    if result["timed_out"]:
        return "timeout", f"still running after the time limit (peak {result['peak_mb']} MB so far)"
    if action in ("load", "load-as-2g", "session", "load-run", "pair-crash", "pair-race", "kill-write"):
        try:
            line = json.loads(result["out"].strip().splitlines()[-1])
            return line["code"], line["text"]
        except (ValueError, IndexError):
            return result["returncode"], (result["err"].strip().splitlines() or ["(no output)"])[-1]
    text = result["err"].strip() or result["out"].strip()
    lines = text.splitlines() or ["(no output)"]
    if action == "inspect-raw":
        return result["returncode"], repr(result["out"][:160])
    if action in ("decode-umask077", "decode-full-disk"):
        return result["returncode"], " / ".join((result["err"].strip().splitlines() or [""])[-1:] + result["out"].strip().splitlines()[-1:])
    shown = lines[0] if len(lines) == 1 else f"{lines[0]} [+{len(lines) - 1} lines]"
    return result["returncode"], shown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the crafted files and outputs")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose moub is measured")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--as-limit", type=float, default=8.0, help="address-space limit per child, GiB")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per child")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "secret.txt").write_bytes(SECRET)
    wanted = set(filter(None, args.cases.split(",")))
    rows = []
    for case in CASES:
        if wanted and case.name not in wanted:
            continue
        path = case.build(folder)
        for action in case.actions:
            work = folder / f"work-{case.name}-{action}"
            work.mkdir(exist_ok=True)
            (work / "secret.txt").write_bytes(SECRET)
            for stale in work.iterdir():
                if stale.is_dir():
                    shutil.rmtree(stale)
                elif stale.name != "secret.txt":
                    stale.unlink()
            command, env = command_for(action, path, work, args.python)
            result = measure(command, env, work, int(args.as_limit * (1 << 30)), args.timeout)
            code, text = summary(action, result)
            row = {"item": case.item, "case": case.name, "file_bytes": path.stat().st_size, "action": action,
                   "exit": code, "peak_mb": result["peak_mb"], "seconds": result["seconds"], "output": text}
            rows.append(row)
            print(f"{case.item:>2} {case.name:32} {path.stat().st_size:>11,} B {action:16} exit {str(code):>7} "
                  f"{result['peak_mb']:>9.1f} MB {result['seconds']:>7.2f} s  {text[:220]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
