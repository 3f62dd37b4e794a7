"""A copy of a model with room for extra nodes and outputs: how calibration reads layer inputs."""

from __future__ import annotations

import onnx


def probe_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """A copy of ``model`` and the value names its main graph already uses (new names must avoid them)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    taken = {v for n in graph.node for v in n.output} | {t.name for t in graph.initializer} | {i.name for i in graph.input}
    return probe, taken


def fresh_prefix(base: str, taken: set[str]) -> str:
    """``base`` with underscores appended until no taken name starts with it."""
    while any(name.startswith(base) for name in taken):
        base += "_"
    return base
