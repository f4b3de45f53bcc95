"""Samples -> the two analysis frames (see docs/ARCHITECTURE.md, "Analysis frames").

Everything after this module works on pandas columns, or on the arrays and codes the
frames are made of. Its input is a run's samples as columns (``SampleColumns``): a stored
run is read that way (from its column cache or its rows), and a list of ``Sample``
objects is turned into columns first. Whatever is read from the generated positions
(tokens, logprobs, bad values, tracked-token lookups) is computed once per distinct
positions entry and spread to its samples by numpy indexing, and text columns are typed
on their few distinct values and taken by code, so the work grows with the distinct
top-k lists and texts of a run, not with its samples. The logprob of a tracked token is
the float64 parsed from ``logprob_text`` (the number as the server sent it), because
bitwise distinctness must be judged on what was received.
"""

from __future__ import annotations

import re

import itertools
import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from detaudit.gc_pause import collector_paused
from detaudit.records import Coded, Position, Sample, SampleColumns, TokenLogprob, compact_codes

SAMPLE_COLUMNS = ["index", "status", "error_kind", "output", "finish_reason",
                  "system_fingerprint", "model", "group", "attempts", "latency_s",
                  "tokens", "logprobs", "bad_logprobs"]
TRACKED_COLUMNS = ["index", "slot", "label", "token", "position", "logprob",
                   "logprob_text", "system_fingerprint", "output", "group"]


class Frames:
    """The samples frame, the tracked frame, and the tracked tokens as resolved.

    ``tracked_tokens`` has one dict per tracked slot, in report order:
    ``{"label", "token", "position"}``; ``token`` is None when it could not be
    resolved from the data (every row of that slot is then missing).

    Frames from ``build_frames`` make their tracked frame (two rows per sample of a
    coin flip: 300 MB for a million) only when it is first read: the figures read
    its columns as arrays and codes instead (``tracked_array``, ``tracked_coded``).
    """

    def __init__(self, samples: pd.DataFrame, tracked: pd.DataFrame | None = None,
                 tracked_tokens: list[dict[str, Any]] | None = None,
                 tracked_columns: "TrackedColumns | None" = None):
        if tracked is None and tracked_columns is None:
            raise TypeError("Frames needs the tracked frame or its columns")
        self.samples = samples
        self.tracked_tokens = tracked_tokens if tracked_tokens is not None else []
        self._tracked = tracked
        self._columns = tracked_columns

    @property
    def tracked(self) -> pd.DataFrame:
        if self._tracked is None:
            self._tracked = self._columns.frame()
        return self._tracked

    def tracked_rows(self) -> int:
        return len(self._columns.slot) if self._tracked is None else len(self._tracked)

    def tracked_array(self, column: str) -> np.ndarray:
        """``slot`` (int64) or ``logprob`` (float64) of the tracked frame, as an array."""
        if self._columns is not None and column in ("slot", "logprob"):
            return getattr(self._columns, column)
        return self.tracked[column].to_numpy(np.float64 if column == "logprob" else None)

    def tracked_coded(self, column: str) -> Coded:
        """The tracked frame's ``column`` (one of ``TRACKED_CODED``) as codes, null
        values as None: kept from the build, or numbered from the frame."""
        if self._columns is not None:
            return self._columns.coded[column]
        values = self.tracked[column].to_numpy(dtype=object)
        codes, uniques = pd.factorize(values, use_na_sentinel=False)
        return Coded(codes, [None if is_null(v) else v for v in uniques.tolist()])

    def __repr__(self) -> str:
        return f"Frames({len(self.samples)} samples, {self.tracked_rows()} tracked rows)"


@dataclass
class TrackedColumns:
    """What the tracked frame is made of: the arrays the figures read, and the
    frame's own making (``frame``), deferred until someone reads the frame."""

    slot: np.ndarray  # int64
    logprob: np.ndarray  # float64
    coded: dict[str, Coded]  # TRACKED_CODED
    frame: Callable[[], pd.DataFrame]


# the tracked frame's text columns that build_frames also gives as codes
TRACKED_CODED = ("logprob_text", "system_fingerprint", "group")


def is_null(value: Any) -> bool:
    """None or NaN: how a missing value reads in a frame's column (pandas makes None NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def parse_logprob_text(text: str) -> float:
    """The float64 a logprob text stands for: a JSON number, or ``float.hex`` output."""
    if "0x" in text.lower():  # fromhex alone would also read "abc" as 2748.0
        return float.fromhex(text)
    return float(text)


def build_frames(samples: list[Sample] | SampleColumns, tracked: list[dict[str, Any]],
                 all_positions: bool = False) -> Frames:
    """Build the frames for a run: its samples (any order) or its ``SampleColumns``.

    ``tracked`` is the manifest's list (``label``, ``token``, ``position``). For
    ``positions = "all"`` probes pass ``all_positions=True`` (or a tracked entry whose
    position is ``"all"``): every generated position then tracks its most common
    chosen token.
    """
    with collector_paused():
        columns = samples if isinstance(samples, SampleColumns) else \
            SampleColumns.from_samples(samples)
        return _build(in_index_order(columns), tracked, all_positions)


def _build(columns: SampleColumns, tracked: list[dict[str, Any]], all_positions: bool) -> Frames:
    run = _Distinct(columns)
    all_positions = all_positions or any(t.get("position") == "all" for t in tracked)
    if all_positions:
        slots = _most_common_chosen(run)
    else:
        slots = [_resolve(t, run) for t in tracked]
    return Frames(samples=_samples_frame(columns, run), tracked_tokens=slots,
                  tracked_columns=_tracked_columns(columns, run, slots))


class _Distinct:
    """The run's distinct positions entries, with which samples use each: ``codes``
    (every sample's entry), ``ok`` (the samples the analysis counts: status ok with a
    completion) and ``weight`` (how many of those use each entry)."""

    def __init__(self, columns: SampleColumns):
        self.entries = columns.distinct_positions
        self.codes = np.asarray(columns.positions, dtype=np.intp).reshape(-1)
        self.ok = columns.status.equals("ok") & \
            np.asarray(columns.has_completion, dtype=bool).reshape(-1)
        self.ok_rows = np.flatnonzero(self.ok)
        self.ok_codes = self.codes[self.ok_rows]
        self.weight = np.bincount(self.ok_codes, minlength=len(self.entries))
        self.used = np.flatnonzero(self.weight)  # entries of successful samples

    def weighted(self) -> Iterable[tuple[list[Position], int]]:
        """(entry, samples that use it) for the entries of successful samples."""
        entries = self.entries
        return ((entries[d], w) for d, w in zip(self.used.tolist(), self.weight[self.used].tolist()))


def in_index_order(columns: SampleColumns) -> SampleColumns:
    """``columns`` sorted by sample index (stable), as the frames are; unchanged if so."""
    order = np.asarray(columns.index, dtype=np.int64).reshape(-1)
    if len(order) < 2 or (order[1:] >= order[:-1]).all():
        return columns
    return columns.take(np.argsort(order, kind="stable"))


def column_of(coded: Coded, at: np.ndarray | None = None) -> Any:
    """The rows ``at`` (all when None) of a coded column, typed as pandas types a list
    of them: typed on the distinct values that occur there, then taken by code (no
    pass over a million Python strings). An empty column stays a list, as pandas types
    an empty list its own way."""
    codes = coded.codes if at is None else coded.codes[at]
    if not len(codes):
        return []
    used = np.flatnonzero(np.bincount(codes, minlength=len(coded.values)))
    few = pd.Series([coded.values[i] for i in used.tolist()])
    if len(used) < len(coded.values):
        renumber = np.zeros(len(coded.values), dtype=np.intp)
        renumber[used] = np.arange(len(used))
        codes = renumber[codes]
    return few.array.take(codes)


def is_bad_logprob(value: float) -> bool:
    """NaN or infinite: a value a server sent that is no logprob. Counted as bad, never
    as missing (the token was there) nor as a distinct value."""
    return not math.isfinite(value)


def _samples_frame(columns: SampleColumns, run: _Distinct) -> pd.DataFrame:
    """One row per sample. Tokens, logprobs and bad counts are made once per distinct
    positions entry (every distinct logprob text parsed once), then indexed by sample."""
    entries = run.entries
    lengths = np.fromiter(map(len, entries), dtype=np.int64, count=len(entries))
    flat = list(itertools.chain.from_iterable(entries))
    tokens, texts, floats, tops = _attributes(flat, "token", "logprob_text", "logprob", "top")
    codes = run.codes
    per_row = (lambda values: values[codes]) if len(codes) else (lambda values: [])  # noqa: E731
    return pd.DataFrame({
        "index": np.array(columns.index, dtype=np.int64),
        "status": column_of(columns.status),
        "error_kind": column_of(columns.error_kind),
        "output": column_of(columns.output),
        "finish_reason": column_of(columns.finish_reason),
        "system_fingerprint": column_of(columns.system_fingerprint),
        "model": column_of(columns.model),
        "group": column_of(columns.group),
        "attempts": _ints(columns.attempts),
        "latency_s": np.array(columns.latency_s, dtype=np.float64),
        "tokens": per_row(_tuples(tokens, lengths)),
        "logprobs": per_row(_tuples(_parsed(texts, floats, per_entry=True).tolist(), lengths)),
        "bad_logprobs": _bad_counts(floats, tops, lengths)[codes],
    }, columns=SAMPLE_COLUMNS, copy=False)


def _bad_counts(floats: list[float], tops: list[list[TokenLogprob]],
                lengths: np.ndarray) -> np.ndarray:
    """Per entry, the NaN/infinite logprobs among its chosen and top-k entries. One
    float sum over all of them shows there are none (a sum of finite values is finite,
    bar an overflow, which then takes the counting path too); only otherwise count."""
    n = len(lengths)
    entries = itertools.chain.from_iterable(tops)
    if math.isfinite(sum(floats)) and math.isfinite(sum(map(_LOGPROB, entries))):
        return np.zeros(n, dtype=np.int64)
    owner = np.repeat(np.arange(n), lengths)  # the entry of each position
    chosen = np.array(floats, dtype=np.float64)
    counts = np.bincount(owner[~np.isfinite(chosen)], minlength=n)
    top_lengths = np.fromiter(map(len, tops), dtype=np.int64, count=len(tops))
    top = np.fromiter(map(_LOGPROB, itertools.chain.from_iterable(tops)), dtype=np.float64,
                      count=int(top_lengths.sum()))
    counts += np.bincount(np.repeat(owner, top_lengths)[~np.isfinite(top)], minlength=n)
    return counts.astype(np.int64)


def _tracked_columns(columns: SampleColumns, run: _Distinct, slots: list[dict[str, Any]]
                     ) -> TrackedColumns:
    """The tracked frame: one row per (successful sample, tracked slot), sample-major;
    NaN where the token is absent. Its slots, values and ``TRACKED_CODED`` columns
    now, the frame itself when read. Each slot's token is looked up once per distinct
    positions entry."""
    rows, codes = run.ok_rows, run.ok_codes
    n, k = len(rows), len(slots)
    texts = np.full((len(run.entries), k), None, dtype=object)
    floats = np.full((len(run.entries), k), np.nan)
    used = run.used.tolist()
    at_position: dict[int, tuple[list, list]] = {}
    for j, t in enumerate(slots):
        token, position = t["token"], t["position"]
        if token is None or not n:
            continue
        if position not in at_position:
            here = [ps[position] if position < len(ps) else _NO_POSITION
                    for ps in map(run.entries.__getitem__, used)]
            at_position[position] = (here, list(map(_TOP, here)))
        here, tops = at_position[position]
        found = _first_with(token, here, tops)
        hits = [i for i, f in enumerate(found) if f is not None]
        if hits:
            entries = [used[i] for i in hits]
            texts[entries, j] = [found[i].logprob_text for i in hits]
            floats[entries, j] = [found[i].logprob for i in hits]
    values = _tracked_values(texts, floats, codes)
    occurring = texts[run.used].reshape(-1)  # the texts of the entries that occur
    text_at = compact_codes((np.searchsorted(run.used, codes)[:, None] * k
                             + np.arange(k)).reshape(-1), len(occurring))
    slot = np.tile(np.arange(k, dtype=np.int64), n)
    at = np.repeat(rows, k)
    coded = {"logprob_text": Coded(text_at, occurring.tolist()),
             "system_fingerprint": columns.system_fingerprint.take(at),
             "group": columns.group.take(at)}
    del at

    def frame() -> pd.DataFrame:
        at = np.repeat(rows, k)
        # an empty tracked frame's columns are empty object arrays, as the per-sample path made them
        per_sample = (lambda values: column_of(values, at)) if n * k else \
            (lambda values: np.empty(0, dtype=object))  # noqa: E731
        per_slot = lambda key: _spread(_object_array([t[key] for t in slots]), slot)  # noqa: E731
        return pd.DataFrame({
            "index": np.asarray(columns.index, dtype=np.int64)[at],
            "slot": slot,
            "label": per_slot("label"),
            "token": per_slot("token"),
            "position": np.tile(np.array([t["position"] for t in slots], dtype=np.int64), n),
            "logprob": values,
            "logprob_text": _spread(occurring, text_at),
            "system_fingerprint": per_sample(columns.system_fingerprint),
            "output": per_sample(columns.output),
            "group": per_sample(columns.group),
        }, columns=TRACKED_COLUMNS, copy=False)

    return TrackedColumns(slot=slot, logprob=values, coded=coded, frame=frame)


def _spread(values: np.ndarray, at: np.ndarray) -> Any:
    """``values[at]`` typed as pandas would type it, when every one of ``values`` occurs
    there: typed on the few values, then taken (no pass over millions of strings)."""
    if not len(at):
        return values[at]
    few = pd.Series(values)
    if isinstance(few.dtype, pd.StringDtype):
        return few.array.take(at)
    return values[at]


def _tracked_values(texts: np.ndarray, floats: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The float64 of every (sample, slot) text, flat and sample-major: each distinct
    text parsed once. A text that is no number takes the float the record carried with
    it where it first appears among the samples' rows."""
    present = texts != None  # noqa: E711 (elementwise)
    values = np.full(texts.shape, np.nan)
    if not present.any():
        return values[codes].reshape(-1)
    text_codes, uniques = pd.factorize(texts[present], use_na_sentinel=False)
    parsed, unparsable = _parse_each(uniques.tolist())
    values[present] = parsed[text_codes]
    values = values[codes].reshape(-1)
    if unparsable:
        by_text = np.full(texts.shape, -1, dtype=np.int64)
        by_text[present] = text_codes
        by_text = by_text[codes].reshape(-1)
        seen = np.flatnonzero(by_text >= 0)
        _, first = np.unique(by_text[seen], return_index=True)  # first row of each text
        fallback = floats[codes].reshape(-1)[seen[first]]
        rows = seen[np.isin(by_text[seen], unparsable)]
        values[rows] = fallback[by_text[rows]]
    return values


def _first_with(token: str, here: list[Position], tops: list[list[TokenLogprob]]
                ) -> list[TokenLogprob | Position | None]:
    """Per entry, ``token``'s first top-k entry, else the chosen token if it is that one.
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


_LOGPROB, _TOKEN, _TOP = map(operator.attrgetter, ("logprob", "token", "top"))
# a position past the end of a sample's positions: its token equals no token
_NO_POSITION = Position(token=object(), logprob=math.nan, logprob_text="", top=[])  # type: ignore[arg-type]


def _parse_each(texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """float64 of each text, and the places of those that are no number (NaN there)."""
    parsed = np.empty(len(texts), dtype=np.float64)
    unparsable = []
    for u, text in enumerate(texts):
        try:
            parsed[u] = parse_logprob_text(text)
        except (TypeError, ValueError):
            parsed[u] = math.nan
            unparsable.append(u)
    return parsed, unparsable


def _parsed(texts: list[str], floats: list[float], per_entry: bool) -> np.ndarray:
    """float64 of each text, each distinct text parsed once. A text that is no number
    falls back to the record's float: that entry's own (``per_entry``), or the first
    float seen with that text."""
    if not len(texts):
        return np.zeros(0, dtype=np.float64)
    codes, uniques = pd.factorize(np.asarray(texts, dtype=object), use_na_sentinel=False)
    parsed, unparsable = _parse_each(uniques.tolist())
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


def _tuples(flat: list, lengths: np.ndarray) -> np.ndarray:
    """``flat`` cut into one tuple per entry of ``lengths[i]`` items (an object array),
    built by ``zip`` over the entries of each length together."""
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
    return out


def _ints(values: Any) -> np.ndarray | list:
    """int64 when every value is a Python int (pandas would make the same column of
    them, slower); else the list, for pandas to type."""
    if isinstance(values, np.ndarray):  # read from a store: int64 (empty: a list, typed by pandas)
        return values if len(values) and values.dtype == np.int64 else values.tolist()
    if values and set(map(type, values)) <= {int}:
        try:
            return np.fromiter(values, dtype=np.int64, count=len(values))
        except OverflowError:
            pass
    return values


def _object_array(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _resolve(entry: dict[str, Any], run: _Distinct) -> dict[str, Any]:
    """Fill in a null ``token``: the most frequent top-k token at the position that is
    a non-empty prefix of the label (whitespace stripped), as the contract says."""
    label = str(entry.get("label") or entry.get("token") or "")
    position = int(entry.get("position", 0) or 0)
    token = entry.get("token")
    if token is None:
        wanted = label.strip()
        counts: Counter[str] = Counter()
        for positions, samples in run.weighted():
            if position >= len(positions):
                continue
            p = positions[position]
            for candidate in {c.token for c in p.top} | {p.token}:
                stripped = candidate.strip()
                if stripped and wanted.startswith(stripped):
                    counts[candidate] += samples
        if counts:
            # most frequent; among equals the longer (more specific) prefix, then by text
            token = max(counts, key=lambda t: (counts[t], len(t.strip()), t))
    return {"label": label, "token": token, "position": position}


def _most_common_chosen(run: _Distinct) -> list[dict[str, Any]]:
    """``positions = "all"``: one slot per position, tracking its most common chosen token."""
    per_position: list[Counter[str]] = []
    for positions, samples in run.weighted():
        for i, p in enumerate(positions):
            if i == len(per_position):
                per_position.append(Counter())
            per_position[i][p.token] += samples
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
