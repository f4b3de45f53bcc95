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
from detaudit.analysis.frame import Frames, is_bad_logprob, tracked_slots
from detaudit.analysis.logit_grid import Grid, detect_grid, log_odds, top_gap
from detaudit.analysis.stats import Spread, spread
from detaudit.records import Sample


@dataclass
class TopTable:
    """One row per (successful response, generated position): its top-k logprobs."""

    index: np.ndarray  # sample index
    position: np.ndarray
    fingerprint: np.ndarray  # object
    top: np.ndarray  # float64 [rows, k], NaN-padded; bad values (NaN, inf) as NaN too


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


def top_table(samples: list[Sample]) -> TopTable:
    """The top-k logprobs of every position of every successful response."""
    index, position, fingerprint, rows = [], [], [], []
    for s in samples:
        if s.status != "ok" or s.completion is None:
            continue
        fp = s.completion.system_fingerprint
        for i, p in enumerate(s.completion.positions):
            if not p.top:
                continue
            index.append(s.index)
            position.append(i)
            fingerprint.append(fp)
            rows.append([np.nan if is_bad_logprob(t.logprob) else t.logprob for t in p.top])
    k = max((len(r) for r in rows), default=0)
    top = np.full((len(rows), k), np.nan)
    for i, r in enumerate(rows):
        top[i, :len(r)] = r
    return TopTable(index=np.array(index, dtype=np.int64),
                    position=np.array(position, dtype=np.int64),
                    fingerprint=np.array(fingerprint, dtype=object), top=top)


def build_insight(frames: Frames, samples: list[Sample] | None = None) -> Insight:
    """Logit grid per tracked token; entropy per position when samples are given."""
    tops = top_table(samples) if samples is not None else None
    gaps: dict[int, np.ndarray] = {}
    tokens = []
    tracked = frames.tracked
    for slot, t in enumerate(tracked_slots(frames)):
        rows = tracked[(tracked["slot"] == slot) & np.isfinite(tracked["logprob"])]
        logprob = rows["logprob"].to_numpy(np.float64)
        odds = log_odds(logprob)
        grid = TokenGrid(
            label=str(t["label"]), token=t["token"], position=int(t["position"]), n=len(rows),
            distinct_log_odds=int(np.unique(odds.view(np.int64)).size), log_odds=spread(odds),
            log_odds_grid=detect_grid(odds), logprob_grid=detect_grid(logprob))
        if tops is not None and tops.top.size:
            position = grid.position
            if position not in gaps:
                at = tops.position == position
                gap = top_gap(tops.top[at])
                gaps[position] = gap[np.isfinite(gap)]
            gap = gaps[position]
            grid.distinct_gaps = int(np.unique(gap.view(np.int64)).size)
            grid.gap = spread(gap)
            grid.gap_grid = detect_grid(gap)
        tokens.append(grid)
    entropy = entropy_by_position(tops.position, tops.top) if tops is not None and tops.top.size \
        else pd.DataFrame(columns=ENTROPY_COLUMNS)
    return Insight(tokens=tokens, entropy=entropy)


