"""Re-run one of ``make bench``'s moub conversions and time it.

Run (after ``make bench``, which writes each conversion's job file):
    .venv/bin/python tools/convert_job.py benchmarks/out/full/det/moub_best/moub_adaptive_drop0.05.job.json

Converts the job's model on its search split with its settings (``--workers``, default the
bench's 2), prints the wall time of the whole search and whether the file is byte for byte
the one the bench wrote. Why: a change that claims a faster converter must leave every
file the same; timing it against the code before the change, back to back on the same
machine (``git checkout OLD -- FILES``, run, ``git checkout HEAD -- FILES``, run), is the
measurement (the bench's own search times vary by up to a third between runs).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/convert_job.moub"))
    args = ap.parse_args()
    from moub_converters.api import convert

    job = json.loads(args.job.read_text())
    started = time.perf_counter()
    result = convert(job["model"], data=job["data"], metric=job["metric"], max_drop=job["max_drop"], mode=job["mode"],
                     seed=job["seed"], workers=args.workers, quiet=True)
    wall = time.perf_counter() - started
    result.write(args.out)
    same = args.out.read_bytes() == Path(job["out"]).read_bytes()
    print(f"{args.job.parent.parent.name}: search {wall:.1f} s, {args.out.stat().st_size:,} bytes, "
          f"{'the same bytes as' if same else 'DIFFERENT from'} {job['out']}")


if __name__ == "__main__":
    main()
