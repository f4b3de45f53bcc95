"""Distinct values and clusters of near-equal probabilities, by sorting (never pairwise).

Distinct means bitwise distinct: two logprobs are the same value only when their
float64 bit patterns are equal, so "-0.1" and "-0.10" are one value and -0.1 and
its float neighbour are two.

Clusters follow the published GPT-4o study: probabilities in percent are sorted and
split wherever the gap between neighbours is greater than the threshold (in
percentage points). Values chained by small gaps stay one cluster however far apart
its ends are. A gap equal to the threshold does not split; gaps are compared with a
tolerance of ``GAP_TOLERANCE_PCT`` so that a gap that equals the threshold in decimal
(50.00 -> 50.01) is not split by binary rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from detaudit.analysis.frame import is_null
from detaudit.records import Coded

# how a sample without a system_fingerprint is counted and shown
NO_FINGERPRINT = "(none)"

GAP_TOLERANCE_PCT = 1e-9


@dataclass
class DistinctValues:
    """The distinct logprob values of one tracked token, ascending by value."""

    logprob: np.ndarray  # float64, one per distinct bit pattern
    text: list[str]  # the text first seen for each value, for display
    count: np.ndarray  # int64
    inverse: np.ndarray  # for every input sample, the index of its value here


def distinct_values(logprob: np.ndarray, text: list[str] | np.ndarray) -> DistinctValues:
    """Group finite logprobs by their float64 bit pattern (NaNs must be removed first).

    Hashing, not sorting, finds the patterns (a million samples hold a few dozen); they
    are then ordered by value, and -0.0 before 0.0 (equal values, other bits)."""
    logprob = np.ascontiguousarray(logprob, dtype=np.float64).reshape(-1)
    bits = logprob.view(np.int64)
    codes, unique_bits = pd.factorize(bits)  # in order of first appearance
    # a code's first row is where the running maximum of the codes first reaches it
    first = np.flatnonzero(np.concatenate(([True], codes[1:] > np.maximum.accumulate(codes)[:-1]))) \
        if codes.size else np.zeros(0, dtype=np.intp)
    count = np.bincount(codes, minlength=unique_bits.size).astype(np.int64)
    values = unique_bits.view(np.float64)
    order = np.lexsort((unique_bits, values))  # by value; equal values by bits, as int64
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    texts = [str(text[i]) for i in first[order]]
    return DistinctValues(logprob=values[order], text=texts, count=count[order],
                          inverse=rank[codes])


def cluster_ids(values_pct: np.ndarray, threshold_pct: float) -> np.ndarray:
    """Cluster number of each value of an ascending array: splits where the gap > threshold."""
    values_pct = np.asarray(values_pct, dtype=np.float64)
    if values_pct.size == 0:
        return np.zeros(0, dtype=np.int64)
    splits = np.diff(values_pct) - threshold_pct > GAP_TOLERANCE_PCT
    return np.concatenate(([0], np.cumsum(splits))).astype(np.int64)


def cluster_table(distinct: DistinctValues, threshold_pct: float,
                  fingerprints: np.ndarray | None = None) -> pd.DataFrame:
    """One row per cluster: centre (count-weighted mean %), min, max, width, count,
    share, distinct values and, when sample fingerprints are given, ``{fp: count}``.

    Probabilities in percent; clusters ascending by probability.
    """
    pct = np.exp(distinct.logprob) * 100.0
    order = np.argsort(pct, kind="stable")  # exp is monotonic, but keep it explicit
    pct, count = pct[order], distinct.count[order]
    ids = cluster_ids(pct, threshold_pct)
    frame = pd.DataFrame({"cluster": ids, "pct": pct, "count": count,
                          "weighted": pct * count})
    table = frame.groupby("cluster").agg(min=("pct", "min"), max=("pct", "max"),
                                         count=("count", "sum"),
                                         weighted=("weighted", "sum"),
                                         distinct_values=("pct", "size"))
    table["centre"] = table["weighted"] / table["count"]
    table["width"] = table["max"] - table["min"]
    total = table["count"].sum()
    table["share"] = table["count"] / total if total else np.nan
    table = table.reset_index()[["cluster", "centre", "min", "max", "width", "count",
                                 "share", "distinct_values"]]
    if fingerprints is not None:
        value_cluster = np.empty_like(ids)
        value_cluster[order] = ids
        codes, names = fingerprint_codes(fingerprints)
        pairs = value_cluster[distinct.inverse] * len(names) + codes
        counts = np.bincount(pairs, minlength=len(table) * len(names)).reshape(len(table), len(names))
        by_name = sorted(range(len(names)), key=names.__getitem__)
        table["fingerprints"] = [
            dict(sorted(((names[f], int(counts[c, f])) for f in by_name if counts[c, f]),
                        key=lambda kv: -kv[1]))
            for c in table["cluster"].tolist()]
    return table


def fingerprint_numbers(fingerprints: Coded) -> tuple[np.ndarray, list[str]]:
    """``fingerprint_codes`` of a coded column: the same numbers and names, from its few
    values (no hashing of a million strings)."""
    named = [NO_FINGERPRINT if is_null(v) else v for v in fingerprints.values]
    numbered = Coded(fingerprints.codes, named).normalized()
    return numbered.codes.astype(np.int64), [str(name) for name in numbered.values]


def fingerprint_codes(fingerprints: np.ndarray | pd.Categorical) -> tuple[np.ndarray, list[str]]:
    """Per sample, the number of its fingerprint (None and NaN: "(none)"), and the
    fingerprints by number. A ``pd.Categorical`` is taken as already numbered."""
    if isinstance(fingerprints, pd.Categorical):
        return fingerprints.codes.astype(np.int64), [str(c) for c in fingerprints.categories]
    filled = pd.Series(fingerprints, dtype=object).fillna(NO_FINGERPRINT)
    codes, names = pd.factorize(filled.to_numpy(dtype=object))
    return codes.astype(np.int64), [str(name) for name in names]
