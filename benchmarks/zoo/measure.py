"""The current converter on one zoo model, as a user runs it: `moub convert` from the shell.

For each mode (the converter's default, and `--mode paper`): the command with the search split as
DATA.npz (`--workers 1`, everything else default), under `/usr/bin/time -v` and a time limit; its
exit code, closing table (or its one-line error), wall time and peak RSS; where a file was written,
its size ratio and its fidelity on the test split by the model's own criterion (the .moub decoded
by `moub decode`). Beside them, the lossless reference: zstd -19 of the .onnx.

Results go to OUT/NAME.json and are printed.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import config as C
from .core import ZooModel

MODES = ("default", "paper")
TIMEOUT_S = 15 * 60


@dataclass
class Conversion:
    mode: str
    command: str
    exit_code: int | None
    wall_s: float
    peak_rss_mb: float | None
    output_tail: list[str]
    moub_bytes: int | None = None
    ratio: float | None = None
    fidelity: str | None = None
    passes: bool | None = None


@dataclass
class Measurement:
    model: str
    onnx_bytes: int
    search_samples: int
    test_samples: int
    data: str | None
    zstd_ratio: float
    conversions: list[Conversion] = field(default_factory=list)
    reference: str = ""


def zstd_ratio(path: Path) -> float:
    import zstandard

    raw = path.read_bytes()
    return len(raw) / len(zstandard.ZstdCompressor(level=C.ZSTD_LEVEL).compress(raw))


def _peak_rss_mb(time_report: str) -> float | None:
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_report)
    return int(m.group(1)) / 1024 if m else None


def _closing_lines(stdout: str, stderr: str) -> list[str]:
    """The converter's closing table (its last lines of output), else its error line."""
    lines = [ln.rstrip() for ln in stdout.splitlines() if ln.strip()]
    own = stderr.split("\tCommand being timed")[0]  # what /usr/bin/time -v adds starts there
    errors = [ln.rstrip() for ln in own.splitlines() if ln.strip() and not ln.startswith("Command exited")]
    return (lines[-14:] if lines else []) + errors[-3:]


def convert(model: ZooModel, data: Path, mode: str, work: Path) -> Conversion:
    out = work / f"{model.name}-{mode}.moub"
    out.unlink(missing_ok=True)
    venv_bin = Path(sys.executable).parent
    cmd = [str(venv_bin / "moub"), "convert", str(model.path()), "-o", str(out), "--data", str(data),
           "--workers", "1", "--quiet"]
    if mode != "default":
        cmd += ["--mode", mode]
    t = time.perf_counter()
    try:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, timeout=TIMEOUT_S)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, stdout, stderr = None, str(exc.stdout or ""), f"timed out after {TIMEOUT_S} s"
    wall = time.perf_counter() - t
    shown = " ".join(c if c.startswith("-") else Path(c).name for c in cmd[1:])
    conv = Conversion(mode, f"moub {shown}", code, wall, _peak_rss_mb(stderr), _closing_lines(stdout, stderr))
    if code == 0 and out.is_file():
        decoded = work / f"{model.name}-{mode}.decoded.onnx"
        subprocess.run([str(venv_bin / "moub"), "decode", str(out), "-o", str(decoded)], check=True,
                       capture_output=True)
        conv.moub_bytes = out.stat().st_size
        conv.ratio = model.path().stat().st_size / conv.moub_bytes
        fid = model.score(decoded, model.split("test"))
        conv.fidelity, conv.passes = fid.describe(), bool(model.passes(fid))
    return conv


def measure(model: ZooModel, work: Path, max_samples: int, modes: tuple[str, ...] = MODES) -> Measurement:
    work.mkdir(parents=True, exist_ok=True)
    written = model.write_data(work / model.name, "search", max_samples=max_samples)
    test = model.split("test")
    n_search = len(list(written["feeds"].glob("*.npz")))
    result = Measurement(model.name, model.path().stat().st_size, n_search, len(test.feeds),
                         str(written.get("data")) if "data" in written else None, zstd_ratio(model.path()))
    result.reference = model.score(model.path(), test).describe()
    data = written.get("data") or same_shape_data(model, work / model.name / "search-same-shape.npz", max_samples)
    if data is not None:
        import numpy as np

        with np.load(data) as z:
            result.search_samples = max(len(z[k]) for k in z.files if z[k].ndim)
        result.data = str(data)
        for mode in modes:
            result.conversions.append(convert(model, data, mode, work))
    return result


def same_shape_data(model: ZooModel, path: Path, max_samples: int) -> Path | None:
    """For feeds that do not stack (lengths that follow the input): a DATA.npz of the largest set of
    search feeds that share one shape, so the current converter can be tried at all."""
    import numpy as np

    feeds = model.split("search").feeds
    by_shape: dict[tuple, list] = {}
    for feed in feeds:
        by_shape.setdefault(tuple((k, v.shape) for k, v in sorted(feed.items())), []).append(feed)
    group = max(by_shape.values(), key=len)
    if len(group) < 2:
        return None
    group = group[:max_samples]
    np.savez(path, **{k: np.concatenate([f[k] for f in group], axis=0) for k in group[0]})
    print(f"{model.name}: feeds do not stack; DATA.npz holds the {len(group)} search feeds of one shape "
          f"(of {len(feeds)})", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    from . import get

    ap = argparse.ArgumentParser(prog="python -m benchmarks.zoo.measure", description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", type=Path, default=C.OUT / "zoo")
    ap.add_argument("--max-samples", type=int, default=64, help="search samples given to the converter")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args(argv)
    for name in args.models:
        model = get(name)
        res = measure(model, args.out, args.max_samples, tuple(args.modes.split(",")))
        (args.out / f"{name}.json").write_text(json.dumps(asdict(res), indent=1))
        print(f"{name}: onnx {res.onnx_bytes:,} B, zstd -19 {res.zstd_ratio:.3f}x, search {res.search_samples}, "
              f"test {res.test_samples}, reference {res.reference}", flush=True)
        for c in res.conversions:
            print(f"  {c.mode}: exit {c.exit_code}, {c.wall_s:.0f} s, peak RSS {c.peak_rss_mb or 0:.0f} MB, "
                  f"ratio {c.ratio or 0:.2f}x, fidelity {c.fidelity}, passes {c.passes}", flush=True)
            for line in c.output_tail:
                print(f"    | {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
