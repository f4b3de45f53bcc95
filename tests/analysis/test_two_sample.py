"""The two-sample distances, the Hamming-kernel MMD and the noise-floor rule, each checked
against a direct (slow, obvious) computation, an exhaustive permutation test, or scipy;
then size and power on seeded synthetic data."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from detaudit.analysis.drift import assess
from detaudit.analysis.mmd import HammingMMD, encode
from detaudit.analysis.two_sample import (OutputShares, ValueDistribution, distance,
                                          null_distribution, permutation_test)


def _random_sequences(rng, count, vocab=4, max_len=6):
    return [tuple(f"t{v}" for v in rng.integers(0, vocab, size=rng.integers(1, max_len + 1)))
            for _ in range(count)]


def _direct_mmd(xs, ys):
    """By the definitions: pad to the longest, k = share of agreeing positions, then the
    unbiased MMD^2 (diagonals left out) and the plug-in MMD (all pairs)."""
    length = max(len(s) for s in xs + ys)
    pad = lambda s: list(s) + [None] * (length - len(s))  # noqa: E731
    k = lambda a, b: sum(u == v for u, v in zip(pad(a), pad(b))) / length  # noqa: E731
    n, m = len(xs), len(ys)
    kxx = sum(k(a, b) for i, a in enumerate(xs) for j, b in enumerate(xs) if i != j)
    kyy = sum(k(a, b) for i, a in enumerate(ys) for j, b in enumerate(ys) if i != j)
    kxy = sum(k(a, b) for a in xs for b in ys)
    unbiased = kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (n * m)
    plug_in = (kxx + n) / n ** 2 + (kyy + m) / m ** 2 - 2 * kxy / (n * m)
    return unbiased, math.sqrt(max(plug_in, 0.0))


@pytest.mark.parametrize("n, m, seed", [(2, 2, 0), (5, 9, 1), (12, 7, 2), (20, 20, 3)])
def test_hamming_mmd_matches_the_definition(n, m, seed):
    rng = np.random.default_rng(seed)
    sequences = _random_sequences(rng, n + m)
    stat = HammingMMD(sequences)
    plug_in, unbiased = distance(stat, np.arange(n), np.arange(n, n + m))
    want_unbiased, want_plug_in = _direct_mmd(sequences[:n], sequences[n:])
    assert unbiased == pytest.approx(want_unbiased, abs=1e-12)
    assert plug_in == pytest.approx(want_plug_in, abs=1e-12)
    # any subset against any other, as the leave-one-run-out floor asks
    x, y = np.arange(0, n + m, 2), np.arange(1, n + m, 2)
    if len(x) >= 2 and len(y) >= 2:
        _, unbiased = distance(stat, x, y)
        assert unbiased == pytest.approx(
            _direct_mmd([sequences[i] for i in x], [sequences[i] for i in y])[0], abs=1e-12)


def test_hamming_kernel_by_hand():
    # padded to 3: (a b c) and (a x -) agree at position 0 only: k = 1/3.
    # X = {abc, abc}, Y = {ax, ax}: kxx = 1, kyy = 1, kxy = 1/3 -> 1 + 1 - 2/3
    stat = HammingMMD([("a", "b", "c"), ("a", "b", "c"), ("a", "x"), ("a", "x")])
    plug_in, unbiased = distance(stat, np.array([0, 1]), np.array([2, 3]))
    assert unbiased == pytest.approx(4 / 3)
    assert plug_in == pytest.approx(math.sqrt(4 / 3))
    assert encode([("a", "b"), ("b",)]).tolist() == [[0, 1], [1, -1]]


def test_other_distances_match_scipy_and_the_definition():
    rng = np.random.default_rng(4)
    values = np.round(rng.normal(size=40), 1)  # ties, as logprobs have
    x, y = np.arange(15), np.arange(15, 40)
    w1, _ = distance(ValueDistribution(values), x, y)
    assert w1 == pytest.approx(stats.wasserstein_distance(values[x], values[y]), abs=1e-12)
    outputs = [str(v) for v in rng.integers(0, 4, size=40)] + [None, None]
    x, y = np.arange(20), np.arange(20, 42)
    tv, _ = distance(OutputShares(outputs), x, y)
    share = lambda rows, o: sum(outputs[i] == o for i in rows) / len(rows)  # noqa: E731
    assert tv == pytest.approx(0.5 * sum(abs(share(x, o) - share(y, o)) for o in set(outputs)))


@pytest.mark.parametrize("make", [
    lambda rng: HammingMMD(_random_sequences(rng, 30)),
    lambda rng: ValueDistribution(np.round(rng.normal(size=30), 1)),
    lambda rng: OutputShares([str(v) for v in rng.integers(0, 5, size=30)]),
])
def test_a_batch_of_splits_equals_the_splits_one_at_a_time(make):
    rng = np.random.default_rng(5)
    stat = make(rng)
    union = np.arange(3, 30)
    rows = np.array([rng.choice(union, size=8, replace=False) for _ in range(6)])
    batch_d, batch_t = stat.evaluate(rows, union)
    for row, d, t in zip(rows, batch_d, batch_t):
        one_d, one_t = distance(stat, row, np.setdiff1d(union, row))
        assert (d, t) == (pytest.approx(one_d, abs=1e-12), pytest.approx(one_t, abs=1e-12))


def test_permutation_p_value_agrees_with_the_exhaustive_test():
    sequences = [("a", "b"), ("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c"), ("c",), ("b",)]
    stat = HammingMMD(sequences)
    x, y = np.array([0, 1, 2]), np.array([3, 4, 5, 6])
    _, observed = distance(stat, x, y)
    everyone = set(range(7))
    splits = [distance(stat, np.array(c), np.array(sorted(everyone - set(c))))[1]
              for c in itertools.combinations(range(7), 3)]
    exact = np.mean(np.array(splits) >= observed - 1e-12)
    got, p = permutation_test(stat, x, y, permutations=20000, seed=7)
    assert got == observed
    assert p == pytest.approx(exact, abs=0.01)
    assert permutation_test(stat, x, y, permutations=20000, seed=7)[1] == p  # seeded


def _sampled_sequences(rng, count, probs, max_len=8):
    """Token sequences of random length, each token drawn from ``probs`` (over 4 tokens)."""
    return [tuple(f"t{v}" for v in rng.choice(4, size=rng.integers(max_len - 2, max_len + 1), p=probs))
            for _ in range(count)]


BASE = [0.5, 0.3, 0.15, 0.05]


def test_mmd_test_size_and_power_on_seeded_data():
    """Same distribution: p-values spread over (0, 1], few below 0.05; another
    distribution (token probabilities 0.5/0.3/0.15/0.05 -> 0.25 each): tiny p every time."""
    same, shifted = [], []
    for rep in range(30):
        rng = np.random.default_rng(100 + rep)
        a, b = _sampled_sequences(rng, 40, BASE), _sampled_sequences(rng, 40, BASE)
        c = _sampled_sequences(rng, 40, [0.25] * 4)
        x, y = np.arange(40), np.arange(40, 80)
        same.append(permutation_test(HammingMMD(a + b), x, y, 500, seed=rep)[1])
        if rep < 10:
            shifted.append(permutation_test(HammingMMD(a + c), x, y, 500, seed=rep)[1])
    assert sum(p < 0.05 for p in same) <= 4 and min(same) > 0.002
    assert 0.3 < float(np.median(same)) < 0.7
    assert max(shifted) < 0.01


def _runs(rng, k, n, tau, sigma, offset_new=0.0):
    """k + 1 runs of numbers: run j ~ N(u_j, sigma^2) with u_j ~ N(0, tau^2); NEW's offset
    moved by ``offset_new`` beyond its own draw."""
    offsets = rng.normal(0.0, tau, size=k + 1)
    offsets[0] += offset_new
    values = np.concatenate([rng.normal(u, sigma, size=n) for u in offsets])
    rows = [np.arange(j * n, (j + 1) * n) for j in range(k + 1)]
    return ValueDistribution(values), rows


@pytest.mark.parametrize("tau, sigma", [(1.0, 1.0), (0.0, 1.0)])
def test_noise_floor_keeps_false_alarms_near_alpha(tau, sigma):
    """One more run of the same endpoint (its own run offset, like another day's batches)
    is flagged at about alpha or less, with or without run-to-run variation; a plain
    permutation test of NEW against the pooled baseline flags most of them when runs vary."""
    alarms, naive = 0, 0
    reps = 150
    for rep in range(reps):
        rng = np.random.default_rng(1000 + rep)
        stat, rows = _runs(rng, 3, 30, tau, sigma)
        result = assess(stat, rows[0], rows[1:], alpha=0.05, permutations=200, seed=rep)
        alarms += result.p < 0.05
        naive += result.p_samples < 0.05
    assert alarms / reps <= 0.08
    if tau > 0:
        assert naive / reps > 0.5  # what `compare A B` would say of a plain other run


@pytest.mark.parametrize("tau, shift, k", [(1.0, 20.0, 3), (1.0, 8.0, 6), (0.0, 1.5, 3)])
def test_noise_floor_flags_a_shift_beyond_it(tau, shift, k):
    """A NEW run moved by many run-spreads (or, with no run variation, by a few noise
    widths of the mean) is flagged; more baseline runs need less of a shift."""
    flagged = 0
    for rep in range(20):
        rng = np.random.default_rng(2000 + rep)
        stat, rows = _runs(rng, k, 30, tau, 1.0, offset_new=shift)
        result = assess(stat, rows[0], rows[1:], alpha=0.05, permutations=200, seed=rep)
        flagged += result.p < 0.05
        assert result.new_distance > 0 and result.floor.bound > 0
    assert flagged >= 18


def test_floor_parts_by_hand():
    """Runs that agree exactly (a deterministic endpoint): floor 0, and NEW differs as soon
    as it moves beyond sampling noise."""
    values = np.array([1.0] * 30 + [1.0] * 10 + [1.0] * 10 + [1.5] * 10)
    stat = ValueDistribution(values)
    rows = [np.arange(0, 30), np.arange(30, 40), np.arange(40, 50), np.arange(50, 60)]
    same = assess(stat, rows[1], [rows[0], rows[2]], alpha=0.05, permutations=200)
    assert same.floor.distance == 0 and same.new_distance == 0 and same.p == 1.0
    moved = assess(stat, rows[3], rows[:3], alpha=0.05, permutations=200)
    assert moved.floor.leave_one_out == [0.0, 0.0, 0.0] and moved.floor.bound == 0
    assert moved.new_distance == pytest.approx(0.5) and moved.p_runs == 0.0
    assert moved.p_samples == pytest.approx(1 / 201)
    d, _ = null_distribution(stat, rows[3], np.concatenate(rows[:3]), 50, seed=1)
    assert d.shape == (50,) and d.max() <= 0.5 + 1e-12
