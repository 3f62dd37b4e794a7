"""A .moub beyond 4 GiB, end to end: written, opened, checked and run in onnxruntime.

A FlatBuffer stops at 2 GiB, so the format keeps every bulk byte stream in a payload
section behind 64-bit offsets (FORMAT.md §1, "Files larger than 2 GiB"). Small tests
cannot show that those offsets work; this builds a real file past 2^32 bytes:

* the model: ``ids -> Gather(table) -> Cast(float) -> MatMul(W) -> y``, with ``table`` a
  uint8 embedding of GIB gibibytes (a pass-through tensor, value ``(7 * row + column) mod 256``)
  and ``W`` a 64 x 16 float matrix quantized into a pack, a Huffman stream that the
  writer places after the table, so beyond the 4 GiB mark;
* written with :func:`moub_format.writer.write` (streamed: the table is not copied), timed,
  with the writer's peak RSS above the table it was given;
* loaded in a fresh process with ``moub_runtime.InferenceSession`` (every blob's SHA-256
  checked, the pack decoded from beyond 4 GiB), timed, with that process's peak RSS;
  then run on rows at the start, middle and end of the table and compared with NumPy;
* decoded to a runnable ONNX model with its data file (``moub decode``:
  :func:`moub_runtime.decode_to_onnx`) in another fresh process, timed, with its peak RSS;
  onnxruntime loads that model and its rows are compared with NumPy too.

Run: ``.venv/bin/python -m benchmarks.bigfile [--gib 4.25] [--dir DIR]``. Needs about
2 x GIB + 1 GB of free disk in DIR (default: the system's temp folder) and about 2 x GIB of
memory; the files are deleted afterwards. Prints a markdown table (``make bench`` puts it in
RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

WIDTH = 64             # bytes per table row
OUT_FEATURES = 16
ROWS_PER_BLOCK = 1 << 22
FREE_DISK_MARGIN = 1 << 30
MATCH_TOLERANCE = 1e-5  # relative to the largest output: float32 sums in another order


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (Linux; NaN elsewhere)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return float("nan")
    found = re.search(rf"{field}:\s+(\d+)", text)
    return int(found.group(1)) / 1024 if found else float("nan")


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0), so a peak is this step's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def table_rows(start: int, stop: int) -> np.ndarray:
    """Rows ``start .. stop - 1`` of the table: ``(7 * row + column) mod 256``."""
    rows = np.arange(start, stop, dtype=np.int64)[:, None] * 7 + np.arange(WIDTH, dtype=np.int64)[None, :]
    return (rows & 255).astype(np.uint8)


def build_table(n_rows: int) -> np.ndarray:
    table = np.empty((n_rows, WIDTH), dtype=np.uint8)
    for start in range(0, n_rows, ROWS_PER_BLOCK):
        stop = min(n_rows, start + ROWS_PER_BLOCK)
        table[start:stop] = table_rows(start, stop)
    return table


def model_graph(n_rows: int, weights: np.ndarray):
    """The model with ``W`` in place and the table as a stub (dims, no data): the table's
    bytes go to the writer directly, never into a protobuf (which stops at 2 GiB)."""
    from onnx import TensorProto, helper, numpy_helper

    table = TensorProto(name="table", data_type=TensorProto.UINT8, dims=[n_rows, WIDTH])
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
        helper.make_node("Cast", ["rows"], ["rows_f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["rows_f", "W"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "bigfile",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", OUT_FEATURES])],
        [table, numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_file(path: Path, gib: float) -> dict:
    """Write the file; return what the check needs and the writer's figures."""
    from moub_converters.encode import PackAssignment, container_parts, dequantize_scaled
    from moub_format import writer
    from moub_runtime.sites import tensor_sites

    n_rows = int(gib * 2**30) // WIDTH
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((WIDTH, OUT_FEATURES)) * 0.05).astype(np.float32)
    step = float(np.float32(weights.std() / 64))
    levels = np.rint(weights / step).astype(np.int64).reshape(-1)
    first = int(levels.min())
    codebook = writer.GridCodebook(first, int(levels.max()) - first + 1)
    model = model_graph(n_rows, weights)
    sites = tensor_sites(model)
    table_path = next(path for path, site in sites.items() if site.tensor.name == "table")
    w_path = next(path for path, site in sites.items() if site.tensor.name == "W")
    pack = PackAssignment((w_path,), (step,), levels - first, 0)
    graph, specs, packs, features = container_parts(model, {}, [pack])

    table = build_table(n_rows)
    raw = writer.RawTensor(table_path, "table", 2, (n_rows, WIDTH), table)  # 2 = UINT8, stored as is
    _reset_peak()
    rss_before = _status_mb("VmRSS")
    t = time.perf_counter()
    size = writer.write(path, graph, [codebook], [*specs, raw], {"moub.benchmark": "bigfile"},
                        packs=packs, graph_features=features)
    seconds = time.perf_counter() - t
    peak_above = _status_mb("VmHWM") - rss_before
    decoded_w = dequantize_scaled(codebook, levels - first, step, 1).reshape(WIDTH, OUT_FEATURES)
    return {"rows": n_rows, "size": size, "write_s": seconds, "write_peak_above_mb": peak_above,
            "table_mb": table.nbytes / 2**20, "weights": decoded_w}


def check_ids(n_rows: int) -> np.ndarray:
    return np.array([0, 1, n_rows // 2, n_rows - 2, n_rows - 1], dtype=np.int64)


def load_and_run(path: Path) -> dict:
    """In a fresh process: open, check, decode and run; the pack's absolute offset."""
    import onnxruntime  # noqa: F401  (imported before the clock, as in the load-time bench)

    import moub_runtime
    from moub_format import MoubFile

    with MoubFile(path) as moub:
        index = moub.index
        pack_start = index.payload_offset + index.packs[0].data.offset
    rss_before = _status_mb("VmRSS")
    t = time.perf_counter()
    session = moub_runtime.InferenceSession(path)
    seconds = time.perf_counter() - t
    return {"load_s": seconds, "load_peak_above_mb": _status_mb("VmHWM") - rss_before, "pack_start": pack_start,
            "session": session}


def _compare(session, rows: int, weights: np.ndarray) -> dict:
    ids = check_ids(rows)
    y = session.run(None, {"ids": ids})[0]
    expected = np.stack([table_rows(int(i), int(i) + 1)[0] for i in ids]).astype(np.float32) @ weights
    # Float sums in another order differ in the last bits: compare relative to the output's scale.
    error = float(np.abs(y - expected).max() / np.abs(expected).max())
    return {"max_rel_error": error, "matches": bool(error < MATCH_TOLERANCE)}


def check_file(path: Path, rows: int, weights: np.ndarray) -> dict:
    """Load and run the file; compare with NumPy on rows at the start, middle and end."""
    result = load_and_run(path)
    session = result.pop("session")
    return {**result, **_compare(session, rows, weights)}


def check_decode(path: Path, out: Path, rows: int, weights: np.ndarray) -> dict:
    """``moub decode`` to ``out`` (+ its data file), timed with its peak RSS; then run the ONNX file."""
    import onnxruntime

    from moub_runtime import decode_to_onnx

    _reset_peak()
    rss_before = _status_mb("VmRSS")
    t = time.perf_counter()
    decode_to_onnx(path, out)
    seconds = time.perf_counter() - t
    peak_above = _status_mb("VmHWM") - rss_before
    files = {p.name: p.stat().st_size for p in out.parent.iterdir() if p.name.startswith(out.name)}
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    compared = _compare(session, rows, weights)
    return {"decode_s": seconds, "decode_peak_above_mb": peak_above, "onnx_files": files,
            "onnx_matches": compared["matches"], "onnx_max_rel_error": compared["max_rel_error"]}


def _run_child(args: list[str]) -> dict:
    """Run ``python -m benchmarks.bigfile ARGS`` in a fresh process (its peak RSS is its own)."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.bigfile", *args], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"benchmarks.bigfile {' '.join(args)} failed:\n{run.stderr.strip()}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def measure(gib: float, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    need = 2 * int(gib * 2**30) + FREE_DISK_MARGIN  # the .moub, then the decoded .onnx + .data
    free = shutil.disk_usage(folder).free
    if free < need:
        return {"skipped": f"{free / 2**30:.1f} GiB free in {folder}, {need / 2**30:.1f} GiB needed"}
    with tempfile.TemporaryDirectory(dir=folder, prefix="moub-bigfile-") as tmp:
        path = Path(tmp) / "big.moub"
        written = write_file(path, gib)
        weights_path = Path(tmp) / "weights.npy"
        np.save(weights_path, written.pop("weights"))
        rows = str(written["rows"])
        loaded = _run_child(["--child", str(path), rows, str(weights_path)])
        decoded = _run_child(["--decode-child", str(path), str(Path(tmp) / "onnx" / "big.onnx"), rows, str(weights_path)])
        file_size = path.stat().st_size
    return {**written, **loaded, **decoded, "file_size": file_size}


def format_table(result: dict) -> list[str]:
    if "skipped" in result:
        return [f"Skipped: {result['skipped']}."]
    size = result["file_size"]
    return [
        "| file | pack starts at | write s | writer peak RSS above the table | load s | load peak RSS | "
        "rows checked | output |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {size:,} bytes ({size / 2**30:.2f} GiB) | byte {result['pack_start']:,} "
        f"({'beyond' if result['pack_start'] >= 1 << 32 else 'below'} 2^32) | {result['write_s']:.1f} | "
        f"{result['write_peak_above_mb']:.0f} MB (table {result['table_mb']:.0f} MB) | {result['load_s']:.1f} | "
        f"{result['load_peak_above_mb']:.0f} MB above the imports | 5 (first, second, middle, last two) | "
        f"{'matches' if result['matches'] else 'DIFFERS from'} NumPy (max error {result['max_rel_error']:.1e} "
        "of the largest output) |",
        "",
        "`moub decode` of the same file (`moub_runtime.decode_to_onnx`, in a fresh process), then onnxruntime "
        "on the ONNX file and its data file:",
        "",
        "| ONNX files | decode s | decode peak RSS | output |",
        "|---|---:|---:|---|",
        f"| {', '.join(f'{name} {size:,} bytes' for name, size in sorted(result['onnx_files'].items()))} | "
        f"{result['decode_s']:.1f} | {result['decode_peak_above_mb']:.0f} MB above the imports | "
        f"{'matches' if result['onnx_matches'] else 'DIFFERS from'} NumPy (max error "
        f"{result['onnx_max_rel_error']:.1e} of the largest output) |",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.bigfile", description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.25, help="size of the pass-through table (GiB)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the file is written (then deleted)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--decode-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(check_file(Path(args.child[0]), int(args.child[1]), np.load(args.child[2]))))
        return 0
    if args.decode_child:
        path, out, rows, weights = args.decode_child
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        print(json.dumps(check_decode(Path(path), Path(out), int(rows), np.load(weights))))
        return 0
    result = measure(args.gib, Path(args.dir))
    for line in format_table(result):
        print(line)
    if "skipped" not in result and not (result["matches"] and result["onnx_matches"]):
        print("FAIL: the decoded model's output differs from NumPy's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
