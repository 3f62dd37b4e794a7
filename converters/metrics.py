"""Each metric, declared once: how it scores, what its loss counts, how the converter judges it.

A metric turns a compressed model's outputs into a quality, higher is better and 1.0 perfect
for every metric, and a *loss*, the measure ``--max-drop`` bounds: the mean of per-unit
deficits (a unit is a sample, or a time step of sequence outputs [N, T, C], whose top-1 is
taken over the last axis). For ``agreement``, ``cosine`` and ``rel-l2`` the loss is exactly the
drop of the metric (the original scores 1 on every unit). For ``accuracy`` it is the share of
units the original gets right and the candidate wrong: units a candidate happens to fix do not
offset the ones it breaks, since on a few hundred samples such gains are mostly luck, and
counting them lets the search pick candidates that are lucky on the search data
(docs/decisions/0002). The net accuracy drop is never larger than this loss. ``f1`` (macro) has no
per-unit form: its loss is the net drop.

Because the loss is a mean of non-negative deficits, an evaluation can stop as soon as the
deficits seen so far exceed a bound (:class:`Accumulator`).

The evaluator, the report, the resolution check and the modes read what they need of a metric
from :data:`METRICS`; a new metric is one entry there and its per-unit score function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import DataError, OptionError
from .stored import StoredArray
from .uncertainty import EnergyMoments, decision_margins, expected_rate, per_sample_energy

UnitScores = Callable[[Sequence[np.ndarray], Sequence[np.ndarray], "np.ndarray | None"], np.ndarray]


def _flat_float(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Float outputs flattened per sample and concatenated across outputs (float64)."""
    got, ref = [], []
    for o, r in zip(outputs, reference):
        if r.dtype.kind != "f" or r.ndim == 0:
            continue
        n = r.shape[0]
        got.append(np.asarray(o, dtype=np.float64).reshape(n, -1))
        ref.append(np.asarray(r, dtype=np.float64).reshape(n, -1))
    return np.concatenate(got, axis=1), np.concatenate(ref, axis=1)


def _finite_rows(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidate rows with non-finite rows zeroed, reference rows, which rows were finite)."""
    got, ref = _flat_float(outputs, reference)
    finite = np.isfinite(got).all(axis=1)
    return np.where(finite[:, None], got, 0.0), ref, finite


def _accuracy_scores(outputs, reference, labels) -> np.ndarray:
    return (np.argmax(outputs[0], axis=-1) == labels).astype(np.float64).ravel()


def _agreement_scores(outputs, reference, labels) -> np.ndarray:
    return (np.argmax(outputs[0], axis=-1) == np.argmax(reference[0], axis=-1)).astype(np.float64).ravel()


def _cosine_scores(outputs, reference, labels) -> np.ndarray:
    got, ref, finite = _finite_rows(outputs, reference)
    g_norm, r_norm = np.linalg.norm(got, axis=1), np.linalg.norm(ref, axis=1)
    norms = g_norm * r_norm
    cos = np.where(norms > 0, (got * ref).sum(axis=1) / np.where(norms > 0, norms, 1.0), np.where((g_norm == 0) & (r_norm == 0), 1.0, 0.0))
    return np.where(finite, np.clip(cos, -1.0, 1.0), -1.0)


def _rel_l2_scores(outputs, reference, labels) -> np.ndarray:
    got, ref, finite = _finite_rows(outputs, reference)
    r_norm = np.linalg.norm(ref, axis=1)
    err = np.linalg.norm(got - ref, axis=1)
    rel = np.where(r_norm > 0, err / np.where(r_norm > 0, r_norm, 1.0), np.where(err > 0, 1.0, 0.0))
    return np.where(finite, 1.0 - rel, -1.0)


CHUNK_VALUES = 1 << 20  # values a whole-output sum converts to float64 at a time (8 MB)


def rows_first(array) -> np.ndarray | StoredArray:
    """``array`` as an array whose rows slice: one in a file stays there (read a chunk at a time)."""
    return array if isinstance(array, StoredArray) else np.asarray(array)


def row_chunks(*arrays: np.ndarray | StoredArray) -> Iterator[tuple[np.ndarray, ...]]:
    """Slices of the first axis of ``arrays`` (same length there) holding about CHUNK_VALUES values
    each: sums over whole outputs then take memory for a chunk, not a float64 copy of every output
    (nor the whole of an output kept in a file)."""
    first = arrays[0]
    if first.ndim == 0 or first.shape[0] == 0:
        yield tuple(np.asarray(a) for a in arrays)
        return
    per_row = max(1, first.size // first.shape[0])
    step = max(1, CHUNK_VALUES // per_row)
    for start in range(0, first.shape[0], step):
        yield tuple(a[start:start + step] for a in arrays)


def output_energy(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> tuple[float, float]:
    """(sum of squared errors, sum of squared reference values) over the float outputs, any layout;
    a non-finite candidate value counts as an error the size of the whole reference."""
    err = energy = 0.0
    for o, r in zip(outputs, reference):
        if r.dtype.kind != "f":
            continue
        ref_energy = out_err = 0.0
        finite = True
        for o_part, r_part in row_chunks(rows_first(o), rows_first(r)) if np.shape(o) == np.shape(r) else [(o, r)]:
            r64 = np.asarray(r_part, dtype=np.float64)
            o64 = np.asarray(o_part, dtype=np.float64)
            ref_energy += float(np.sum(r64 * r64))
            finite = finite and bool(np.isfinite(o64).all())
            out_err += float(np.sum((o64 - r64) ** 2)) if finite else 0.0
        energy += ref_energy
        err += out_err if finite else max(ref_energy, 1.0)
    return err, energy


def _decisions_at(threshold: float) -> UnitScores:
    """Per value of the first output: 1 where the candidate decides as the original does at
    ``threshold`` (a probability at 0.5, a logit at 0), else 0."""
    def scores(outputs, reference, labels) -> np.ndarray:
        return ((np.asarray(outputs[0]) > threshold) == (np.asarray(reference[0]) > threshold)).astype(np.float64).ravel()
    return scores


PROBABILITY_THRESHOLD = 0.5


def rarer_decisions(reference: np.ndarray, threshold: float = PROBABILITY_THRESHOLD) -> int:
    """How many values of ``reference`` take its rarer decision at ``threshold`` (at least 1):
    the values that are on in a sparse map, or off in a mostly-on one."""
    on = sum(int(np.count_nonzero(chunk > threshold)) for (chunk,) in row_chunks(rows_first(reference)))
    return max(1, min(on, int(reference.size) - on))


CHANNEL_FLOOR = 1e-6  # a channel's energy per value counts as at least this share of the loudest channel's (RMS 0.1%)


def channel_energy(outputs: np.ndarray) -> np.ndarray:
    """Sum of squares per channel (axis 1 of rows-first outputs ``[N, C, ...]``), float64."""
    x = np.asarray(outputs, dtype=np.float64)
    x = x.reshape(x.shape[0], x.shape[1], -1)
    return np.einsum("ncv,ncv->c", x, x)


def whole_channel_energy(outputs: np.ndarray | StoredArray) -> np.ndarray:
    """:func:`channel_energy` of a whole output, a few rows at a time."""
    return sum(channel_energy(chunk) for (chunk,) in row_chunks(rows_first(outputs)))


def channel_errors(outputs: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(squared error, squared reference) per channel of rows-first outputs, a few rows at a time;
    a non-finite candidate value counts as an error the size of its reference value plus one."""
    err = energy = 0.0
    for got, ref in row_chunks(rows_first(outputs), rows_first(reference)):
        got64, ref64 = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
        err = err + channel_energy(np.where(np.isfinite(got64), got64 - ref64, np.abs(ref64) + 1.0))
        energy = energy + channel_energy(ref64)
    return np.asarray(err, dtype=np.float64), np.asarray(energy, dtype=np.float64)


def channel_loss(err: np.ndarray, energy: np.ndarray) -> float:
    """The largest relative L2 error over the channels, each against its own energy, a quiet channel
    against a floor of :data:`CHANNEL_FLOOR` times the loudest one's (a dead channel decides nothing)."""
    floor = np.maximum(energy, CHANNEL_FLOOR * float(energy.max(initial=0.0)))
    ratio = np.where(floor > 0, err / np.where(floor > 0, floor, 1.0), np.where(err > 0, 1.0, 0.0))
    return float(np.sqrt(ratio.max(initial=0.0)))


def macro_f1(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> float:
    """Macro F1 over the classes that occur in the labels or the predictions."""
    pred, truth = pred.ravel().astype(np.int64), truth.ravel().astype(np.int64)
    tp = np.bincount(truth[pred == truth], minlength=n_classes).astype(np.float64)
    predicted = np.bincount(pred, minlength=n_classes).astype(np.float64)
    actual = np.bincount(truth, minlength=n_classes).astype(np.float64)
    denom = predicted + actual
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
    return float(f1[present].mean()) if present.any() else 1.0


def _broken_right_answers(outputs, reference, labels, scores) -> np.ndarray:
    """Accuracy's deficit: the original's top-1 was right and the candidate's is wrong."""
    original_right = (np.argmax(reference[0], axis=-1) == labels).ravel()
    return (original_right & (scores == 0)).astype(np.float64)


@dataclass(frozen=True)
class Metric:
    """What the converter needs to know of a metric."""

    name: str
    loss_measure: str          # how its loss reads (the report's ``loss_measure``)
    unit_scores: UnitScores | None  # per-unit scores (each at most 1) whose mean is the quality
    needs_labels: bool = False  # compares the first output's top-1 with labels
    top1: bool = False         # judged on the first output's top-1 over its last axis: one unit per row of it
    counts_units: bool = False  # the loss is a share of units lost: a count, judged as one (Jeffreys, resolution)
    counts_flips: bool = False  # the lost units are top-1 changes against the original's (expected_flip_rate)
    loss_is_drop: bool = True  # the loss equals the metric's drop (else the closing table shows both)
    confirmed_as: str | None = None  # the metric the confirm half judges it by (None: itself)
    lost_unit: str = ""        # what a lost unit did, in the closing table's check line
    unit_deficits: Callable | None = None  # per-unit loss from the scores (None: 1 - score, at least 0)
    whole_score: Callable | None = None  # no per-unit form: quality of all top-1s against the labels at once
    energy: bool = False       # the loss is the relative L2 error of all outputs together: sqrt(sum err^2 / sum ref^2)
    composite: bool = False    # each output head judged by its own metric; the largest loss decides
    elementwise: bool = False  # a unit is each value of the first output (a decision per value)
    threshold: float | None = None  # an elementwise decision's threshold (its margin is the distance to it)
    rarer_units: bool = False  # the loss counts changed decisions against the original's rarer decision, not all values
    channel_energy: bool = False  # relative L2 error per channel of axis 1, the worst channel decides

    @property
    def confirm(self) -> str:
        return self.confirmed_as or self.name

    @property
    def judges_margins(self) -> bool:
        """Judged by decisions made one per row (top-1, or one value against a threshold): what
        moves them is a margin in the logits, not the size of a probability."""
        return self.top1 or self.threshold is not None


# A label metric is confirmed by agreement with the original: a prediction that changes either
# way (a right one lost, or a wrong one "fixed") shows a decision boundary that unseen samples
# will cross (docs/decisions/0007).
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", "share of samples the original classifies right and the .moub wrong", _accuracy_scores,
           needs_labels=True, top1=True, counts_units=True, loss_is_drop=False, confirmed_as="agreement",
           lost_unit="turned wrong", unit_deficits=_broken_right_answers),
    Metric("f1", "drop of macro F1", None, needs_labels=True, top1=True, confirmed_as="agreement", whole_score=macro_f1),
    Metric("agreement", "share of samples whose top-1 differs from the original's", _agreement_scores,
           top1=True, counts_units=True, counts_flips=True, lost_unit="changed top-1"),
    Metric("cosine", "mean of 1 - cosine similarity with the original's outputs", _cosine_scores),
    Metric("rel-l2", "mean relative L2 distance to the original's outputs", _rel_l2_scores),
    Metric("l2", "relative L2 error of the outputs over all samples: ||y - y0|| / ||y0||", None, energy=True),
    Metric("decision", "share of the first output's probabilities that cross 0.5 the other way", _decisions_at(0.5),
           counts_units=True, lost_unit="crossed 0.5", elementwise=True, threshold=0.5),
    Metric("logit-decision", "share of the first output's logits that change sign", _decisions_at(0.0),
           counts_units=True, lost_unit="changed sign", elementwise=True, threshold=0.0),
    Metric("mask", "decisions at 0.5 that change, as a share of the original's rarer decision (the values "
           "that are on in a sparse map)", _decisions_at(PROBABILITY_THRESHOLD), elementwise=True, rarer_units=True),
    Metric("channels", "the largest relative L2 error over the channels of axis 1, each on its own scale (boxes in "
           "pixels beside scores in [0, 1])", None, channel_energy=True),
    Metric("heads", "the largest loss over the output heads, each judged by its own metric", None, composite=True),
)}

# (output index, metric name) of each head a composite metric judges
Heads = tuple[tuple[int, str], ...]


def confirm_heads(heads: Heads) -> Heads:
    """The metrics the confirm half judges each head by."""
    return tuple((i, METRICS[m].confirm) for i, m in heads)


def counts_units(metric: str | None) -> bool:
    """Whether ``metric``'s loss is a share of units lost (False for None: no metric)."""
    return metric is not None and METRICS[metric].counts_units


def is_classifier_shaped(output: np.ndarray) -> bool:
    """[N, C] or [N, T, C] float scores with at least two classes."""
    return output.dtype.kind == "f" and output.ndim in (2, 3) and output.shape[-1] >= 2


def default_metric(labels: np.ndarray | None, reference: Sequence[np.ndarray]) -> str:
    """accuracy with labels; else agreement for classifier-shaped outputs; else cosine."""
    if labels is not None:
        return "accuracy"
    return "agreement" if is_classifier_shaped(reference[0]) else "cosine"


def user_metrics() -> tuple[str, ...]:
    """The metrics ``--metric`` offers (a composite one is the converter's own, per output head)."""
    return tuple(name for name, m in METRICS.items() if not m.composite)


def check_metric(metric: str, labels: np.ndarray | None, reference: Sequence[np.ndarray], heads: Heads = ()) -> None:
    """Raise DataError/OptionError if ``metric`` cannot be computed for these outputs and labels."""
    if metric not in METRICS:
        raise OptionError(f"--metric {metric!r} is not one of {', '.join(user_metrics())}")
    info = METRICS[metric]
    if info.composite:
        for index, name in heads:
            check_metric(name, labels if index == 0 else None, [reference[index]])
        return
    first = reference[0]
    if info.top1 and first.dtype.kind == "f" and (first.ndim < 2 or first.shape[-1] == 1):
        raise DataError(f"--metric {metric} needs class scores, and the first output holds one value per sample: "
                        "judge a binary logit by --metric logit-decision (a probability by --metric decision), "
                        "which counts every decision that flips, right or wrong")
    if info.needs_labels:
        if labels is None:
            raise DataError(f"--metric {metric} needs labels (--labels FILE.npy or a 'labels' array in the data)")
        if first.dtype.kind != "f" or first.ndim < 2 or first.shape[:-1] != labels.shape:
            raise DataError(
                f"--metric {metric}: labels of shape {list(labels.shape)} do not match the first output's "
                f"scores {list(first.shape)} (want scores [*labels.shape, classes])"
            )
        if labels.min() < 0 or labels.max() >= first.shape[-1]:
            raise DataError(f"--metric {metric}: labels span {labels.min()}..{labels.max()}, the model has {first.shape[-1]} classes")
    elif info.top1 and (first.dtype.kind != "f" or first.ndim < 2 or first.shape[-1] < 2):
        raise DataError(f"--metric {metric} needs class scores on the first output's last axis, got shape {list(first.shape)}")
    elif info.channel_energy and (first.dtype.kind != "f" or first.ndim < 2):
        raise DataError(f"--metric {metric} needs a float first output with channels on axis 1, got shape "
                        f"{list(first.shape)}")
    elif not info.top1 and not any(o.dtype.kind == "f" and o.ndim >= 1 for o in reference):
        raise DataError(f"--metric {metric} needs at least one float output with a sample axis")


def unit_scores(metric: str, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
    """Per-unit scores (each at most 1) whose mean is the metric; not for a whole-set metric (``f1``)."""
    scores = METRICS[metric].unit_scores
    if scores is None:
        raise OptionError(f"metric {metric!r} has no per-unit scores")
    return scores(outputs, reference, labels)


def unit_deficits(metric: str, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], labels: np.ndarray | None,
                  scores: np.ndarray) -> np.ndarray:
    """Per-unit loss (>= 0) whose mean is the tolerance measure; not for a whole-set metric (``f1``)."""
    deficits = METRICS[metric].unit_deficits
    if deficits is not None:
        return deficits(outputs, reference, labels, scores)
    return np.maximum(1.0 - scores, 0.0)


class HeadsAccumulator:
    """One :class:`Accumulator` per output head; the largest loss decides, and its bound is the
    largest bound (a candidate that fails on any head fails)."""

    def __init__(self, parts: Sequence[tuple[int, Accumulator]]) -> None:
        self.parts = list(parts)
        self.units = 0

    def add(self, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], labels: np.ndarray | None) -> None:
        for index, acc in self.parts:
            acc.add([outputs[index]], [reference[index]], labels if index == 0 else None)
        self.units = max(acc.units for _, acc in self.parts)

    def loss_lower_bound(self) -> float:
        return max(acc.loss_lower_bound() for _, acc in self.parts)

    def value(self) -> float:
        return min(acc.value() for _, acc in self.parts)

    def loss(self, quality_original: float) -> float:
        return max(acc.loss(quality_original) for _, acc in self.parts)

    def point_loss(self, quality_original: float) -> float:
        return max(acc.point_loss(quality_original) for _, acc in self.parts)


class Accumulator:
    """Running metric and loss over batches, with the least loss still possible.

    ``loss_lower_bound()`` assumes every unit not yet seen has no deficit; once it
    exceeds what a candidate may lose, the rest of the data cannot save it.
    """

    def __init__(self, metric: str, total_units: int, n_classes: int = 0, total_energy: float = 0.0,
                 estimate_flips: bool = False, bound_energy: bool = False) -> None:
        """``total_energy``: for an energy metric, the sum of squares of the whole reference.
        ``estimate_flips``, ``bound_energy``: the guards of ``guards.py`` (the loss is then at least
        the rate estimated from the margins, or the upper bound of the relative error)."""
        self.estimate_flips = estimate_flips
        self.moments = EnergyMoments() if bound_energy else None
        self._margins: list[np.ndarray] = []
        self._changes: list[np.ndarray] = []
        self.metric = metric
        self.whole_score = METRICS[metric].whole_score
        self.energy = METRICS[metric].energy
        self.total_energy = total_energy
        self.err_sum = 0.0
        self.energy_sum = 0.0
        self.total_units = total_units
        self.n_classes = n_classes
        self.score_sum = 0.0
        self.deficit_sum = 0.0
        self.units = 0
        self.rarer_units = METRICS[metric].rarer_units
        self.channels = METRICS[metric].channel_energy
        if self.channels:  # ``total_energy`` is then the reference's energy per channel
            self.channel_err = np.zeros_like(np.asarray(total_energy, dtype=np.float64))
            self.channel_ref = np.zeros_like(self.channel_err)
        self._pred: list[np.ndarray] = []
        self._truth: list[np.ndarray] = []

    def add(self, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], labels: np.ndarray | None) -> None:
        if self.channels:
            err, energy = channel_errors(outputs[0], reference[0])
            self.channel_err += err
            self.channel_ref += energy
            self.units += int(reference[0].shape[0])
            return
        if self.energy:
            err, energy = output_energy(outputs, reference)
            self.err_sum += err
            self.energy_sum += energy
            self.units += max((int(r.shape[0]) for r in reference if r.ndim), default=1)
            if self.moments is not None:
                per = per_sample_energy(outputs, reference)
                self.moments.add(*(per if per is not None else (np.array([err]), np.array([energy]))))
            return
        if self.estimate_flips:
            threshold = METRICS[self.metric].threshold
            margin, change = (decision_margins(reference[0], outputs[0], threshold) if threshold is not None
                              else margins_and_changes(reference[0], outputs[0]))
            self._margins.append(margin)
            self._changes.append(np.where(np.isfinite(change), change, np.inf))
        if self.whole_score is not None:
            self._pred.append(np.argmax(outputs[0], axis=-1).ravel())
            self._truth.append(np.asarray(labels).ravel())
            self.units += self._pred[-1].size
            return
        scores = unit_scores(self.metric, outputs, reference, labels)
        self.score_sum += float(scores.sum())
        self.deficit_sum += float(unit_deficits(self.metric, outputs, reference, labels, scores).sum())
        self.units += scores.size

    def loss_lower_bound(self) -> float:
        """A whole-set metric is known only at the end: no bound before it."""
        if self.energy:
            return _relative(self.err_sum, self.total_energy)
        if self.channels:
            return channel_loss(self.channel_err, np.asarray(self.total_energy, dtype=np.float64))
        return 0.0 if self.whole_score is not None else self.deficit_sum / self.total_units

    def value(self) -> float:
        if self.channels:
            return 1.0 - channel_loss(self.channel_err, self.channel_ref)
        if self.energy:
            return 1.0 - _relative(self.err_sum, self.energy_sum)
        if self.rarer_units:  # ``total_units`` counts the rarer decisions: the changes are judged against them
            return 1.0 - self.deficit_sum / self.total_units
        if self.whole_score is not None:
            return self.whole_score(np.concatenate(self._pred), np.concatenate(self._truth), self.n_classes)
        return self.score_sum / self.units if self.units else 0.0

    def loss(self, quality_original: float) -> float:
        """The tolerance measure over everything seen (all units once complete), with its guard."""
        loss = self.point_loss(quality_original)
        if self.energy and self.moments is not None:
            upper = self.moments.upper_ratio(self.err_sum, self.energy_sum)
            return max(loss, float(np.sqrt(upper)))
        if self.estimate_flips and self._margins:
            return max(loss, expected_rate(np.concatenate(self._margins), np.concatenate(self._changes)))
        return loss

    def point_loss(self, quality_original: float) -> float:
        """The tolerance measure as measured, without a guard."""
        if self.energy:
            return _relative(self.err_sum, self.energy_sum)
        if self.channels:
            return channel_loss(self.channel_err, self.channel_ref)
        if self.whole_score is not None:
            return quality_original - self.value()
        if self.rarer_units:
            return self.deficit_sum / self.total_units
        return self.deficit_sum / self.units if self.units else 0.0


def _relative(err: float, energy: float) -> float:
    return float(np.sqrt(err / energy)) if energy > 0 else (0.0 if err == 0 else 1.0)


def quality(metric: str, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], labels: np.ndarray | None,
            heads: Heads = ()) -> float:
    """The metric over whole outputs (compressed model) against ``reference`` (original) or labels;
    for a composite metric the least quality of its ``heads``."""
    if METRICS[metric].composite:
        return min(quality(m, [outputs[i]], [reference[i]], labels if i == 0 else None) for i, m in heads)
    if METRICS[metric].energy:
        return 1.0 - _relative(*output_energy(outputs, reference))
    if METRICS[metric].channel_energy:
        return 1.0 - channel_loss(*channel_errors(outputs[0], reference[0]))
    whole_score = METRICS[metric].whole_score
    if whole_score is not None:
        top1 = np.concatenate([np.argmax(chunk, axis=-1) for (chunk,) in row_chunks(rows_first(outputs[0]))])
        return whole_score(top1, labels, outputs[0].shape[-1])
    scores = np.concatenate([unit_scores(metric, o, r, lab) for o, r, lab in _shared_row_chunks(outputs, reference, labels)])
    if METRICS[metric].rarer_units:
        return 1.0 - float(np.sum(1.0 - scores)) / rarer_decisions(reference[0])
    return float(scores.mean())


def _shared_row_chunks(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], labels: np.ndarray | None):
    """(outputs, reference, labels) a few rows at a time where all of them count their rows alike
    (the unit scores are per row, so the chunks' scores are the whole's); else all at once."""
    arrays = [rows_first(a) for a in (*outputs, *reference)]
    sliced = [a for a in arrays if a.ndim]
    n = sliced[0].shape[0] if sliced else 0
    if not sliced or any(a.shape[0] != n for a in sliced) or (labels is not None and (labels.ndim == 0 or len(labels) != n)):
        whole = [np.asarray(a) for a in arrays]
        yield whole[:len(outputs)], whole[len(outputs):], labels
        return
    per_row = max(1, sum(a.size // max(n, 1) for a in sliced))
    step = max(1, CHUNK_VALUES // per_row)
    for start in range(0, max(n, 1), step):
        part = [a[start:start + step] if a.ndim else np.asarray(a) for a in arrays]
        yield part[:len(outputs)], part[len(outputs):], None if labels is None else labels[start:start + step]


def log_scores(scores: np.ndarray, like: np.ndarray | None = None) -> np.ndarray:
    """Class scores as [units, classes] float64, probabilities as log-probabilities (decided on
    ``like``, the original model's scores, so a candidate's scores get the same transform)."""
    y = np.asarray(scores, dtype=np.float64).reshape(-1, scores.shape[-1])
    ref = y if like is None else np.asarray(like, dtype=np.float64).reshape(-1, like.shape[-1])
    if (ref >= 0).all() and np.allclose(ref.sum(axis=-1), 1.0, atol=1e-3):
        return np.log(np.maximum(y, 1e-30))
    return y


def expected_flip_rate(reference: np.ndarray, outputs: np.ndarray) -> float:
    """The share of unseen units whose top-1 the candidate would change, estimated from every
    unit rather than counted on the few that flip.

    Each unit's margin m_i (the original top-1 score minus the runner-up's) is set against the
    change d_j the candidate makes to that margin on every unit j: the estimate is the mean over
    i of the share of j with d_j >= m_i. Counting flips on a few hundred samples is unbiased but
    noisy: the count need not even fall as the step shrinks; this estimate rises steadily with
    the step. It assumes the change does not depend on the margin and the units are independent,
    which holds for one prediction per sample, not for the time steps of a sequence
    (docs/decisions/0022)."""
    margin, change = margins_and_changes(reference, outputs)
    at_least = change.size - np.searchsorted(np.sort(change), margin, side="left")
    return float(np.mean(at_least / change.size))


def margins_and_changes(reference: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: the original top-1 log-score minus the runner-up's (the margin), and how much the
    candidate closes that gap (a change at least the margin flips the unit)."""
    ref = log_scores(reference)
    got = log_scores(outputs, reference)
    rows = np.arange(ref.shape[0])
    order = np.argsort(ref, axis=-1, kind="stable")
    top, runner = order[:, -1], order[:, -2]
    margin = ref[rows, top] - ref[rows, runner]
    change = (got[rows, runner] - got[rows, top]) - (ref[rows, runner] - ref[rows, top])
    return margin, change
