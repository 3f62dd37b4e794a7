"""Each peer's setting chosen the way the converter chooses its own: on the search split.

`make bench` sweeps every peer's knob on the test split and keeps the coarsest setting that passes
there, which is choosing on the data the row is judged on. The converter may only look at the
search split. This tool takes a finished bench run's peer files (`OUT/work/MODEL/PEER/`), scores
each decoded candidate by the model's own criterion on the search split too, and reports, per
model and peer, the smallest candidate that passes on the search split with its test-split
fidelity: what a user of that peer, holding the same samples as the converter, would have
shipped. Only the candidates the test-split sweep visited are known, so a peer's choice here can
be coarser than its true search-split optimum by one sweep step, never finer.

    python -m benchmarks.zoo.search_choice OUT [--models a,b]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from . import ZOO, get

# peer folder -> (compressed file pattern, decoded .onnx name from the compressed file's stem)
FILES = {
    "kmeans": ("kmeans_k*.kmh", lambda p: p.with_suffix(".onnx"), lambda p: "k=" + p.stem.split("_k")[1]),
    "nncodec": ("nnc_qp*.nnc", lambda p: p.with_suffix(".onnx"), lambda p: "qp=" + p.stem.split("_qp")[1]),
    "int8": ("int8_*.onnx", lambda p: p, lambda p: p.stem.removeprefix("int8_")),
    "fp16": ("model_fp16.onnx", lambda p: p, lambda p: "fp16"),
    "zstd": ("model.onnx.zst", lambda p: p.with_name("decoded.onnx"), lambda p: "level 19"),
}


@dataclass
class Choice:
    model: str
    peer: str
    setting: str
    ratio: float
    search: str
    test: str
    passes_test: bool


def choose(model_name: str, work: Path) -> list[Choice]:
    model = get(model_name)
    onnx_bytes = model.path().stat().st_size
    search, test = model.split("search"), model.split("test")
    out = []
    for peer, (pattern, decoded_of, setting_of) in FILES.items():
        folder = work / model_name / peer
        scored = []
        for packed in sorted(folder.glob(pattern)) if folder.is_dir() else []:
            decoded = decoded_of(packed)
            if not decoded.is_file():
                continue
            on_search = model.score(decoded, search)
            scored.append((packed.stat().st_size, packed, decoded, on_search))
        passing = [s for s in scored if model.passes(s[3])]
        if not passing:
            if scored:
                out.append(Choice(model_name, peer, "none passes on the search split", 0.0, "", "", False))
            continue
        size, packed, decoded, on_search = min(passing, key=lambda s: s[0])
        on_test = model.score(decoded, test)
        out.append(Choice(model_name, peer, setting_of(packed), onnx_bytes / size, on_search.describe(),
                          on_test.describe(), model.passes(on_test)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a bench run's --out folder (holds work/MODEL/PEER)")
    ap.add_argument("--models", help="comma-separated zoo models (default: every one with a work folder)")
    args = ap.parse_args(argv)
    work = args.out / "work"
    names = args.models.split(",") if args.models else [n for n in ZOO if (work / n).is_dir()]
    print("| model | peer | setting chosen on the search split | ratio | search split | test split | passes on test |")
    print("|---|---|---|---:|---|---|:---:|")
    for name in names:
        for c in choose(name, work):
            ratio = f"{c.ratio:.2f}" if c.ratio else "–"
            print(f"| {c.model} | {c.peer} | {c.setting} | {ratio} | {c.search} | {c.test} | "
                  f"{'yes' if c.passes_test else 'no'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
