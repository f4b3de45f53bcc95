"""Insight figures beside the core analysis: the logit grid and the top-k entropy.

Both need each response's whole top-k list, which the analysis frames do not keep,
so ``top_table`` reads it from the samples once; a file from ``detaudit analyze``
has no top-k lists and gets only the log-odds figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from detaudit.analysis.entropy import ENTROPY_COLUMNS, entropy_by_position
from detaudit.analysis.frame import Frames, tracked_slots
from detaudit.analysis.logit_grid import Grid, detect_grid, log_odds, top_gap
from detaudit.analysis.stats import Spread, spread
from detaudit.records import Sample, SampleColumns


@dataclass
class TopTable:
    """One row per (successful response, generated position): its top-k logprobs.

    Responses that share a top-k list share a row of ``top``: the list of response r
    is ``top[row[r]]`` (``expanded()`` gives one row each). Row-wise figures (entropy,
    top-1/top-2 gap) are computed once per distinct list."""

    index: np.ndarray  # sample index
    position: np.ndarray
    fingerprint: np.ndarray  # object
    top: np.ndarray  # float64 [lists, k], NaN-padded; bad values (NaN, inf) as NaN too
    row: np.ndarray  # per response, its row of ``top``

    def expanded(self) -> np.ndarray:
        """The top-k logprobs of every response, one row each."""
        return self.top[self.row]


@dataclass
class TokenGrid:
    """Logit-grid figures of one tracked token."""

    label: str
    token: str | None
    position: int
    n: int  # responses where the token was in the top-k
    distinct_log_odds: int
    log_odds: Spread
    log_odds_grid: Grid | None
    logprob_grid: Grid | None
    distinct_gaps: int | None = None  # None: no top-k lists (data from a file)
    gap: Spread | None = None
    gap_grid: Grid | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "token": self.token, "position": self.position, "n": self.n,
            "log_odds": {"distinct": self.distinct_log_odds, **self.log_odds.to_dict(),
                         "grid": _grid(self.log_odds_grid)},
            "logprob_grid": _grid(self.logprob_grid),
            "top1_top2_gap": None if self.distinct_gaps is None else {
                "distinct": self.distinct_gaps, **self.gap.to_dict(), "grid": _grid(self.gap_grid)},
        }


@dataclass
class Insight:
    tokens: list[TokenGrid]
    entropy: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ENTROPY_COLUMNS))

    def to_dict(self) -> dict[str, Any]:
        return {"logit_grid": [t.to_dict() for t in self.tokens],
                "entropy": self.entropy.to_dict(orient="records")}


def _grid(grid: Grid | None) -> dict[str, Any] | None:
    return grid.to_dict() if grid is not None else None


def top_table(samples: list[Sample] | SampleColumns) -> TopTable:
    """The top-k logprobs of every position of every successful response, in index
    order. Each distinct positions entry is read once; its rows are repeated for the
    samples that share it."""
    columns = samples if isinstance(samples, SampleColumns) else SampleColumns.from_samples(samples)
    ok = np.flatnonzero(columns.status.equals("ok")
                        & np.asarray(columns.has_completion, dtype=bool).reshape(-1))
    codes = np.asarray(columns.positions, dtype=np.intp)[ok]
    entries = columns.distinct_positions
    rows_of = np.zeros(len(entries), dtype=np.int64)  # per entry: positions with a top-k
    position: list[int] = []
    values: list[list[float]] = []
    for d in np.unique(codes).tolist():
        before = len(position)
        for i, p in enumerate(entries[d]):
            if p.top:
                position.append(i)
                values.append([t.logprob for t in p.top])
        rows_of[d] = len(position) - before
    k = max(map(len, values), default=0)
    top = np.full((len(values), k), np.nan)
    for i, r in enumerate(values):
        top[i, :len(r)] = r
    top[~np.isfinite(top)] = np.nan  # bad values (NaN, inf) as NaN, as missing ones
    # sample s's rows are its entry's rows: row[r] = first row of the entry + r's place
    per_sample = rows_of[codes]
    first = np.zeros(len(entries), dtype=np.int64)
    np.cumsum(rows_of[:-1], out=first[1:])
    starts = np.zeros(len(per_sample), dtype=np.int64)
    np.cumsum(per_sample[:-1], out=starts[1:])
    row = np.repeat(first[codes] - starts, per_sample) + np.arange(int(per_sample.sum()))
    fingerprint = columns.system_fingerprint.array()[columns.system_fingerprint.codes[ok]]
    return TopTable(index=np.repeat(np.asarray(columns.index, dtype=np.int64)[ok], per_sample),
                    position=np.asarray(position, dtype=np.int64)[row],
                    fingerprint=np.repeat(fingerprint, per_sample), top=top, row=row)


def build_insight(frames: Frames, samples: list[Sample] | SampleColumns | None = None) -> Insight:
    """Logit grid per tracked token; entropy per position when samples are given."""
    tops = top_table(samples) if samples is not None else None
    gaps: dict[int, np.ndarray] = {}
    row_gaps = None
    tokens = []
    slot_of = frames.tracked_array("slot")
    values = frames.tracked_array("logprob")
    finite = np.isfinite(values)
    for slot, t in enumerate(tracked_slots(frames)):
        logprob = values[(slot_of == slot) & finite]
        odds = log_odds(logprob)
        grid = TokenGrid(
            label=str(t["label"]), token=t["token"], position=int(t["position"]), n=len(logprob),
            distinct_log_odds=int(np.unique(odds.view(np.int64)).size), log_odds=spread(odds),
            log_odds_grid=detect_grid(odds), logprob_grid=detect_grid(logprob))
        if tops is not None and tops.top.size:
            position = grid.position
            if position not in gaps:
                if row_gaps is None:
                    row_gaps = top_gap(tops.top)  # once per distinct top-k list
                gap = row_gaps[tops.row[tops.position == position]]
                gaps[position] = gap[np.isfinite(gap)]
            gap = gaps[position]
            grid.distinct_gaps = int(np.unique(gap.view(np.int64)).size)
            grid.gap = spread(gap)
            grid.gap_grid = detect_grid(gap)
        tokens.append(grid)
    entropy = entropy_by_position(tops.position, tops.top, tops.row) \
        if tops is not None and tops.top.size \
        else pd.DataFrame(columns=ENTROPY_COLUMNS)
    return Insight(tokens=tokens, entropy=entropy)


