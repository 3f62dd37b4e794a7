"""What error feedback on kernel patches would do for magika's Conv_0 (84% of its weights).

Run: .venv/bin/python experiments/patch_feedback_gain.py     (about 3 minutes; needs the bench's magika data)

Conv_0 is a 5x1 Conv, which ``converters/error_feedback.py`` leaves to nearest rounding. Here
its weights alone are rounded at three steps, nearest and with GPTQ on the im2col patches
(``H`` from half of the bench's search split, or all of it, at several dampings), every other
tensor fp32; each rounding is judged on the 500 test files: KL divergence of the scores,
top-1 flips, and the relative output error ``tr(D H D^T) / tr(W H W^T)`` under the ``H`` of the
half that fitted it and of the test files. Why: it shows that GPTQ on patches generalizes here
(6.04 bits/weight: output error 1.63e-4 -> 1.21e-4 on the test files, 1.15e-4 on the fitting
half; KL 2.25e-4 -> 1.81e-4), so wide-kernel error feedback fails on selection, not on
overfitting (docs/decisions/0016-wide-kernel-error-feedback.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.inputs import load_model_and_inputs  # noqa: E402
from moub_converters.error_feedback import feedback_levels  # noqa: E402

KERNEL = 5
BATCH = 25
RELATIVE_STEPS = (2 ** -4.5, 2 ** -4, 2 ** -3.5)  # in units of the weights' standard deviation


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def patch_gram(probe: ort.InferenceSession, source: str, feed: str, inputs: np.ndarray) -> np.ndarray:
    """E[p p^T] over every 5x1 patch Conv_0 sees, in its weight's (channel, tap) order."""
    h, rows = 0.0, 0
    for start in range(0, len(inputs), BATCH):
        x = probe.run([source], {feed: inputs[start : start + BATCH]})[0][..., 0]  # (B, C, L)
        length = x.shape[2]
        patches = np.stack([x[:, :, k : length - KERNEL + 1 + k] for k in range(KERNEL)], axis=2)
        patches = patches.transpose(0, 3, 1, 2).reshape(-1, x.shape[1] * KERNEL).astype(np.float64)
        h = h + patches.T @ patches
        rows += patches.shape[0]
    return h / rows


def inverse_factor(h: np.ndarray, damping: float) -> np.ndarray:
    h = h.copy()
    h[np.diag_indices_from(h)] += damping * float(np.mean(np.diag(h)))
    return np.linalg.cholesky(np.linalg.inv(h)).T


def entropy(levels: np.ndarray) -> float:
    _, counts = np.unique(levels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def relative_error(quantized: np.ndarray, weights: np.ndarray, h: np.ndarray) -> float:
    d = quantized - weights
    return float(np.einsum("ij,jk,ik->", d, h, d) / np.einsum("ij,jk,ik->", weights, h, weights))


def main() -> None:
    path, search = load_model_and_inputs("magika", "search")
    _, test = load_model_and_inputs("magika", "test")
    model = onnx.load(path)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    source, weight_name = conv.input[0], conv.input[1]
    feed = next(iter(search))
    probe_model = onnx.load(path)
    probe_model.graph.output.append(onnx.ValueInfoProto(name=source))
    probe = session(probe_model)
    n = len(search[feed])
    grams = {"half": patch_gram(probe, source, feed, search[feed][: n // 2]),
             "all": patch_gram(probe, source, feed, search[feed]),
             "test": patch_gram(probe, source, feed, test[feed])}
    initializer = next(t for t in model.graph.initializer if t.name == weight_name)
    original = numpy_helper.to_array(initializer)
    weights = original.reshape(original.shape[0], -1).astype(np.float64)
    reference = session(model).run(None, {feed: test[feed]})[0]

    def judge(quantized: np.ndarray) -> tuple[float, int]:
        initializer.CopyFrom(numpy_helper.from_array(quantized.reshape(original.shape).astype(np.float32), weight_name))
        scores = session(model).run(None, {feed: test[feed]})[0]
        kl = float(np.mean(np.sum(reference * (np.log(reference + 1e-12) - np.log(scores + 1e-12)), -1)))
        return kl, int((reference.argmax(-1) != scores.argmax(-1)).sum())

    variants = [("nearest", None)]
    variants += [(f"GPTQ, H of half, damping {d}", inverse_factor(grams["half"], d)) for d in (0.01, 0.1, 0.3, 1.0)]
    variants += [(f"GPTQ, H of all, damping {d}", inverse_factor(grams["all"], d)) for d in (0.1, 0.3)]
    sigma = float(weights.std())
    for relative in RELATIVE_STEPS:
        step = sigma * relative
        for name, factor in variants:
            levels = np.rint(weights / step) if factor is None else feedback_levels(weights, step, factor).astype(np.float64)
            quantized = levels * step
            kl, flips = judge(quantized)
            print(f"step {relative:.4f} sigma  {name:30s} {entropy(levels):.3f} bits/weight  test KL {kl:.2e}  "
                  f"flips {flips:2d}/{len(reference)}  output error: fitting half {relative_error(quantized, weights, grams['half']):.2e}"
                  f"  test {relative_error(quantized, weights, grams['test']):.2e}", flush=True)


if __name__ == "__main__":
    main()
