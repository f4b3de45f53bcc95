"""Samples -> the two analysis frames (see docs/ARCHITECTURE.md, "Analysis frames").

Everything after this module works on pandas columns, so this is the only place that
walks ``Sample`` objects one by one. The logprob of a tracked token is the float64
parsed from ``logprob_text`` (the number as the server sent it), because bitwise
distinctness must be judged on what was received.
"""

from __future__ import annotations

import re

import functools
import itertools
import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd

from detaudit.records import Position, Sample, TokenLogprob

SAMPLE_COLUMNS = ["index", "status", "error_kind", "output", "finish_reason",
                  "system_fingerprint", "model", "group", "attempts", "latency_s",
                  "tokens", "logprobs", "bad_logprobs"]
TRACKED_COLUMNS = ["index", "slot", "label", "token", "position", "logprob",
                   "logprob_text", "system_fingerprint", "output", "group"]


@dataclass
class Frames:
    """The samples frame, the tracked frame, and the tracked tokens as resolved.

    ``tracked_tokens`` has one dict per tracked slot, in report order:
    ``{"label", "token", "position"}``; ``token`` is None when it could not be
    resolved from the data (every row of that slot is then missing).
    """

    samples: pd.DataFrame
    tracked: pd.DataFrame
    tracked_tokens: list[dict[str, Any]] = field(default_factory=list)


def parse_logprob_text(text: str) -> float:
    """The float64 a logprob text stands for: a JSON number, or ``float.hex`` output."""
    if "0x" in text.lower():  # fromhex alone would also read "abc" as 2748.0
        return float.fromhex(text)
    return float(text)


def build_frames(samples: list[Sample], tracked: list[dict[str, Any]],
                 all_positions: bool = False) -> Frames:
    """Build the frames for a run.

    ``tracked`` is the manifest's list (``label``, ``token``, ``position``). For
    ``positions = "all"`` probes pass ``all_positions=True`` (or a tracked entry whose
    position is ``"all"``): every generated position then tracks its most common
    chosen token.
    """
    samples = sorted(samples, key=lambda s: s.index)
    all_positions = all_positions or any(t.get("position") == "all" for t in tracked)
    if all_positions:
        slots = _most_common_chosen(samples)
    else:
        slots = [_resolve(t, samples) for t in tracked]
    return Frames(samples=_samples_frame(samples), tracked=_tracked_frame(samples, slots),
                  tracked_tokens=slots)


def is_bad_logprob(value: float) -> bool:
    """NaN or infinite: a value a server sent that is no logprob. Counted as bad, never
    as missing (the token was there) nor as a distinct value."""
    return not math.isfinite(value)


def _samples_frame(samples: list[Sample]) -> pd.DataFrame:
    completions = [s.completion for s in samples]
    positions = [c.positions if c else () for c in completions]
    # few distinct texts, many samples: parse each once (a C-level cache, as this sees
    # every generated position of the run)
    value = functools.lru_cache(maxsize=None)(_parse_or)
    texts, top = operator.attrgetter("logprob_text", "logprob"), operator.attrgetter("top")
    logprob = operator.attrgetter("logprob")

    def bad(ps: list[Position]) -> int:
        # A sum of finite logprobs is finite: count one by one only when it is not
        # (bad values are rare, and this sees every top-k entry of the run).
        entries = list(itertools.chain(ps, itertools.chain.from_iterable(map(top, ps))))
        if math.isfinite(sum(map(logprob, entries))):
            return 0
        return sum(map(is_bad_logprob, map(logprob, entries)))

    columns = {
        "index": np.fromiter((s.index for s in samples), dtype=np.int64, count=len(samples)),
        "status": [s.status for s in samples],
        "error_kind": [s.error_kind for s in samples],
        "output": [c.text if c else None for c in completions],
        "finish_reason": [c.finish_reason if c else None for c in completions],
        "system_fingerprint": [c.system_fingerprint if c else None for c in completions],
        "model": [c.model if c else None for c in completions],
        "group": [s.group for s in samples],
        "attempts": [s.attempts for s in samples],
        "latency_s": np.array([s.latency_s for s in samples], dtype=np.float64),
        "tokens": [tuple([p.token for p in ps]) for ps in positions],
        "logprobs": [tuple(itertools.starmap(value, map(texts, ps))) for ps in positions],
        "bad_logprobs": np.fromiter((bad(ps) for ps in positions), dtype=np.int64,
                                    count=len(positions)),
    }
    return pd.DataFrame(columns, columns=SAMPLE_COLUMNS)


def _tracked_frame(samples: list[Sample], slots: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (successful sample, tracked slot), sample-major; NaN where the token
    is absent. Per-slot and per-sample columns are filled by numpy, not row by row."""
    ok = [s for s in samples if s.status == "ok" and s.completion is not None]
    texts: list[str | None] = []
    values: list[float] = []
    parsed: dict[str, float] = {}  # few distinct texts, many samples: parse each once
    for s in ok:
        positions = s.completion.positions
        for t in slots:
            found = _find(positions, t["position"], t["token"])
            if found is None:
                texts.append(None)
                values.append(math.nan)
                continue
            text = found.logprob_text
            value = parsed.get(text)
            if value is None:
                value = parsed[text] = _parse_or(text, found.logprob)
            texts.append(text)
            values.append(value)
    k = len(slots)
    per_sample = lambda values: np.repeat(np.array(values, dtype=object), k)  # noqa: E731
    per_slot = lambda key: np.tile(np.array([t[key] for t in slots], dtype=object), len(ok))  # noqa: E731
    return pd.DataFrame({
        "index": np.repeat(np.array([s.index for s in ok], dtype=np.int64), k),
        "slot": np.tile(np.arange(k, dtype=np.int64), len(ok)),
        "label": per_slot("label"),
        "token": per_slot("token"),
        "position": np.tile(np.array([t["position"] for t in slots], dtype=np.int64), len(ok)),
        "logprob": np.array(values, dtype=np.float64),
        "logprob_text": np.array(texts, dtype=object),
        "system_fingerprint": per_sample([s.completion.system_fingerprint for s in ok]),
        "output": per_sample([s.completion.text for s in ok]),
        "group": per_sample([s.group for s in ok]),
    }, columns=TRACKED_COLUMNS)


def _find(positions: list[Position], position: int,
          token: str | None) -> TokenLogprob | Position | None:
    """``token`` at ``position``: its top-k entry, else the chosen token if it is that one."""
    if token is None or position >= len(positions):
        return None
    p = positions[position]
    for candidate in p.top:
        if candidate.token == token:
            return candidate
    return p if p.token == token else None


def _parse_or(text: str, fallback: float) -> float:
    """The value of the text; the record's float if a backend stored text that is no number."""
    try:
        return parse_logprob_text(text)
    except (TypeError, ValueError):
        return float(fallback)


def _resolve(entry: dict[str, Any], samples: Iterable[Sample]) -> dict[str, Any]:
    """Fill in a null ``token``: the most frequent top-k token at the position that is
    a non-empty prefix of the label (whitespace stripped), as the contract says."""
    label = str(entry.get("label") or entry.get("token") or "")
    position = int(entry.get("position", 0) or 0)
    token = entry.get("token")
    if token is None:
        wanted = label.strip()
        counts: Counter[str] = Counter()
        for s in samples:
            if s.status != "ok" or s.completion is None or position >= len(s.completion.positions):
                continue
            p = s.completion.positions[position]
            for candidate in {c.token for c in p.top} | {p.token}:
                stripped = candidate.strip()
                if stripped and wanted.startswith(stripped):
                    counts[candidate] += 1
        if counts:
            # most frequent; among equals the longer (more specific) prefix, then by text
            token = max(counts, key=lambda t: (counts[t], len(t.strip()), t))
    return {"label": label, "token": token, "position": position}


def _most_common_chosen(samples: list[Sample]) -> list[dict[str, Any]]:
    """``positions = "all"``: one slot per position, tracking its most common chosen token."""
    per_position: list[Counter[str]] = []
    for s in samples:
        if s.status != "ok" or s.completion is None:
            continue
        for i, p in enumerate(s.completion.positions):
            if i == len(per_position):
                per_position.append(Counter())
            per_position[i][p.token] += 1
    slots = []
    for i, counts in enumerate(per_position):
        token = max(counts, key=lambda t: (counts[t], t))
        slots.append({"label": f"pos {i}", "token": token, "position": i})
    return slots


def natural_key(value: Any) -> tuple:
    """Sort key that puts group "4" before "16", "load=4" before "load=16", None last."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return (2, "", 0.0, "")
    try:
        return (0, "", float(value), str(value))
    except (TypeError, ValueError):
        text = str(value)
        match = _TRAILING_NUMBER.search(text)
        if match:
            return (1, text[:match.start()], float(match.group()), text)
        return (1, text, 0.0, text)


_TRAILING_NUMBER = re.compile(r"-?\d+(\.\d+)?$")


def tracked_slots(frames: "Frames") -> list[dict[str, Any]]:
    """The tracked entries in slot order: from the manifest when known, else from the data."""
    if frames.tracked_tokens:
        return frames.tracked_tokens
    first = frames.tracked.drop_duplicates("slot").sort_values("slot")
    return [{"label": r.label, "token": r.token, "position": int(r.position)}
            for r in first.itertuples()]
