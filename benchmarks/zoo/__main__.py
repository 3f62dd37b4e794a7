"""`python -m benchmarks.zoo`: list the zoo, build inputs, write data files, score a candidate."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from . import ZOO, ZooUnavailable, get


def _describe(name: str) -> str:
    model = get(name)
    try:
        where = f"{model.path()} ({model.path().stat().st_size:,} B)"
    except ZooUnavailable as exc:
        where = f"unavailable: {exc}"
    return f"{name}: {model.title} [{model.dist} {model.version()}] {where}"


def _candidate_onnx(path: Path, tmp: Path) -> Path:
    """A .moub is decoded to its runnable ONNX model first; an .onnx is used as it is."""
    if path.suffix != ".moub":
        return path
    from moub_runtime import decode_to_onnx

    out = tmp / (path.stem + ".onnx")
    decode_to_onnx(path, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every zoo model, its wheel and file")
    build = sub.add_parser("build", help="make (and cache) the inputs of some models")
    build.add_argument("models", nargs="*", default=list(ZOO))
    write = sub.add_parser("write", help="write a split as a feeds folder and, where possible, DATA.npz")
    write.add_argument("model")
    write.add_argument("out", type=Path)
    write.add_argument("--split", default="search", choices=("search", "test"))
    write.add_argument("--max-samples", type=int)
    score = sub.add_parser("score", help="fidelity of a candidate (.onnx or .moub) on the test split")
    score.add_argument("model")
    score.add_argument("candidate", type=Path)
    args = ap.parse_args(argv)

    if args.command == "list":
        for name in ZOO:
            print(_describe(name))
    elif args.command == "build":
        for name in args.models:
            model = get(name)
            samples = model.samples()
            print(f"{name}: {len(samples.feeds)} samples in {samples.n_groups} groups -> {model.cache_dir()}", flush=True)
    elif args.command == "write":
        for kind, path in get(args.model).write_data(args.out, args.split, args.max_samples).items():
            print(f"{kind}: {path}")
    elif args.command == "score":
        model = get(args.model)
        with tempfile.TemporaryDirectory() as tmp:
            fid = model.score(_candidate_onnx(args.candidate, Path(tmp)), model.split("test"))
        print(f"{args.model}: {fid.describe()} ({'passes' if model.passes(fid) else 'fails'}: {model.pass_rule})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
