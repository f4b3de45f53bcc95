"""The MMD two-sample test on token sequences of Model Equality Testing (Gao, Liang and
Guestrin, ICLR 2025): do two sets of completions come from one distribution?

Kernel (Hamming): sequences are padded to one length L with a pad token that equals
only itself, and k(x, y) = (1/L) * #{i < L : x_i == y_i}, the share of positions where
two completions agree (the paper's sum of agreements, normalised so that k(x, x) = 1).
It compares completions position by position (the token distribution at each
position): a change only in how positions go together is not what it sees.
Statistic: the unbiased estimate of MMD^2 (Gretton et al. 2012),

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (n(n-1)) + sum_{i != j} k(y_i, y_j) / (m(m-1))
              - 2 sum_{i,j} k(x_i, y_j) / (nm),

and its p-value by permutation (``two_sample.permutation_test``). The distance for a
noise floor is the plug-in MMD, the RKHS distance ||mean phi(X) - mean phi(Y)||.

Why it is fast: the kernel is a dot product of one-hot features, one per (position,
token) pair, divided by L. So each kernel sum is a sum over features of count products
(sum_{i,j} k(x_i, x_j) = sum_f c_X(f)^2 / L), and a batch of permutations needs only
per-feature counts of each X side: one ``bincount`` for the batch, no n x n matrix.
A feature that only one sample has (most late positions of sampled text) is counted
per sample instead, so the count arrays hold only the shared features.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from detaudit.analysis.two_sample import TwoSample


def encode(sequences: Sequence[Sequence[object]], length: int | None = None) -> np.ndarray:
    """Token sequences -> an integer matrix (one row per sequence, padded to ``length``,
    default: the longest). Equal tokens get equal ids; the pad id (-1) is no token."""
    length = max((len(s) for s in sequences), default=0) if length is None else length
    ids: dict[object, int] = {}
    matrix = np.full((len(sequences), length), -1, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        codes = [ids.setdefault(token, len(ids)) for token in sequence[:length]]
        matrix[row, :len(codes)] = codes
    return matrix


class HammingMMD(TwoSample):
    """MMD with the Hamming kernel over the token sequences given (one per sample)."""

    name = "token sequences"
    distance_name = "MMD, Hamming"
    test_name = "unbiased MMD^2 (Hamming kernel)"
    min_per_side = 2  # the unbiased estimate needs two samples on each side

    def __init__(self, sequences: Sequence[Sequence[object]] | np.ndarray):
        matrix = sequences if isinstance(sequences, np.ndarray) else encode(sequences)
        self.length = max(1, matrix.shape[1])
        if matrix.shape[1] == 0:  # no tokens at all: every sequence is all padding
            matrix = np.full((matrix.shape[0], 1), -1, dtype=np.int64)
        # one feature id per (position, token): equal ids <=> agreement at that position
        spread = matrix + 1 + (np.arange(matrix.shape[1]) * (int(matrix.max()) + 2))[None, :]
        _, features, counts = np.unique(spread, return_inverse=True, return_counts=True)
        features = features.reshape(matrix.shape)
        # A feature only one sample has adds 1 to that sample's side and nothing else:
        # such features share id 0, whose counts are dropped, and are added per sample.
        single = counts[features] == 1
        self.singles = single.sum(axis=1).astype(np.int64)
        kept = np.cumsum(counts > 1)  # id of each shared feature, from 1
        self.features = np.where(single, 0, kept[features]).astype(np.int64)
        self.feature_count = int(self.features.max()) + 1 if self.features.size else 1

    def cells_per_split(self, union_size: int) -> int:
        return self.feature_count + union_size * self.length

    def evaluate(self, x_rows: np.ndarray, union: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_x, n_y = x_rows.shape[1], len(union) - x_rows.shape[1]
        f = self.feature_count
        total = np.bincount(self.features[union].ravel(), minlength=f)
        rows = x_rows.shape[0]
        flat = (self.features[x_rows].reshape(rows, -1) + (np.arange(rows) * f)[:, None]).ravel()
        in_x = np.bincount(flat, minlength=rows * f).reshape(rows, f)
        in_x[:, 0] = 0
        in_y = total - in_x
        in_y[:, 0] = 0
        singles_x = self.singles[x_rows].sum(axis=1)
        singles_y = self.singles[union].sum() - singles_x
        length = float(self.length)
        # kernel sums over all pairs, i = j included
        xx = (np.einsum("ij,ij->i", in_x, in_x) + singles_x) / length
        yy = (np.einsum("ij,ij->i", in_y, in_y) + singles_y) / length
        xy = np.einsum("ij,ij->i", in_x, in_y) / length
        with np.errstate(divide="ignore", invalid="ignore"):
            unbiased = ((xx - n_x) / (n_x * (n_x - 1)) + (yy - n_y) / (n_y * (n_y - 1))
                        - 2 * xy / (n_x * n_y))  # k(x, x) = 1: the diagonal is n_x
        plug_in = np.sqrt(np.maximum(xx / n_x ** 2 + yy / n_y ** 2 - 2 * xy / (n_x * n_y), 0.0))
        return plug_in, unbiased
