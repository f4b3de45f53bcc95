"""The crosscheck statistics (detaudit.analysis.crosscheck) against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from detaudit.analysis.crosscheck import TOKEN_COLUMNS, compare, same_float32


def frame(server: list[float], reference: list[float], positions: list[int] | None = None,
          texts: list[str] | None = None) -> pd.DataFrame:
    n = len(server)
    positions = positions if positions is not None else list(range(n))
    return pd.DataFrame({"index": np.arange(n) // 3, "position": positions,
                         "token": [f"t{i}" for i in range(n)], "server_logprob": server,
                         "server_logprob_text": texts or [repr(v) for v in server],
                         "reference_logprob": reference})


def random_tokens(seed: int, n: int = 200) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """float32 reference logprobs; the server equal on some tokens, a few ulps or more off on others."""
    rng = np.random.default_rng(seed)
    reference = -rng.exponential(1.5, n).astype(np.float32)
    noise = rng.normal(0, 1e-4, n) * (rng.random(n) < 0.6)
    server = (reference.astype(np.float64) + noise).astype(np.float32).astype(np.float64)
    positions = rng.integers(0, 7, n)
    f = frame(server.tolist(), reference.astype(np.float64).tolist(), positions.tolist())
    return f, server, reference.astype(np.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overall_figures_equal_direct_computations(seed):
    f, server, reference = random_tokens(seed)
    result = compare(f)
    equal = [np.float32(s) == np.float32(r) for s, r in zip(server, reference)]
    diffs = [abs(s - r) for s, r in zip(server, reference)]
    k3 = [math.exp(r) / math.exp(s) - 1 - math.log(math.exp(r) / math.exp(s))
          for s, r in zip(server, reference)]
    assert result.tokens == len(f)
    assert 0 < result.bitwise_equal_tokens < len(f)
    assert result.bitwise_equal_tokens == sum(equal)
    assert result.bitwise_equal == sum(equal) / len(f)
    assert result.max_abs_diff == max(diffs)
    assert result.mean_abs_diff == pytest.approx(sum(diffs) / len(diffs), rel=1e-12)
    assert result.k3_kl == pytest.approx(sum(k3) / len(k3), rel=1e-6)
    assert result.k3_kl >= 0
    expected_r = scipy_stats.pearsonr(np.exp(server), np.exp(reference)).statistic
    assert result.pearson == pytest.approx(expected_r, rel=1e-12)


def test_per_position_rows_equal_direct_computations():
    f, server, reference = random_tokens(3)
    result = compare(f)
    positions = f["position"].to_numpy()
    assert [p.position for p in result.by_position] == sorted(set(positions.tolist()))
    for row in result.by_position:
        at = positions == row.position
        s, r = server[at], reference[at]
        assert row.tokens == at.sum()
        assert row.bitwise_equal == pytest.approx(np.mean(s.astype(np.float32) == r.astype(np.float32)))
        assert row.max_abs_diff == np.max(np.abs(s - r))
        assert row.mean_abs_diff == pytest.approx(np.mean(np.abs(s - r)), rel=1e-12)
        ratio = np.exp(r) / np.exp(s)
        assert row.k3_kl == pytest.approx(np.mean(ratio - 1 - np.log(ratio)), rel=1e-6, abs=1e-18)
    assert sum(p.tokens for p in result.by_position) == result.tokens


def test_worst_tokens_are_the_largest_differences_in_order():
    f, server, reference = random_tokens(4)
    result = compare(f, worst=5)
    diffs = np.abs(server - reference)
    assert [w.abs_diff for w in result.worst] == sorted(diffs, reverse=True)[:5]
    for w in result.worst:
        row = f[(f["index"] == w.index) & (f["position"] == w.position) & (f["token"] == w.token)].iloc[0]
        assert w.server_logprob == row["server_logprob"] and w.reference_logprob == row["reference_logprob"]
        assert w.server_logprob_text == row["server_logprob_text"]
    assert compare(f, worst=0).worst == []


def test_identical_logprobs_give_zero_gap_and_no_worst_token():
    values = [-0.25, -1.5, -3.0, -0.0078125]
    result = compare(frame(values, values))
    assert (result.bitwise_equal, result.max_abs_diff, result.mean_abs_diff, result.k3_kl) == (1.0, 0.0, 0.0, 0.0)
    assert result.pearson == pytest.approx(1.0)
    assert result.worst == []


def test_a_float32_written_as_its_shortest_decimal_is_bitwise_equal():
    """Servers that print float32's shortest decimal designate the same float32."""
    ref = np.float32(-0.3120210170745849609375)
    shortest = str(ref)  # '-0.31202102': not the float32's float64 value
    assert float(shortest) != float(ref)
    assert same_float32(np.array([float(shortest)]), np.array([float(ref)]))[0]
    next_up = np.nextafter(ref, np.float32(0))
    assert not same_float32(np.array([float(next_up)]), np.array([float(ref)]))[0]
    result = compare(frame([float(shortest)], [float(ref)], texts=[shortest]))
    assert result.bitwise_equal == 1.0 and 0 < result.max_abs_diff < 1e-8


def test_non_finite_values_and_the_sentinel_are_counted_and_left_out():
    result = compare(frame([-0.5, float("nan"), -1.0, float("-inf"), -9999.0],
                           [-0.5, -0.7, -1.25, -2.0, -30.0]))
    assert result.non_finite == 3 and result.tokens == 2
    assert result.max_abs_diff == 0.25


def test_an_overflowing_figure_is_null_in_json():
    result = compare(frame([-800.0, -1.0], [-0.125, -1.0]))  # r = e^799.875: inf in float64
    assert result.k3_kl == float("inf")
    data = result.to_dict()
    assert data["k3_kl"] is None and data["by_position"][0]["k3_kl"] is None
    assert data["max_abs_diff"] == 799.875


def test_pearson_is_none_when_undefined():
    assert compare(frame([-0.5], [-0.5])).pearson is None  # one token
    assert compare(frame([-0.5, -0.5, -0.5], [-0.4, -0.6, -0.5])).pearson is None  # a constant side


def test_empty_and_malformed_frames():
    empty = compare(pd.DataFrame({c: [] for c in TOKEN_COLUMNS}))
    assert empty.tokens == 0 and empty.bitwise_equal is None and empty.max_abs_diff is None
    with pytest.raises(ValueError, match="reference_logprob"):
        compare(pd.DataFrame({"index": [0], "position": [0]}))
