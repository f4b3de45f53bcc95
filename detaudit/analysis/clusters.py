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

GAP_TOLERANCE_PCT = 1e-9


@dataclass
class DistinctValues:
    """The distinct logprob values of one tracked token, ascending by value."""

    logprob: np.ndarray  # float64, one per distinct bit pattern
    text: list[str]  # the text first seen for each value, for display
    count: np.ndarray  # int64
    inverse: np.ndarray  # for every input sample, the index of its value here


def distinct_values(logprob: np.ndarray, text: list[str] | np.ndarray) -> DistinctValues:
    """Group finite logprobs by their float64 bit pattern (NaNs must be removed first)."""
    logprob = np.ascontiguousarray(logprob, dtype=np.float64)
    bits = logprob.view(np.int64)
    unique_bits, first, inverse, count = np.unique(
        bits, return_index=True, return_inverse=True, return_counts=True)
    values = unique_bits.view(np.float64)
    order = np.argsort(values, kind="stable")  # int64 order is not float order for negatives
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    texts = [str(text[i]) for i in first[order]]
    return DistinctValues(logprob=values[order], text=texts, count=count[order],
                          inverse=rank[inverse.reshape(-1)])


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
        per_sample = pd.DataFrame({"cluster": value_cluster[distinct.inverse],
                                   "fp": pd.Series(fingerprints, dtype=object).fillna("(none)").to_numpy()})
        counts = per_sample.groupby(["cluster", "fp"], sort=True).size()
        by_cluster: dict[int, dict[str, int]] = {}
        for (cluster, fp), n in counts.items():
            by_cluster.setdefault(int(cluster), {})[str(fp)] = int(n)
        table["fingerprints"] = [dict(sorted(by_cluster.get(int(c), {}).items(),
                                             key=lambda kv: -kv[1]))
                                 for c in table["cluster"]]
    return table
