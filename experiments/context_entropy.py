"""How much a context (the previous index) would save over the order-0 entropy that Huffman meets.

Run (on any .moub written by the adaptive mode, e.g. after ``make bench``):
    .venv/bin/python experiments/context_entropy.py benchmarks/out/full/magika/moub_best/*.moub

Each pack member of at least 5000 weights is turned back into its integer levels
(value / scale) and compared: H(level), H(level | |previous level| capped at 15) and
H(level | previous level clipped to +-20), in bits per weight. A context-adaptive coder
(DeepCABAC-like) can only gain what the conditional entropy is below H(level); on the bench's
files that is about 0.01 bits/weight (docs/decisions/0018-context-coding.md).
"""
from __future__ import annotations

import sys

import numpy as np

from moub_format import MoubFile


def entropy(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def conditional_entropy(values: np.ndarray, context: np.ndarray) -> float:
    keys, inverse = np.unique(context, return_inverse=True)
    return sum(int((inverse == k).sum()) * entropy(values[inverse == k]) for k in range(keys.size)) / values.size


def main(paths: list[str]) -> None:
    for path in paths:
        weights = saved = 0.0
        with MoubFile(path) as moub:
            for member, values in moub.iter_pack_members():
                if member.count < 5000:
                    continue
                levels = np.rint(values.astype(np.float64) / member.scale).astype(np.int64)
                previous = np.concatenate([[0], levels[:-1]])
                h0 = entropy(levels)
                h_mag = conditional_entropy(levels, np.minimum(np.abs(previous), 15))
                h_prev = conditional_entropy(levels, np.clip(previous, -20, 20))
                print(f"{path}: site {member.site:4d} {levels.size:8d} weights  H {h0:.3f}  "
                      f"H|prev magnitude {h_mag:.3f}  H|prev {h_prev:.3f} bits/weight")
                weights += levels.size
                saved += levels.size * (h0 - h_mag)
        if weights:
            print(f"{path}: saving of the magnitude context, weighted by weights: {saved / weights:.3f} bits/weight")


if __name__ == "__main__":
    main(sys.argv[1:])
