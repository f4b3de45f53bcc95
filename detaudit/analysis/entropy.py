"""Entropy of the top-k distribution at each position, with the mass it leaves out.

An API reports only the k most likely tokens, so the full entropy is unknown. Two
figures bound what is known: ``entropy_bits``, the entropy of the top-k
probabilities renormalised to sum to one (how undecided the model is among its
candidates), and ``leftover``, ``1 - sum(top-k p)``, the probability on tokens not
shown. ``partial_bits`` is ``-sum(p log2 p)`` over the top-k as reported: a lower
bound of the full entropy. High-entropy positions are where a tiny numerical change
can flip the chosen token, so they are where completions diverge.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

ENTROPY_COLUMNS = ["position", "n", "k", "mean_bits", "min_bits", "max_bits",
                   "distinct_bits", "mean_partial_bits", "mean_leftover", "max_leftover"]


def topk_entropy(top_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row (a response at one position; columns: its top-k logprobs, NaN-padded):
    (renormalised entropy in bits, partial entropy in bits, leftover mass).

    Leftover is clipped at 0: a reported top-k may sum to a hair above one."""
    top = np.atleast_2d(np.asarray(top_logprobs, dtype=np.float64))
    p = np.exp(np.where(np.isnan(top), -np.inf, top))
    total = p.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log2(p), 0.0)
        partial = -plogp.sum(axis=1)
        q = p / total[:, None]
        qlogq = np.where(q > 0, q * np.log2(q), 0.0)
    entropy = -qlogq.sum(axis=1)
    entropy[total == 0] = np.nan
    return entropy, partial, np.clip(1.0 - total, 0.0, None)


def entropy_by_position(positions: np.ndarray, top_logprobs: np.ndarray,
                        rows: np.ndarray | None = None) -> pd.DataFrame:
    """One row per position over all responses: entropy spread, its distinct values
    (bitwise; more than one means the repeats disagree) and the leftover mass.

    ``rows``: response r's top-k list is ``top_logprobs[rows[r]]`` (responses with the
    same list share one row, whose figures are then computed once); by default each
    response has its own row."""
    positions = np.asarray(positions, dtype=np.int64)
    top = np.atleast_2d(np.asarray(top_logprobs, dtype=np.float64))
    if positions.size == 0:
        return pd.DataFrame(columns=ENTROPY_COLUMNS)
    entropy, partial, leftover = topk_entropy(top)
    k = (~np.isnan(top)).sum(axis=1)
    if rows is not None:
        entropy, partial, leftover, k = (column[rows] for column in (entropy, partial, leftover, k))
    frame = pd.DataFrame({"position": positions, "bits": entropy, "partial": partial,
                          "leftover": leftover, "k": k,
                          "bits_pattern": entropy.view(np.int64)})
    table = frame.groupby("position").agg(
        n=("bits", "size"), k=("k", "max"), mean_bits=("bits", "mean"),
        min_bits=("bits", "min"), max_bits=("bits", "max"),
        distinct_bits=("bits_pattern", "nunique"), mean_partial_bits=("partial", "mean"),
        mean_leftover=("leftover", "mean"), max_leftover=("leftover", "max"))
    return table.reset_index()[ENTROPY_COLUMNS]
