"""Would steps per channel group of one big tensor beat one step for the whole tensor?

Run (after ``make bench``, which writes the search split):
    .venv/bin/python experiments/channel_sensitivity.py magika [WEIGHT-NAME] [--samples 200] [--groups 32]

The adaptive mode gives every tensor one uniform step. A tensor whose output channels (or
input channels) differ in how much their rounding error costs would gain from a step per
channel group: at high rate, allocating bits to equal-size groups of sensitivities s_g saves
``0.5 * log2(mean(s) / geomean(s))`` bits per weight at the same total error. This script
measures both sides of that on the bench's search split, with onnxruntime:

* output channels: uniform noise of a quarter of the tensor's standard deviation is added to
  one group of output channels (axis 0) at a time, and the mean KL divergence of the model's
  first output from the original is the group's sensitivity; two noise draws show how much of
  the spread is the draw rather than the channels;
* input channels (Conv, MatMul, Gemm weights): the mean square of the layer's input per input
  channel, the diagonal of the H that error feedback uses.

Why: magika's Conv_0 holds 84% of its weights, and magika is the bench model where moub's own
choice stays behind NNCodec. On it both savings are under 0.01 bits/weight (a LayerNorm feeds the
layer and another follows its max-pool), so per-channel steps are not worth a format feature
(docs/decisions/0019-per-channel-steps.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.models import model_path  # noqa: E402

BATCH = 50
NOISE_OF_STD = 0.25


def allocation_gain(sensitivities: np.ndarray) -> tuple[float, float]:
    """(mean / geometric mean, the high-rate bits/weight a step per group would save)."""
    ratio = float(sensitivities.mean() / np.exp(np.log(sensitivities).mean()))
    return ratio, 0.5 * float(np.log2(ratio))


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Paddle2ONNX exports (rapidocr) keep their weights in Constant nodes: make them initializers."""
    for node in [n for n in model.graph.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"]:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
        model.graph.node.remove(node)


def weight_and_consumer(model: onnx.ModelProto, name: str | None) -> tuple[onnx.TensorProto, onnx.NodeProto | None]:
    """The named float initializer (default: the largest) and the node reading it as input 1."""
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    tensor = max(floats, key=lambda t: int(np.prod(t.dims))) if name is None else next(t for t in floats if t.name == name)
    consumer = next((n for n in model.graph.node if len(n.input) > 1 and n.input[1] == tensor.name), None)
    return tensor, consumer


def run_batches(session: ort.InferenceSession, feeds: dict[str, np.ndarray], extra: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    n = len(next(iter(feeds.values())))
    parts = [session.run(outputs, {**{k: v[i : i + BATCH] for k, v in feeds.items()}, **extra}) for i in range(0, n, BATCH)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("weight", nargs="?")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--groups", type=int, default=32)
    args = ap.parse_args()
    model = onnx.load(str(model_path(args.model)))
    constants_to_initializers(model)
    search = np.load(Path(__file__).resolve().parents[1] / "benchmarks" / "out" / "full" / args.model / "search.npz")
    feeds = {k: search[k][: args.samples] for k in search.files}
    tensor, consumer = weight_and_consumer(model, args.weight)
    w = numpy_helper.to_array(tensor).astype(np.float32)
    print(f"{args.model}: {tensor.name} {list(w.shape)}, {w.size} weights, read by {consumer.op_type if consumer else 'nothing'}")

    # The weight becomes a graph input, so that one session serves every noisy copy.
    model.graph.initializer.remove(tensor)
    model.graph.input.append(helper.make_tensor_value_info(tensor.name, onnx.TensorProto.FLOAT, list(w.shape)))
    layer_input = consumer.input[0] if consumer is not None and consumer.op_type in ("Conv", "MatMul", "Gemm") else None
    if layer_input is not None:
        model.graph.output.append(helper.make_tensor_value_info(layer_input, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    first = session.get_outputs()[0].name
    original, *activations = run_batches(session, feeds, {tensor.name: w}, None if layer_input is None else [first, layer_input])
    log_original = np.log(np.maximum(original.reshape(len(original), -1), 1e-30))

    def kl(weights: np.ndarray) -> float:
        got = run_batches(session, feeds, {tensor.name: weights}, [first])[0].reshape(len(original), -1)
        p = np.exp(log_original)
        return float((p * (log_original - np.log(np.maximum(got, 1e-30)))).sum(1).mean())

    rng = np.random.default_rng(0)
    half = NOISE_OF_STD * float(w.std()) / 2
    bounds = np.linspace(0, w.shape[0], args.groups + 1).astype(int)
    draws = []
    for _ in range(2):
        draw = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            noisy = w.copy()
            noisy[a:b] += rng.uniform(-half, half, size=noisy[a:b].shape).astype(np.float32)
            draw.append(kl(noisy))
        draws.append(np.maximum(np.array(draw), 1e-30))
    everything = kl(w + rng.uniform(-half, half, size=w.shape).astype(np.float32))
    for i, draw in enumerate(draws):
        ratio, bits = allocation_gain(draw)
        print(f"  output channels, {args.groups} groups, draw {i + 1}: KL per group relative to the mean "
              f"{np.round(np.percentile(draw / draw.mean(), [0, 50, 100]), 2).tolist()} (min, median, max); "
              f"mean/geomean {ratio:.4f} -> {bits:.4f} bits/weight")
    print(f"  the two draws' log sensitivities correlate {np.corrcoef(np.log(draws[0]), np.log(draws[1]))[0, 1]:.2f}; "
          f"noise on every group at once: KL {everything:.3g} against the groups' sum {draws[0].sum():.3g}")
    if activations:
        x = activations[0].astype(np.float64)
        axis = 1 if consumer.op_type == "Conv" else x.ndim - 1
        energy = (x**2).mean(axis=tuple(i for i in range(x.ndim) if i != axis))
        ratio, bits = allocation_gain(np.maximum(energy, 1e-30))
        print(f"  input channels ({energy.size}): E[x^2] from {energy.min():.3g} to {energy.max():.3g}; "
              f"mean/geomean {ratio:.4f} -> {bits:.4f} bits/weight")


if __name__ == "__main__":
    main()
