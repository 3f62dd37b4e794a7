"""Which metric fits each output of a model, and why.

A model's outputs are not all class scores: a regressor gives one value per sample, a binary
classifier one logit, a detector boxes and scores per anchor, an embedding model a vector whose
top-1 means nothing, a recurrent model its next state. Scoring them all by the top-1 of the last
axis (or by a per-sample cosine, which for one value per sample only checks its sign) reports
"no loss" for files that change what the model says. Each output head gets the metric that
matches what it is, decided from the graph (the op that makes the output) and the original
model's outputs on the user's samples, and the decision is printed with its reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .metrics import row_chunks, rows_first, whole_channel_energy

# Ops that move or relabel values without computing new ones: looked through to find what
# made an output.
_LAYOUT_OPS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast",
                         "QuantizeLinear", "DequantizeLinear"})
# Above this many classes a last axis is more likely features than classes.
MAX_CLASSES = 1000


@dataclass(frozen=True)
class Head:
    """One scored output: its name, its position among the graph outputs, the metric that judges
    it, the decision threshold (for ``decision``) and the reason the metric was chosen."""

    name: str
    index: int
    metric: str
    reason: str
    threshold: float | None = None


# A mean, maximum or minimum of probabilities is still a probability the user thresholds (a
# frame's speech probability averaged over its windows).
_PROBABILITY_KEEPING = frozenset({"ReduceMean", "ReduceMax", "ReduceMin"})


def producers(model: onnx.ModelProto) -> dict[str, str]:
    """Output name -> op type of the first node that computes its values (layout ops looked
    through, an ``If`` whose branches both end in the same op type counted as that op, a mean or
    extreme of Sigmoid or Softmax outputs counted as the Sigmoid or Softmax), or "" for an output
    that is a graph input or an initializer."""
    scopes = [_made_by(model.graph)]
    return {output.name: _producer(output.name, scopes) for output in model.graph.output}


def _made_by(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _producer(name: str, scopes: list[dict[str, onnx.NodeProto]]) -> str:
    """``scopes``: the node of each value name, innermost graph last (a branch reads the values
    of the graphs around it)."""
    op = ""
    for _ in range(sum(map(len, scopes)) + 1):
        node = next((scope[name] for scope in reversed(scopes) if name in scope), None)
        if node is None:
            break
        op = node.op_type
        if op == "If" and len(scopes) < 8:
            position = list(node.output).index(name)
            branches = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            ops = {_producer(g.output[position].name, [*scopes, _made_by(g)]) for g in branches
                   if position < len(g.output)}
            return ops.pop() if len(ops) == 1 and len(branches) == 2 else op
        if op in _PROBABILITY_KEEPING and node.input:
            inner = _producer(node.input[0], scopes)
            return inner if inner in ("Sigmoid", "Softmax") else op
        if op not in _LAYOUT_OPS or not node.input:
            break
        name = node.input[0]
    return op


def _values_per_sample(shape: Sequence[int], samples: int) -> int:
    total = int(np.prod(shape, dtype=np.int64))
    return total // samples if samples and total % samples == 0 else total


# Channels of one output whose RMS differ this much are judged each on its own scale: a relative L2
# error over the whole output would let the quiet ones (scores beside pixel boxes) change freely.
MIN_CHANNEL_SPREAD = 10.0
MAX_CHANNELS = 4096


def channel_spread(reference: np.ndarray) -> float:
    """Largest over smallest RMS of the channels on axis 1 (rows-first ``[N, C, ...]`` with more
    values per channel than one), 1.0 where there are no such channels or a channel is silent."""
    if reference.ndim < 3 or reference.dtype.kind != "f" or not 2 <= reference.shape[1] <= MAX_CHANNELS:
        return 1.0
    energy = whole_channel_energy(reference)
    rms = np.sqrt(energy / (reference.size // reference.shape[1]))
    if not np.all(np.isfinite(rms)) or rms.min() <= 0:
        return 1.0
    return float(rms.max() / rms.min())


def finite_range(values: np.ndarray) -> tuple[float, float]:
    """(least, greatest) finite value, (0, 0) where there is none; a few rows at a time."""
    lo, hi = np.inf, -np.inf
    for (chunk,) in row_chunks(rows_first(values)):
        finite = chunk[np.isfinite(chunk)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def choose_head(name: str, index: int, producer: str, reference: np.ndarray, samples: int,
                labels: np.ndarray | None) -> Head:
    """The metric for one output from what makes it and the original's values (``reference``: the
    output over ``samples`` samples, any layout); ``labels`` apply to the first output only."""
    if reference.dtype.kind not in "fc":
        return Head(name, index, "match", f"{reference.dtype} values: the share of values left unchanged")
    lo, hi = finite_range(reference)
    in_unit = 0.0 <= lo and hi <= 1.0
    classes = int(reference.shape[-1]) if reference.ndim else 1
    per_sample = _values_per_sample(reference.shape, samples)
    if producer in ("Softmax", "LogSoftmax") and classes >= 2:
        if labels is not None:
            return Head(name, index, "accuracy", f"class scores ({producer} over {classes}) with labels: top-1 accuracy")
        return Head(name, index, "agreement", f"class scores ({producer} over {classes}): top-1 agreement with the original")
    if producer == "Sigmoid" and per_sample > 1:
        return Head(name, index, "mask", f"{per_sample} independent probabilities per sample (Sigmoid): decisions at "
                                         "0.5 kept, changes counted against the original's rarer decision")
    if producer == "Sigmoid" or (per_sample == 1 and in_unit and labels is not None):
        return Head(name, index, "decision", f"one probability ({producer or 'values in [0, 1]'}): decisions at 0.5 "
                                             "kept", threshold=0.5)
    if per_sample == 1 and labels is not None:
        return Head(name, index, "decision", "one logit per sample with labels: decisions at 0 kept", threshold=0.0)
    if labels is not None and reference.ndim >= 2 and 2 <= classes <= MAX_CLASSES:
        return Head(name, index, "accuracy", f"{classes} scores per row with labels: top-1 accuracy")
    if producer in ("Gemm", "MatMul", "Add") and reference.ndim == 2 and 2 <= classes <= MAX_CLASSES:
        return Head(name, index, "agreement", f"{classes} scores from a final linear layer: top-1 agreement "
                                              "(use --metric l2 if they are features, not classes)")
    spread = channel_spread(reference)
    if spread >= MIN_CHANNEL_SPREAD:
        return Head(name, index, "channels", f"{per_sample} values per sample whose channels (axis 1, "
                    f"{reference.shape[1]}) differ {spread:.0f}x in scale (boxes beside scores): relative L2 error "
                    "per channel, the worst decides")
    if per_sample == 1:
        return Head(name, index, "l2", "one value per sample, no labels: a regression value, relative L2 error "
                                       "(give 0/1 labels if it is a binary logit)")
    return Head(name, index, "l2", f"{per_sample} values per sample ({producer or 'input'}): relative L2 error "
                                   "over the output")


def choose_heads(model: onnx.ModelProto, reference: Sequence[np.ndarray], samples: int, labels: np.ndarray | None,
                 only: Sequence[str] | None = None) -> list[Head]:
    """One :class:`Head` per scored output: all of them, or those named in ``only``."""
    names = [o.name for o in model.graph.output]
    made = producers(model)
    picked = range(len(names)) if not only else [names.index(n) for n in only]
    return [choose_head(names[i], i, made.get(names[i], ""), reference[i], samples, labels if i == 0 else None)
            for i in picked]


def _registered(head: Head) -> str:
    """The registry's name for a head's metric (a decision metric per threshold)."""
    if head.metric == "decision":
        return "decision" if head.threshold == 0.5 else "logit-decision"
    return head.metric


def default_metric(model: onnx.ModelProto, reference: Sequence[np.ndarray], samples: int, labels: np.ndarray | None,
                   names: Sequence[str]) -> tuple[str, str, tuple[tuple[int, str], ...]]:
    """The metric the converter judges by when the user names none, why, and the heads it judges.

    One scored output takes its head's metric. Several outputs are each judged by their own
    metric and the largest loss decides (the composite metric ``heads``): a top-1 of one head
    says nothing of the others, and one L2 error over all of them lets a small head move far.
    One logit or probability per sample is judged by the decisions it makes at its natural
    threshold; a Sigmoid's many independent probabilities per sample (a map, notes, labels) by the
    decisions that change as a share of the original's rarer decision, since in a sparse map a
    share of all values lets the few that are on all change."""
    made = producers(model)
    found = [choose_head(name, i, made.get(name, ""), reference[i], samples, labels if i == 0 else None)
             for i, name in enumerate(names)]
    judged = [(h, _registered(h)) for h in found]
    if len(judged) == 1:
        head, metric = judged[0]
        return metric, head.reason, ()
    listed = "; ".join(f"{h.name}: {m} ({h.reason})" for h, m in judged)
    return "heads", f"{len(judged)} outputs, each by its own metric, the worst decides: {listed}", \
        tuple((h.index, m) for h, m in judged)
