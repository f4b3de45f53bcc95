"""Samples -> the two analysis frames (see docs/ARCHITECTURE.md, "Analysis frames").

Everything after this module works on pandas columns, so this is the only place that
walks ``Sample`` objects one by one. The logprob of a tracked token is the float64
parsed from ``logprob_text`` (the number as the server sent it), because bitwise
distinctness must be judged on what was received.
"""

from __future__ import annotations

import re

import contextlib
import gc
import itertools
import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd

from detaudit.records import Completion, Position, Sample, TokenLogprob

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
    with _collector_paused():
        return _build(list(samples), tracked, all_positions)


def _build(samples: list[Sample], tracked: list[dict[str, Any]], all_positions: bool) -> Frames:
    order = np.fromiter(map(_INDEX, samples), dtype=np.int64, count=len(samples))
    if len(order) > 1 and not (order[1:] >= order[:-1]).all():
        samples = [samples[i] for i in np.argsort(order, kind="stable").tolist()]
    all_positions = all_positions or any(t.get("position") == "all" for t in tracked)
    if all_positions:
        slots = _most_common_chosen(samples)
    else:
        slots = [_resolve(t, samples) for t in tracked]
    columns = _read(samples)
    return Frames(samples=_samples_frame(columns), tracked=_tracked_frame(columns, slots),
                  tracked_tokens=slots)


@contextlib.contextmanager
def _collector_paused():
    """The cyclic garbage collector off while frames are built: they make millions of
    tuples and lists but no cycle, and each collection would walk every object of the
    samples (seconds for a run of a million)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def is_bad_logprob(value: float) -> bool:
    """NaN or infinite: a value a server sent that is no logprob. Counted as bad, never
    as missing (the token was there) nor as a distinct value."""
    return not math.isfinite(value)


def _read(samples: list[Sample]) -> dict[str, list]:
    """Every field the frames need, one list per field, each read by one C-level pass."""
    columns = dict(zip(_SAMPLE_FIELDS, _attributes(samples, *_SAMPLE_FIELDS)))
    completions = [c if c is not None else _NO_COMPLETION for c in columns.pop("completion")]
    columns.update(zip(_COMPLETION_FIELDS, _attributes(completions, *_COMPLETION_FIELDS)))
    columns["ok"] = [s == "ok" and c is not _NO_COMPLETION
                     for s, c in zip(columns["status"], completions)]
    return columns


def _samples_frame(columns: dict[str, list]) -> pd.DataFrame:
    """One row per sample. Every distinct logprob text is parsed once, and the
    per-sample tuples are cut by ``zip`` over the samples of one length at a time."""
    positions = columns["positions"]
    n = len(positions)
    lengths = np.fromiter(map(len, positions), dtype=np.int64, count=n)
    flat = list(itertools.chain.from_iterable(positions))
    tokens, texts, floats, tops = _attributes(flat, "token", "logprob_text", "logprob", "top")
    return pd.DataFrame({
        "index": np.array(columns["index"], dtype=np.int64),
        "status": columns["status"],
        "error_kind": columns["error_kind"],
        "output": columns["text"],
        "finish_reason": columns["finish_reason"],
        "system_fingerprint": columns["system_fingerprint"],
        "model": columns["model"],
        "group": columns["group"],
        "attempts": columns["attempts"],
        "latency_s": np.array(columns["latency_s"], dtype=np.float64),
        "tokens": _tuples(tokens, lengths),
        "logprobs": _tuples(_parsed(texts, floats, per_entry=True).tolist(), lengths),
        "bad_logprobs": _bad_counts(floats, tops, lengths),
    }, columns=SAMPLE_COLUMNS)


def _bad_counts(floats: list[float], tops: list[list[TokenLogprob]],
                lengths: np.ndarray) -> np.ndarray:
    """Per sample, the NaN/infinite logprobs among its chosen and top-k entries. One
    float sum over all of them shows there are none (a sum of finite values is finite,
    bar an overflow, which then takes the counting path too); only otherwise count."""
    n = len(lengths)
    entries = itertools.chain.from_iterable(tops)
    if math.isfinite(sum(floats)) and math.isfinite(sum(map(_LOGPROB, entries))):
        return np.zeros(n, dtype=np.int64)
    owner = np.repeat(np.arange(n), lengths)  # the sample of each position
    chosen = np.array(floats, dtype=np.float64)
    counts = np.bincount(owner[~np.isfinite(chosen)], minlength=n)
    top_lengths = np.fromiter(map(len, tops), dtype=np.int64, count=len(tops))
    top = np.fromiter(map(_LOGPROB, itertools.chain.from_iterable(tops)), dtype=np.float64,
                      count=int(top_lengths.sum()))
    counts += np.bincount(np.repeat(owner, top_lengths)[~np.isfinite(top)], minlength=n)
    return counts.astype(np.int64)


def _tracked_frame(columns: dict[str, list], slots: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (successful sample, tracked slot), sample-major; NaN where the token
    is absent. Values come from each distinct text parsed once."""
    ok = columns["ok"]
    if all(ok):
        index, group, output, fingerprint, positions = (
            columns[key] for key in ("index", "group", "text", "system_fingerprint", "positions"))
    else:
        keep = list(itertools.compress(range(len(ok)), ok))
        index, group, output, fingerprint, positions = (
            [columns[key][i] for i in keep]
            for key in ("index", "group", "text", "system_fingerprint", "positions"))
    n, k = len(positions), len(slots)
    texts = np.full((n, k), None, dtype=object)
    floats = np.full((n, k), np.nan)
    at_position: dict[int, tuple[list, list]] = {}
    for j, t in enumerate(slots):
        token, position = t["token"], t["position"]
        if token is None or not n:
            continue
        if position not in at_position:
            here = [ps[position] if position < len(ps) else _NO_POSITION for ps in positions]
            at_position[position] = (here, list(map(_TOP, here)))
        here, tops = at_position[position]
        found = _first_with(token, here, tops)
        rows = [i for i, f in enumerate(found) if f is not None]
        if rows:
            hit = [found[i] for i in rows]
            texts[rows, j] = [f.logprob_text for f in hit]
            floats[rows, j] = [f.logprob for f in hit]
    flat_texts = texts.reshape(-1)
    present = np.flatnonzero(flat_texts != None)  # noqa: E711 (elementwise)
    values = np.full(n * k, np.nan)
    values[present] = _parsed(flat_texts[present].tolist(), floats.reshape(-1)[present].tolist(),
                              per_entry=False)
    per_sample = lambda values: np.repeat(_object_array(values), k)  # noqa: E731
    per_slot = lambda key: np.tile(_object_array([t[key] for t in slots]), n)  # noqa: E731
    return pd.DataFrame({
        "index": np.repeat(np.array(index, dtype=np.int64), k),
        "slot": np.tile(np.arange(k, dtype=np.int64), n),
        "label": per_slot("label"),
        "token": per_slot("token"),
        "position": np.tile(np.array([t["position"] for t in slots], dtype=np.int64), n),
        "logprob": values,
        "logprob_text": flat_texts,
        "system_fingerprint": per_sample(fingerprint),
        "output": per_sample(output),
        "group": per_sample(group),
    }, columns=TRACKED_COLUMNS)


_SAMPLE_FIELDS = ("index", "status", "error_kind", "group", "attempts", "latency_s", "completion")
_COMPLETION_FIELDS = ("text", "finish_reason", "system_fingerprint", "model", "positions")


def _first_with(token: str, here: list[Position], tops: list[list[TokenLogprob]]
                ) -> list[TokenLogprob | Position | None]:
    """Per sample, ``token``'s first top-k entry, else the chosen token if it is that one.
    A plain loop that stops at the match: tracked tokens sit near the top of the top-k,
    so this touches a few entries per sample where a vector op would touch all."""
    found: list[TokenLogprob | Position | None] = []
    append = found.append
    for p, top in zip(here, tops):
        for candidate in top:
            if candidate.token == token:
                append(candidate)
                break
        else:
            append(p if p.token == token else None)
    return found


def _attributes(objects: list, *names: str) -> list[list]:
    """One list per attribute, each read by one C-level ``map`` (no tuple per object)."""
    return [list(map(operator.attrgetter(name), objects)) for name in names]


_INDEX, _LOGPROB, _TOKEN, _TOP = map(operator.attrgetter, ("index", "logprob", "token", "top"))
_NO_COMPLETION = Completion(text=None, positions=[])  # type: ignore[arg-type]  # an error row
# a position past the end of a sample's positions: its token equals no token
_NO_POSITION = Position(token=object(), logprob=math.nan, logprob_text="", top=[])  # type: ignore[arg-type]


def _parsed(texts: list[str], floats: list[float], per_entry: bool) -> np.ndarray:
    """float64 of each text, each distinct text parsed once. A text that is no number
    falls back to the record's float: that entry's own (``per_entry``), or the first
    float seen with that text."""
    if not len(texts):
        return np.zeros(0, dtype=np.float64)
    codes, uniques = pd.factorize(np.asarray(texts, dtype=object), use_na_sentinel=False)
    parsed = np.empty(len(uniques), dtype=np.float64)
    unparsable = []
    for u, text in enumerate(uniques.tolist()):
        try:
            parsed[u] = parse_logprob_text(text)
        except (TypeError, ValueError):
            parsed[u] = math.nan
            unparsable.append(u)
    values = parsed[codes]
    if unparsable:
        rows = np.flatnonzero(np.isin(codes, unparsable))
        fallback = np.asarray(floats, dtype=np.float64)
        if per_entry:
            values[rows] = fallback[rows]
        else:
            _, first = np.unique(codes, return_index=True)
            values[rows] = fallback[first][codes[rows]]
    return values


def _starts(lengths: np.ndarray) -> np.ndarray:
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _tuples(flat: list, lengths: np.ndarray) -> list[tuple]:
    """``flat`` cut into one tuple per sample of ``lengths[i]`` items, built by ``zip``
    over the samples of each length together."""
    n = len(lengths)
    items = np.empty(len(flat), dtype=object)
    items[:] = flat
    starts = _starts(lengths)
    out = np.empty(n, dtype=object)
    for length in np.unique(lengths).tolist():
        rows = np.flatnonzero(lengths == length)
        first = starts[rows]
        columns = [items[first + j].tolist() for j in range(length)]
        built = list(zip(*columns)) if length else [()] * len(rows)
        out[rows] = _object_array(built)
    return out.tolist()


def _object_array(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


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
