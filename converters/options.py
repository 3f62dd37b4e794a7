"""Every converter option, declared once: its type, default, CLI flag, help and allowed values.

:class:`ConvertOptions` is the one declaration. Each field's metadata (:func:`option`) carries
what the CLI needs (flag, help, choices); :func:`add_arguments` builds ``moub convert``'s flags
from it, and ``convert()`` takes the same names as keywords (its signature is derived from the
fields, ``api.py``). A field whose default differs by mode declares it ``per_mode`` and
defaults to None until the options are built. The method behind the defaults is described in
``docs/method.md``.
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import Field, asdict, dataclass, field, fields

from .binning import REPRESENTATIVES
from .data import DEFAULT_BATCH_SIZE
from .errors import OptionError
from .evaluate import STRATEGIES
from .metrics import user_metrics
from .uniform import RAM_LEVEL_LIMITS

MAX_DROP = 0.005
MAX_SENSIBLE_DROP = 0.2  # a fifth of the quality: beyond it a file is a different model (and "1" usually means 1%)
POPULATION = 8           # one decision variable: a small population covers the range
GENERATIONS = 12
PATIENCE = 2             # stop when the front's decisions have not changed for this many generations
MAX_BINS = 65536         # BatchNorm-folded models need up to 2^16 bins; the bin count is searched on a log scale
MIN_ELEMENTS = 1024      # the paper pools tensors of at least this many weights
ADAPTIVE_MIN_ELEMENTS = 16  # biases and BatchNorm vectors too: a large share of small models' files
MERGE_BUDGET = 8         # evaluations spent merging bins of the front's feasible solutions
ABORT_FACTOR = 4.0       # an evaluation stops once its drop is proven >= max(ABORT_FACTOR * max_drop, ABORT_MIN)
ABORT_MIN = 0.02
WAVE = 2                 # search candidates evaluated together; later waves know earlier results
# The default method gives smaller files than the paper's at the same fidelity on the bench's
# real models (benchmarks/RESULTS.md); `--mode paper` stays the paper's method, unchanged.
DEFAULT_MODE = "adaptive"
PAPER_MODE = "paper"     # ``--bins K`` encodes the paper's way, so it takes the paper's defaults
MAX_BINS_LIMIT = 1 << 20  # the container's Huffman codes are at most 20 bits long


def option(default, flag: str | None = None, help: str | None = None, *, type=None, choices: Sequence[str] | None = None,
           per_mode: Mapping[str, object] | None = None, negated: bool = False, provenance: bool = True,
           modes: Sequence[str] | None = None) -> Field:
    """A ConvertOptions field and what the CLI and the report need to know of it.

    ``flag``: the CLI flag (None: a keyword of ``convert()`` only); ``help`` may name
    ``{default}`` and each mode of ``per_mode``; ``negated``: the flag turns a True default off;
    ``provenance``: whether the value determines the file (the report's settings); ``modes``:
    the modes that read it (the settings of other modes leave it out)."""
    meta = {"flag": flag, "help": help, "type": type, "choices": choices, "per_mode": per_mode, "negated": negated,
            "provenance": provenance, "modes": modes}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ConvertOptions:
    metric: str | None = option(None, "--metric", "default: accuracy with labels, else agreement (classifiers) or cosine",
                                choices=user_metrics())
    max_drop: float = option(MAX_DROP, "--max-drop", "largest loss allowed: the metric's absolute drop; for accuracy the "
                             "share of samples the original gets right and the .moub wrong (default {default})", type=float)
    mode: str = option(DEFAULT_MODE, "--mode", "method (default {default}; paper: the MO-UB paper, faithfully)")
    seed: int = option(0, "--seed", "seeds the search: the same model, data and seed give the same file (default {default})",
                       type=int)
    workers: int = option(1, "--workers", "worker processes for evaluations (default {default})", type=int,
                          provenance=False)  # the same file with any number of workers
    population: int = option(POPULATION, "--population", "NSGA-II population (default {default})", type=int)
    generations: int = option(GENERATIONS, "--generations", "at most this many generations (default {default})", type=int)
    max_bins: int = option(MAX_BINS, "--max-bins", "largest bin count searched (default {default})", type=int)
    min_elements: int | None = option(None, "--min-elements", "smaller float tensors stay lossless (default: {paper} in "
                                      "paper mode and with --bins, {adaptive} in adaptive mode)", type=int,
                                      per_mode={PAPER_MODE: MIN_ELEMENTS, "adaptive": ADAPTIVE_MIN_ELEMENTS})
    merge_budget: int = option(MERGE_BUDGET, "--merge-budget", "evaluations spent merging bins (default {default})", type=int)
    bias_correction: bool = option(True, "--no-bias-correction", "adaptive mode: leave biases as quantized (default: each "
                                   "bias absorbs its layer's mean quantization shift)", negated=True, modes=("adaptive",))
    error_feedback: bool = option(True, "--no-error-feedback", "adaptive mode: round every weight to its nearest level "
                                  "(default: layers that mix channels are rounded with error feedback, GPTQ)", negated=True,
                                  modes=("adaptive",))
    batch_size: int | None = option(None, "--batch-size", f"samples per onnxruntime run (default {DEFAULT_BATCH_SIZE}: "
                                    "faster than large batches on one thread; 1 for samples of 4 MiB or more, whose "
                                    "activations would set the memory)", type=int)  # may change float rounding
    bins: int | None = option(None, "--bins", "fixed-bins encode with K equal-width bins: no search, no data needed", type=int)
    outputs: tuple[str, ...] = option((), "--score-output", "score only this output of the model (repeatable; default: every "
                                      "output, the worst decides)", type=str, provenance="if-set")
    ram: str = option("float", "--ram", "adaptive mode: int8 keeps each tensor's levels within a window int8 holds, so that a "
                      "compact session (moub_runtime.InferenceSession(..., compact=True)) holds one byte per weight (compact=True keeps "
                      "grouped Convs' and 8-bit MatMul weights float32 for speed, compact='smallest' holds them too); int4 also keeps the levels of weights that one MatMul or "
                      "Gemm alone reads within 16 values, which it holds in half a byte (onnxruntime's 4-bit MatMulNBits); the "
                      "search still picks the smallest file within --max-drop (default {default}: any level range)",
                      choices=tuple(RAM_LEVEL_LIMITS), modes=("adaptive",), provenance="if-set")
    representative: str = option("mean", "--representative", "each bin's value: member mean (default) or interval centre",
                                 choices=REPRESENTATIVES)
    target_bytes: int | None = option(None, "--target-bytes", "write the evaluated candidate with the least loss whose "
                                      "file fits N bytes, within --max-drop or not (said so)", type=int, provenance="if-set")
    target_ratio: float | None = option(None, "--target-ratio", "the same for a file R times smaller than the model",
                                        type=float, provenance="if-set")
    layer_shares: bool = option(True, "--no-layer-shares", "leave out each layer's share of the output error (default: "
                                "measured, two onnxruntime runs per tensor on a few samples)", negated=True,
                                provenance=False)  # the same file either way
    # keywords of convert() only
    patience: int = option(PATIENCE, help="the search stops when its front has not changed for this many generations "
                           "(default {default})")
    strategy: str = option("auto", help="how candidate weights reach onnxruntime: " + ", ".join(STRATEGIES) +
                           " (the same outputs; default {default})", choices=STRATEGIES, provenance=False)
    abort_drop: float | None = option(None, help=f"an evaluation stops once its loss provably exceeds this (default: "
                                      f"the larger of {ABORT_FACTOR:g} x max_drop and {ABORT_MIN}; inf: never)")
    wave: int = option(WAVE, help="search candidates evaluated together, each wave knowing the results of the waves "
                       "before it (default {default})")
    monotone: bool = option(True, help="a candidate is within tolerance only if no larger evaluated one is outside it "
                            "(default {default})")

    def __post_init__(self) -> None:
        """Fill the per-mode defaults left at None, for this mode (the paper's for ``--bins``)."""
        mode = PAPER_MODE if self.bins is not None else self.mode
        for f in fields(self):
            per_mode = f.metadata.get("per_mode")
            if per_mode and getattr(self, f.name) is None:
                object.__setattr__(self, f.name, per_mode.get(mode, per_mode[PAPER_MODE]))

    @classmethod
    def from_keywords(cls, keywords: Mapping[str, object]) -> ConvertOptions:
        """The validated options of ``convert(**keywords)``; an unknown name is a TypeError, as for any function."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(keywords) - known)
        if unknown:
            raise TypeError(f"convert() got an unexpected keyword argument {unknown[0]!r}")
        keywords = {k: tuple(v) if isinstance(v, list) else v for k, v in keywords.items()}
        return cls(**keywords).validated()

    def validated(self) -> ConvertOptions:
        """Raise OptionError naming the option, its value and the allowed range."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise OptionError(message)

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        need(self.metric is None or self.metric in user_metrics(), f"--metric {self.metric!r} is not one of {', '.join(user_metrics())}")
        need(isinstance(self.max_drop, (int, float)) and math.isfinite(self.max_drop) and 0 <= self.max_drop,
             f"--max-drop {self.max_drop!r} must be a number in [0, {MAX_SENSIBLE_DROP}]")
        need(self.max_drop <= MAX_SENSIBLE_DROP,
             f"--max-drop {self.max_drop:g} allows losing {100 * min(self.max_drop, 1):g}% of the quality; it is a fraction "
             f"(0.01 = one point): did you mean {self.max_drop / 100:g}? (at most {MAX_SENSIBLE_DROP})")
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
        need(self.target_bytes is None or (is_int(self.target_bytes) and self.target_bytes >= 1),
             f"--target-bytes {self.target_bytes!r} must be a whole number of bytes, at least 1")
        need(self.target_ratio is None or (isinstance(self.target_ratio, (int, float)) and math.isfinite(self.target_ratio)
                                           and self.target_ratio > 1), f"--target-ratio {self.target_ratio!r} must be above 1")
        need(self.target_bytes is None or self.target_ratio is None, "give --target-bytes or --target-ratio, not both")
        need(self.bins is None or (self.target_bytes is None and self.target_ratio is None),
             "--bins K writes one file without a search: a size target needs a search")
        need(self.ram in RAM_LEVEL_LIMITS, f"--ram {self.ram!r} is not one of {', '.join(RAM_LEVEL_LIMITS)}")
        need(self.representative in REPRESENTATIVES, f"representative {self.representative!r} is not one of {', '.join(REPRESENTATIVES)}")
        need(self.strategy in STRATEGIES, f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        need(isinstance(self.outputs, tuple) and all(isinstance(n, str) for n in self.outputs),
             f"outputs {self.outputs!r} must be a tuple of output names")
        need(isinstance(self.monotone, bool), f"monotone {self.monotone!r} must be True or False")
        need(isinstance(self.bias_correction, bool), f"bias_correction {self.bias_correction!r} must be True or False")
        need(isinstance(self.layer_shares, bool), f"layer_shares {self.layer_shares!r} must be True or False")
        need(isinstance(self.error_feedback, bool), f"error_feedback {self.error_feedback!r} must be True or False")
        need(is_int(self.wave) and 1 <= self.wave <= 1000, f"wave {self.wave!r} must be in [1, 1000]")
        need(self.abort_drop is None or (isinstance(self.abort_drop, (int, float)) and self.abort_drop >= self.max_drop),
             f"abort_drop {self.abort_drop!r} must be at least --max-drop {self.max_drop}")
        return self

    def target(self, original_bytes: int) -> int | None:
        """The file size asked for (``target_bytes``, or the model's size over ``target_ratio``), None if none."""
        if self.target_ratio is not None:
            return int(original_bytes // self.target_ratio)
        return self.target_bytes

    def guarded_max_drop(self) -> float | None:
        """The tolerance the choice is guarded against (``guards.py``): the adaptive mode's; the paper
        mode reproduces the paper's rule, so None."""
        return self.max_drop if self.mode == "adaptive" else None

    def effective_abort_drop(self) -> float:
        return self.abort_drop if self.abort_drop is not None else max(ABORT_FACTOR * self.max_drop, ABORT_MIN)

    def settings(self) -> dict:
        """What determines the result (provenance): every option but those that give the same file
        whatever their value, and those the mode does not read (a paper-mode file names only
        what the paper's method uses)."""
        out = asdict(self)
        for f in fields(self):
            modes = f.metadata["modes"]
            unset = f.metadata["provenance"] == "if-set" and getattr(self, f.name) == f.default
            if not f.metadata["provenance"] or unset or (modes is not None and self.mode not in modes):
                out.pop(f.name)
            elif isinstance(out[f.name], tuple):
                out[f.name] = list(out[f.name])
        return out


def _help(f: Field) -> str | None:
    text = f.metadata["help"]
    if text is None:
        return None
    return text.format(default=f.default, **(f.metadata["per_mode"] or {}))


class _Repeated(argparse.Action):
    """A flag given once per value, collected into a tuple (the option's type)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, (*getattr(namespace, self.dest), values))


def add_arguments(parser: argparse.ArgumentParser, names: Sequence[str] | None = None,
                  choices: Mapping[str, Sequence[str]] | None = None) -> None:
    """Add the CLI flags of the options (all with a flag, or those ``names``), in declaration order.

    ``choices``: the allowed values of options that come from a registry (``--mode``: the modes)."""
    for f in fields(ConvertOptions):
        meta = f.metadata
        if meta["flag"] is None or (names is not None and f.name not in names):
            continue
        if meta["negated"]:
            parser.add_argument(meta["flag"], dest=f.name, action="store_false", help=_help(f))
            continue
        allowed = (choices or {}).get(f.name, meta["choices"])
        if isinstance(f.default, tuple):  # a repeatable flag
            parser.add_argument(meta["flag"], dest=f.name, type=meta["type"], action=_Repeated, default=f.default,
                                choices=allowed, help=_help(f))
            continue
        parser.add_argument(meta["flag"], dest=f.name, type=meta["type"], default=f.default, choices=allowed, help=_help(f))


def from_arguments(args: argparse.Namespace) -> dict[str, object]:
    """The option keywords of a namespace parsed with :func:`add_arguments`."""
    return {f.name: getattr(args, f.name) for f in fields(ConvertOptions) if hasattr(args, f.name)}


def default(name: str) -> object:
    """The declared default of option ``name``."""
    return ConvertOptions.__dataclass_fields__[name].default


def determines_file(name: str) -> bool:
    """Whether option ``name`` can change the written file (its provenance)."""
    return bool(ConvertOptions.__dataclass_fields__[name].metadata["provenance"])


def flag(name: str) -> str:
    """The CLI flag of option ``name``."""
    return ConvertOptions.__dataclass_fields__[name].metadata["flag"] or name


def keyword_parameters() -> list[inspect.Parameter]:
    """Every option as a keyword-only parameter with its default (for ``convert()``'s signature)."""
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
            for f in fields(ConvertOptions)]


def describe() -> str:
    """One line per option, for ``convert()``'s docstring."""
    lines = []
    for f in fields(ConvertOptions):
        flag = f" [{f.metadata['flag']}]" if f.metadata["flag"] else ""
        lines.append(f"    {f.name} = {f.default!r}{flag}: {_help(f) or ''}".rstrip())
    return "\n".join(lines)


__all__ = ["ConvertOptions", "DEFAULT_MODE", "add_arguments", "from_arguments", "keyword_parameters", "describe"]
