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
