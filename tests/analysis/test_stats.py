"""Spread and the Wilson interval against hand-computed values."""

import math

import numpy as np
import pytest

from detaudit.analysis.stats import spread, wilson_interval


def test_wilson_interval_hand_computed():
    # 7 of 10, z = 1.959964: centre (0.7 + z^2/20) / (1 + z^2/10) = 0.644493,
    # half-width z / (1 + z^2/10) * sqrt(0.021 + z^2/400) = 0.247715,
    # so [0.3968, 0.8922]
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.644493 - 0.247715, abs=2e-6)
    assert high == pytest.approx(0.644493 + 0.247715, abs=2e-6)


def test_wilson_interval_at_the_edges_stays_in_range():
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0.0 < high < 0.2
    low, high = wilson_interval(20, 20)
    assert 0.8 < low < 1.0 and high == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_spread_hand_computed():
    s = spread(np.array([1.0, 2.0, 4.0]))
    assert (s.min, s.max, s.range) == (1.0, 4.0, 3.0)
    assert s.mean == pytest.approx(7 / 3)
    assert s.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert spread(np.array([5.0])).std == 0.0
    assert math.isnan(spread(np.array([])).mean)


def test_normal_quantile_is_scipys_at_95_and_elsewhere():
    from scipy.stats import norm

    from detaudit.analysis.stats import normal_quantile

    for q in (0.5 + 0.95 / 2, 0.995, 0.9, 0.5):  # the first is the constant, kept without scipy
        assert normal_quantile(q) == float(norm.ppf(q))
