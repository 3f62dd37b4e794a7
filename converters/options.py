"""Every converter option in one typed, validated structure (the CLI and the API share it)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .binning import REPRESENTATIVES
from .errors import OptionError
from .evaluate import STRATEGIES
from .metrics import METRICS

# Defaults, with the reasons measured in issue 3's report.
MAX_DROP = 0.005
POPULATION = 8           # one decision variable: a small population covers the range
GENERATIONS = 12
PATIENCE = 2             # stop when the front's bin counts have not changed for this many generations
MAX_BINS = 65536         # BatchNorm-folded models need up to 2^16 bins (DESIGN.md); log-scaled variable
STEPS_PER_OCTAVE = 4     # bin counts searched: round(2^(j/4)), about 19% apart; merging refines between them
MIN_ELEMENTS = 1024
MERGE_BUDGET = 8         # evaluations spent merging bins of the front's feasible solutions
ABORT_FACTOR = 4.0       # an evaluation stops once its drop is proven >= max(ABORT_FACTOR * max_drop, ABORT_MIN)
ABORT_MIN = 0.02
WAVE = 2                 # search candidates evaluated together; later waves know earlier results
# The default method: measured to give smaller files than the paper's at the same fidelity on the
# bench's real models (benchmarks/RESULTS.md); `--mode paper` stays the paper's method, unchanged.
DEFAULT_MODE = "adaptive"
MAX_BINS_LIMIT = 1 << 20  # the container's Huffman codes are at most 20 bits long


@dataclass(frozen=True)
class ConvertOptions:
    metric: str | None = None
    max_drop: float = MAX_DROP
    mode: str = DEFAULT_MODE
    seed: int = 0
    workers: int = 1
    population: int = POPULATION
    generations: int = GENERATIONS
    patience: int = PATIENCE
    max_bins: int = MAX_BINS
    min_elements: int = MIN_ELEMENTS
    merge_budget: int = MERGE_BUDGET
    batch_size: int | None = None
    bins: int | None = None
    representative: str = "mean"
    strategy: str = "auto"
    abort_drop: float | None = None  # None: max(ABORT_FACTOR * max_drop, ABORT_MIN); inf: never stop early
    wave: int = WAVE
    monotone: bool = True  # a candidate is within tolerance only if no larger evaluated one is outside it
    bias_correction: bool = True  # adaptive mode: biases absorb their layer's mean quantization shift
    error_feedback: bool = True   # adaptive mode: channel-mixing layers rounded with GPTQ's error feedback

    def validated(self) -> ConvertOptions:
        """Raise OptionError naming the option, its value and the allowed range."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise OptionError(message)

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        need(self.metric is None or self.metric in METRICS, f"--metric {self.metric!r} is not one of {', '.join(METRICS)}")
        need(isinstance(self.max_drop, (int, float)) and math.isfinite(self.max_drop) and 0 <= self.max_drop <= 1,
             f"--max-drop {self.max_drop!r} must be a number in [0, 1]")
        need(is_int(self.seed) and 0 <= self.seed < 2**32, f"--seed {self.seed!r} must be an integer in [0, 2^32)")
        need(is_int(self.workers) and 1 <= self.workers <= 256, f"--workers {self.workers!r} must be in [1, 256]")
        need(is_int(self.population) and 4 <= self.population <= 1000, f"--population {self.population!r} must be in [4, 1000]")
        need(is_int(self.generations) and 1 <= self.generations <= 10000, f"--generations {self.generations!r} must be in [1, 10000]")
        need(is_int(self.patience) and 1 <= self.patience, f"patience {self.patience!r} must be at least 1")
        need(is_int(self.max_bins) and 2 <= self.max_bins <= MAX_BINS_LIMIT, f"--max-bins {self.max_bins!r} must be in [2, {MAX_BINS_LIMIT}]")
        need(is_int(self.min_elements) and self.min_elements >= 1, f"--min-elements {self.min_elements!r} must be at least 1")
        need(is_int(self.merge_budget) and self.merge_budget >= 0, f"--merge-budget {self.merge_budget!r} must be at least 0")
        need(self.batch_size is None or (is_int(self.batch_size) and self.batch_size >= 1), f"--batch-size {self.batch_size!r} must be at least 1")
        need(self.bins is None or (is_int(self.bins) and 1 <= self.bins <= MAX_BINS_LIMIT), f"--bins {self.bins!r} must be in [1, {MAX_BINS_LIMIT}]")
        need(self.representative in REPRESENTATIVES, f"representative {self.representative!r} is not one of {', '.join(REPRESENTATIVES)}")
        need(self.strategy in STRATEGIES, f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        need(isinstance(self.monotone, bool), f"monotone {self.monotone!r} must be True or False")
        need(isinstance(self.bias_correction, bool), f"bias_correction {self.bias_correction!r} must be True or False")
        need(isinstance(self.error_feedback, bool), f"error_feedback {self.error_feedback!r} must be True or False")
        need(is_int(self.wave) and 1 <= self.wave <= 1000, f"wave {self.wave!r} must be in [1, 1000]")
        need(self.abort_drop is None or (isinstance(self.abort_drop, (int, float)) and self.abort_drop >= self.max_drop),
             f"abort_drop {self.abort_drop!r} must be at least --max-drop {self.max_drop}")
        return self

    def effective_abort_drop(self) -> float:
        return self.abort_drop if self.abort_drop is not None else max(ABORT_FACTOR * self.max_drop, ABORT_MIN)

    def settings(self) -> dict:
        """What determines the result (provenance). Workers and batch size do not: same
        file whatever they are (batch size can change float rounding, so it is kept)."""
        out = asdict(self)
        out.pop("workers")
        out.pop("strategy")
        if self.mode == "paper":  # the paper's method has no bias correction: its files stay as they were
            out.pop("bias_correction")
            out.pop("error_feedback")
        return out
