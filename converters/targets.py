"""A size target (``--target-bytes``, ``--target-ratio``): which evaluated candidate to write.

The search explores around the tolerance; a target asks a different question, the least loss
at a given size. Of the evaluated candidates whose file fits, the one with the least loss on
the search data is written: measured ones before those stopped early (their loss is only a
lower bound), and among equal losses the larger file (it is still within the target, and
more bits never cost quality on average). Whether the written file stays within
``--max-drop`` is measured on all the data and said, not required.

A candidate's file size is its weights (its bits per weight, the quantity the search
minimises) plus the bytes every file of the model spends alike (graph, pass-through
tensors, index): learnt from the first file encoded, and checked on every file written.
"""

from __future__ import annotations

from collections.abc import Sequence

from .candidates import Candidate

MAX_TRIES = 8  # files encoded before giving up on a target the estimates keep missing


def preference(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Measured first, least loss first, then the larger file."""
    return sorted(candidates, key=lambda c: (not c.complete, c.loss, -c.bits_per_weight, c.name))


def fitting(candidates: Sequence[Candidate], n_weights: int, target_bytes: int, other_bytes: int) -> list[Candidate]:
    """The candidates whose estimated file (weights + ``other_bytes``) fits ``target_bytes``, by preference."""
    return preference([c for c in candidates if c.bits_per_weight * n_weights / 8 + other_bytes <= target_bytes])


def smallest(candidates: Sequence[Candidate]) -> Candidate | None:
    return min(candidates, key=lambda c: (c.bits_per_weight, c.name), default=None)
