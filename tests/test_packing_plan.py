"""The pack planner's shortcuts (``moub_converters.packing``) against the plain NumPy they replace."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moub_converters.packing import _hist, _others_extreme, centre

levels = st.lists(st.integers(-3000, 3000), min_size=1, max_size=200).map(lambda v: np.array(v, dtype=np.int64))


@settings(max_examples=200, deadline=None)
@given(levels)
def test_centre_from_the_histogram_is_the_rounded_median(q):
    assert centre(_hist(q)) == int(np.round(np.median(q)))


def test_centre_of_no_levels_is_zero():
    assert centre(_hist(np.zeros(0, np.int64))) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-50, 50), min_size=2, max_size=60).map(lambda v: np.array(v, dtype=np.int64)))
def test_extremes_of_the_others_are_those_without_each_position(values):
    low, high = _others_extreme(values, smallest=True), _others_extreme(values, smallest=False)
    for j in range(values.size):
        rest = np.delete(values, j)
        assert low[j] == rest.min() and high[j] == rest.max()


def test_a_plan_holds_only_the_levels_used_however_far_apart():
    """At fine steps a tensor's levels span millions of grid values that no weight takes: the
    planner counts the levels used, so its memory follows the weights, not the span, and the
    lengths it reports over the whole grid are the ones a dense count gives."""
    import tracemalloc

    from moub_converters.packing import plan_packs

    rng = np.random.default_rng(5)
    levels = [np.rint(rng.standard_normal(20_000) * 1e6).astype(np.int32) for _ in range(8)]
    tracemalloc.start()
    plans = plan_packs(levels)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    span = sum(int(q.max()) - int(q.min()) + 1 for q in levels)
    # a dense count took 16 bytes per grid value; what is left is a few copies of one code-length table
    assert span > 8 * 4_000_000 and peak < span
    for plan in plans:
        symbols = np.concatenate([plan.symbols(levels[i], o) for i, o in zip(plan.members, plan.offsets)])
        assert plan.lengths.size == plan.count and np.array_equal(np.flatnonzero(plan.lengths), np.unique(symbols))
