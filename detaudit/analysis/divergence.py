"""Multi-token completions: unique texts, distinct logprob vectors, first divergence.

The reference is the most common token sequence. A completion diverges at the first
position where its token differs from the reference's (or where the shorter of the
two ends); a completion equal to the reference does not diverge. Among completions
with the reference's tokens, the logprob divergence is the first position whose
chosen-token logprob differs bitwise from the most common logprob vector's.

A logprob vector is a completion's tokens with the float64 of each chosen token's
logprob (parsed from the text received). ``first_difference`` is the earliest
position where any vector departs from the most common one, by a token or by the
bits of a logprob: where "the same text" stops being "the same numbers".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class Divergence:
    completions: int  # successful samples considered
    unique_completions: int  # distinct output texts
    distinct_token_sequences: int
    distinct_logprob_vectors: int  # distinct (tokens, chosen-token logprobs) pairs
    reference_count: int  # samples equal to the most common token sequence
    diverged: int
    positions: dict[int, int] = field(default_factory=dict)  # first divergence -> count
    min_position: int | None = None
    median_position: float | None = None
    logprob_positions: dict[int, int] = field(default_factory=dict)
    reference_length: int = 0
    first_difference: int | None = None  # earliest departure from the most common vector

    @property
    def deterministic(self) -> bool:
        """One token sequence and one logprob vector: the same text and the same bits."""
        return self.distinct_token_sequences <= 1 and self.distinct_logprob_vectors <= 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "completions": self.completions,
            "unique_completions": self.unique_completions,
            "distinct_token_sequences": self.distinct_token_sequences,
            "distinct_logprob_vectors": self.distinct_logprob_vectors,
            "reference_length": self.reference_length,
            "reference_count": self.reference_count,
            "diverged": self.diverged,
            "first_divergence": {
                "histogram": {str(k): v for k, v in sorted(self.positions.items())},
                "min": self.min_position, "median": self.median_position,
            },
            "first_logprob_divergence": {
                "histogram": {str(k): v for k, v in sorted(self.logprob_positions.items())},
                "min": min(self.logprob_positions, default=None),
            },
            "first_difference": self.first_difference,
        }


def first_divergence(tokens: tuple, reference: tuple) -> int | None:
    """The first position where ``tokens`` departs from ``reference``; None if equal."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def _bits(logprobs: tuple) -> bytes:
    return np.asarray(logprobs, dtype=np.float64).tobytes()


def _counts(tokens: np.ndarray, logprobs: np.ndarray) -> tuple[Counter, Counter]:
    """How often each token sequence, and each (tokens, logprob bits) vector, occurs.
    Samples that share one positions entry share its tuples, so each distinct pair of
    tuple objects is counted once and read once (the bits of a million tuples would
    take seconds); equal tuples of different objects then add up in the Counters."""
    token_of, token_objects = _by_identity(tokens)
    vector_of, logprob_objects = _by_identity(logprobs)
    pair, pairs = pd.factorize(token_of * max(len(logprob_objects), 1) + vector_of)
    token_counts: Counter = Counter()
    for obj, n in zip(token_objects, np.bincount(token_of).tolist()):
        token_counts[obj] += n
    vector_counts: Counter = Counter()
    bits = [_bits(v) for v in logprob_objects]
    for key, n in zip(pairs.tolist(), np.bincount(pair).tolist()):
        t, v = divmod(key, max(len(logprob_objects), 1))
        vector_counts[(token_objects[t], bits[v])] += n
    return token_counts, vector_counts


def _by_identity(values: np.ndarray) -> tuple[np.ndarray, list]:
    """Per value, the number of its object (by ``id``), and the objects by number."""
    codes, _ = pd.factorize(np.fromiter(map(id, values), dtype=np.uint64, count=len(values)))
    if not len(codes):
        return codes.astype(np.int64), []
    first = np.flatnonzero(np.concatenate(([True], codes[1:] > np.maximum.accumulate(codes)[:-1])))
    return codes.astype(np.int64), [values[i] for i in first.tolist()]


def divergence(samples: pd.DataFrame) -> Divergence:
    """Analyse the successful rows of a samples frame."""
    ok = samples[samples["status"].to_numpy(dtype=object) == "ok"]
    token_counts, vector_counts = _counts(ok["tokens"].to_numpy(dtype=object),
                                          ok["logprobs"].to_numpy(dtype=object))
    result = Divergence(
        completions=len(ok), unique_completions=int(ok["output"].nunique(dropna=False)),
        distinct_token_sequences=len(token_counts),
        distinct_logprob_vectors=len(vector_counts), reference_count=0, diverged=0)
    if not token_counts:
        return result
    reference, result.reference_count = max(token_counts.items(),
                                            key=lambda kv: (kv[1], kv[0]))
    result.reference_length = len(reference)
    # first divergence of each distinct sequence, weighted by how often it occurs
    for tokens, n in token_counts.items():
        at = first_divergence(tokens, reference)
        if at is not None:
            result.positions[at] = result.positions.get(at, 0) + n
    result.diverged = sum(result.positions.values())
    if result.positions:
        positions = np.repeat(list(result.positions), list(result.positions.values()))
        result.min_position = int(positions.min())
        result.median_position = float(np.median(positions))
    same = {bits: n for (tokens, bits), n in vector_counts.items() if tokens == reference}
    ref_bits = max(same.items(), key=lambda kv: (kv[1], kv[0]))[0]
    ref_values = np.frombuffer(ref_bits, dtype=np.int64)
    for bits, n in same.items():
        differs = np.flatnonzero(np.frombuffer(bits, dtype=np.int64) != ref_values)
        if differs.size:
            at = int(differs[0])
            result.logprob_positions[at] = result.logprob_positions.get(at, 0) + n
    result.first_difference = min(
        (_departure(tokens, np.frombuffer(bits, dtype=np.int64), reference, ref_values)
         for tokens, bits in vector_counts if (tokens, bits) != (reference, ref_bits)),
        default=None)
    return result


def _departure(tokens: tuple, values: np.ndarray, reference: tuple,
               ref_values: np.ndarray) -> int:
    """The first position where (tokens, logprob bits) differs from the reference vector."""
    at = first_divergence(tokens, reference)
    common = len(tokens) if at is None else at  # logprobs compared before the tokens part
    differs = np.flatnonzero(values[:common] != ref_values[:common])
    if differs.size:
        return int(differs[0])
    return common if at is None else at
