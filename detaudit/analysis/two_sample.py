"""Two-sample distances that a permutation test can evaluate thousands of times at once.

A statistic holds the data of every sample of every run it may be asked about (baseline
runs and the new run share one encoding) and evaluates a batch of splits in one numpy
pass: ``evaluate(x_rows, union)`` takes C rows of sample indices (the X side of C splits)
and the union they were drawn from (Y is the rest of it), and returns, per split, the
distance (how far apart X and Y are, in the statistic's unit) and the test statistic
(what the permutation test ranks; the distance itself unless the statistic says other).

- ``OutputShares``: total variation distance between the output distributions,
  0.5 * sum |p_X(o) - p_Y(o)| (the share of probability mass that moved).
- ``ValueDistribution``: Wasserstein-1 distance between two empirical distributions of
  numbers (logprobs, in nats): integral |F_X - F_Y|; for a pure shift, the shift.
- ``detaudit.analysis.mmd.HammingMMD``: the MMD of token sequences (Model Equality Testing).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_BATCH_CELLS = 4_000_000  # elements of the largest temporary array of one batch


class TwoSample:
    """The interface: ``evaluate`` plus a name, the distance's and the test's names."""

    name = "two-sample"
    distance_name = "distance"
    test_name = "distance"
    min_per_side = 1  # fewer samples on a side: no statistic

    def evaluate(self, x_rows: np.ndarray, union: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def batch_size(self, union_size: int) -> int:
        """Splits per batch, so that one batch's temporaries stay near MAX_BATCH_CELLS."""
        return max(1, MAX_BATCH_CELLS // max(1, self.cells_per_split(union_size)))

    def cells_per_split(self, union_size: int) -> int:
        return union_size


def distance(stat: TwoSample, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(distance, test statistic) between the samples ``x`` and ``y`` (index arrays)."""
    union = np.concatenate([x, y])
    d, t = stat.evaluate(np.asarray(x)[None, :], union)
    return float(d[0]), float(t[0])


def null_distribution(stat: TwoSample, x: np.ndarray, y: np.ndarray, permutations: int,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(distances, test statistics) of ``permutations`` random splits of the samples of
    x and y, pooled, into groups of their sizes: what sampling noise alone gives
    (seeded, so it repeats)."""
    x, y = np.asarray(x), np.asarray(y)
    union = np.concatenate([x, y])
    rng = np.random.default_rng(seed)
    distances, tests = [], []
    step, done = stat.batch_size(len(union)), 0
    while done < permutations:
        count = min(step, permutations - done)
        d, t = stat.evaluate(random_splits(union, len(x), count, rng), union)
        distances.append(d)
        tests.append(t)
        done += count
    if not distances:
        return np.empty(0), np.empty(0)
    return np.concatenate(distances), np.concatenate(tests)


def p_value(null: np.ndarray, observed: float) -> float:
    """(1 + #null draws at least ``observed``) / (1 + #draws): never 0, and exact in level
    for a permutation null at any sample size."""
    tolerance = 1e-9 * abs(observed) + 1e-15  # equal splits whose sums rounded apart
    return (int((null >= observed - tolerance).sum()) + 1) / (len(null) + 1)


def permutation_test(stat: TwoSample, x: np.ndarray, y: np.ndarray, permutations: int,
                     seed: int = 0) -> tuple[float, float]:
    """(observed test statistic, permutation p-value) of "x and y come from one distribution"."""
    _, observed = distance(stat, x, y)
    _, null = null_distribution(stat, x, y, permutations, seed)
    return observed, p_value(null, observed)


def random_splits(union: np.ndarray, size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random subsets of ``union`` of ``size`` elements each (rows)."""
    shuffled = rng.permuted(np.tile(union, (count, 1)), axis=1)
    return shuffled[:, :size]


def _counts(codes: np.ndarray, categories: int) -> np.ndarray:
    """Per row of ``codes`` (C x n), how many times each category 0..categories-1 occurs."""
    rows = codes.shape[0]
    flat = (codes.reshape(rows, -1) + (np.arange(rows) * categories)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * categories).reshape(rows, categories)


class OutputShares(TwoSample):
    """Total variation distance between the distributions of outputs (any hashable labels;
    None is a category of its own)."""

    name = "outputs"
    distance_name = "total variation"
    test_name = "total variation"

    def __init__(self, outputs: Sequence[object]):
        labels = ["\0none" if o is None else o for o in outputs]
        _, self.codes = np.unique(np.array(labels, dtype=object), return_inverse=True)
        self.codes = self.codes.astype(np.int64).ravel()
        self.categories = int(self.codes.max()) + 1 if len(self.codes) else 0

    def cells_per_split(self, union_size: int) -> int:
        return union_size + self.categories

    def evaluate(self, x_rows: np.ndarray, union: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_x, n_y = x_rows.shape[1], len(union) - x_rows.shape[1]
        total = np.bincount(self.codes[union], minlength=self.categories)
        in_x = _counts(self.codes[x_rows], self.categories)
        tv = 0.5 * np.abs(in_x / n_x - (total - in_x) / n_y).sum(axis=1)
        return tv, tv


class ValueDistribution(TwoSample):
    """Wasserstein-1 (earth mover's) distance between two empirical distributions of
    finite numbers, in their unit."""

    name = "values"
    distance_name = "wasserstein-1"
    test_name = "wasserstein-1"

    def __init__(self, values: np.ndarray):
        self.values = np.asarray(values, dtype=np.float64)

    def evaluate(self, x_rows: np.ndarray, union: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_all = len(union)
        n_x = x_rows.shape[1]
        n_y = n_all - n_x
        order = np.argsort(self.values[union], kind="stable")
        gaps = np.diff(self.values[union][order])
        rank = np.empty(len(self.values), dtype=np.int64)
        rank[union[order]] = np.arange(n_all)  # place of each sample in the sorted union
        member = np.zeros((x_rows.shape[0], n_all), dtype=np.int32)
        np.put_along_axis(member, rank[x_rows], 1, axis=1)
        below_x = np.cumsum(member, axis=1)[:, :-1]  # X samples at or below each gap
        below_y = np.arange(1, n_all) - below_x
        w1 = (np.abs(below_x / n_x - below_y / n_y) * gaps).sum(axis=1)
        return w1, w1
