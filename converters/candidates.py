"""What a mode hands back: the candidates it evaluated, and the stage rows of the one written."""

from __future__ import annotations

from dataclasses import dataclass

from .solution import Size


@dataclass
class Candidate:
    """One evaluated solution. ``loss`` is a lower bound when ``complete`` is False."""

    name: str
    stage: str                 # e.g. "search", "merge"
    quality: float | None      # None: stopped before any sample ran
    loss: float                # the tolerance measure (metrics.py); feasible: loss <= max_drop
    complete: bool
    bits_per_weight: float     # estimate incl. codebooks and tables
    bins: int
    recipe: dict               # what ``materialize`` needs to rebuild it (JSON-able)
    stopped: str | None = None  # why an incomplete evaluation stopped: "tolerance" or "dominated"
    fitted_loss: float | None = None  # the loss a mode's choice rule used, if not the measured one

    def to_dict(self, quality_original: float) -> dict:
        return {
            "name": self.name,
            "stage": self.stage,
            "bins": self.bins,
            "quality": None if self.quality is None else round(self.quality, 6),
            "drop": None if self.quality is None or not self.complete else round(quality_original - self.quality, 6),
            "loss": round(self.loss, 6),
            "complete": self.complete,
            "stopped": self.stopped,
            "fitted_loss": None if self.fitted_loss is None else round(self.fitted_loss, 6),
            "bits_per_weight": round(self.bits_per_weight, 6),
            "recipe": self.recipe,
        }


    @classmethod
    def from_dict(cls, row: dict) -> Candidate:
        """A candidate as the report lists it (figures rounded as there)."""
        return cls(row["name"], row["stage"], row["quality"], float(row["loss"]), bool(row["complete"]),
                   float(row["bits_per_weight"]), int(row["bins"]), row["recipe"], row.get("stopped"),
                   row.get("fitted_loss"))


@dataclass
class Stage:
    """One row of the per-stage table (like the paper's Table I)."""

    name: str
    bins: int
    quality: float | None
    coding: str                # "fixed" (ceil(log2 bins) bits per index) or "huffman"
    size: Size


def candidate_from_result(result: dict) -> Candidate:
    """A Candidate from an evaluation's result dict (what the scoring functions return)."""
    return Candidate(result["name"], result["stage"], result["quality"], float(result["loss"]), bool(result["complete"]),
                     float(result["bits_per_weight"]), int(result["bins"]), result["recipe"], result["stopped"])
