"""``detaudit analyze FILE``: logprobs recorded elsewhere (CSV or JSONL) -> Frames.

One row per sample with a ``logprob`` column (natural log) and optional ``token``,
``output``, ``system_fingerprint`` and ``group`` columns. The logprob text is kept as
written in the file, so distinctness is judged on the recorded numbers. An empty or
null logprob means the token was absent from that sample's top-k (counted as missing).

With several tokens in one file, an ``index`` column says which rows belong to one
sample; without it the k-th row of each token is sample k.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from detaudit.analysis.frame import SAMPLE_COLUMNS, TRACKED_COLUMNS, Frames, parse_logprob_text

CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
OPTIONAL_COLUMNS = ("token", "output", "system_fingerprint", "group", "index")
PROBABILITY_NAMES = ("prob", "probability", "p", "prob_pct", "percent")
MAX_LISTED_ROWS = 10


class IngestError(ValueError):
    """The file cannot be analysed; the message says what, where and how to fix it."""


def load_table(path: str | Path, token: str | None = None) -> Frames:
    path = Path(path)
    rows = _read(path)
    if not rows:
        raise IngestError(f"{path}: the file has no data rows; it needs one row per sample "
                          "with a 'logprob' column")
    columns = set().union(*(r.keys() for r in rows))
    if "logprob" not in columns:
        hint = ""
        found = [c for c in PROBABILITY_NAMES if c in columns]
        if found:
            hint = f" (found {found[0]!r}: convert probabilities to natural-log logprobs, ln(p))"
        raise IngestError(f"{path}: no 'logprob' column{hint}; columns present: "
                          f"{', '.join(sorted(columns))}. Name the column of natural-log "
                          "probabilities 'logprob'.")
    for row in rows:
        row["token"] = _text(row.get("token"))
    if token is not None:
        present = sorted({r["token"] for r in rows if r["token"] is not None})
        if "token" not in columns or token not in present:
            listed = ", ".join(repr(t) for t in present) if present else "none (no 'token' column)"
            raise IngestError(f"{path}: --token {token!r} is not in the file; tokens present: "
                              f"{listed}")
        rows = [r for r in rows if r["token"] == token]
    values = _logprobs(path, rows)
    return _frames(rows, values)


def _read(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES + JSONL_SUFFIXES:
        raise IngestError(f"{path}: unknown file type {suffix or '(no extension)'!r}; "
                          f"give a .csv or .jsonl file (one row per sample)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise IngestError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError(f"{path}: cannot read the file ({exc}); it must be UTF-8 text") from None
    if suffix in CSV_SUFFIXES:
        return _read_csv(path, text)
    return _read_jsonl(path, text)


def _read_csv(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        reader = csv.DictReader(text.splitlines())
        rows = [dict(r) for r in reader]
    except csv.Error as exc:
        raise IngestError(f"{path}: not valid CSV ({exc})") from None
    for i, row in enumerate(rows):
        if None in row:  # more cells than header names
            raise IngestError(f"{path}: row {i + 1} (line {i + 2}) has more cells than the "
                              "header has columns")
        row["_line"] = i + 2
    return rows


def _read_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            # numbers stay text, so the logprob text is kept exactly as recorded
            row = json.loads(line, parse_float=str, parse_int=str)
        except json.JSONDecodeError as exc:
            raise IngestError(f"{path}: line {line_number} is not valid JSON ({exc.msg}); "
                              "a .jsonl file has one JSON object per line") from None
        if not isinstance(row, dict):
            raise IngestError(f"{path}: line {line_number} is not a JSON object; "
                              'write one object per line, e.g. {"logprob": -0.31}')
        row["_line"] = line_number
        rows.append(row)
    return rows


def _logprobs(path: Path, rows: list[dict[str, Any]]) -> list[tuple[float, str | None]]:
    """Parse every logprob; collect every bad row before raising, so one run fixes all."""
    values: list[tuple[float, str | None]] = []
    non_numeric: list[str] = []
    positive: list[str] = []
    for i, row in enumerate(rows):
        raw = row.get("logprob")
        text = None if raw is None else str(raw).strip()
        where = f"row {i + 1} (line {row['_line']})"
        if text is None or text == "" or text.lower() in ("nan", "null", "none"):
            values.append((math.nan, None))
            continue
        try:
            value = parse_logprob_text(text)
        except (ValueError, OverflowError):
            non_numeric.append(f"{where}: {text!r}")
            continue
        if not math.isfinite(value):
            non_numeric.append(f"{where}: {text!r}")
        elif value > 0:
            positive.append(f"{where}: {text}")
        else:
            values.append((value, text))
    problems = []
    if non_numeric:
        problems.append("logprob is not a finite number in " + _listed(non_numeric))
    if positive:
        problems.append("logprob is positive in " + _listed(positive) + " (a logprob is ln(p) "
                        "<= 0; probabilities or percentages must be converted with ln(p))")
    if problems:
        raise IngestError(f"{path}: " + "; ".join(problems))
    return values


def _listed(items: list[str]) -> str:
    shown = "; ".join(items[:MAX_LISTED_ROWS])
    more = len(items) - MAX_LISTED_ROWS
    return f"{len(items)} row(s): {shown}" + (f"; and {more} more" if more > 0 else "")


def _frames(rows: list[dict[str, Any]], values: list[tuple[float, str | None]]) -> Frames:
    tokens = list(dict.fromkeys(r["token"] for r in rows))  # in order of first appearance
    seen: dict[Any, int] = {}
    tracked: dict[str, list[Any]] = {c: [] for c in TRACKED_COLUMNS}
    samples: dict[Any, dict[str, Any]] = {}
    for row, (value, text) in zip(rows, values):
        key = _text(row.get("index"))
        if key is None:
            key = seen[row["token"]] = seen.get(row["token"], -1) + 1
        sample = samples.setdefault(key, {
            "output": _text(row.get("output")),
            "system_fingerprint": _text(row.get("system_fingerprint")),
            "group": _text(row.get("group")),
        })
        tracked["index"].append(key)
        tracked["slot"].append(tokens.index(row["token"]))
        tracked["label"].append(row["token"] if row["token"] is not None else "logprob")
        tracked["token"].append(row["token"] if row["token"] is not None else "logprob")
        tracked["position"].append(0)
        tracked["logprob"].append(value)
        tracked["logprob_text"].append(text)
        for column in ("system_fingerprint", "output", "group"):
            tracked[column].append(sample[column])
    index_of = {key: i for i, key in enumerate(samples)}  # file keys -> 0..n-1
    tracked["index"] = [index_of[k] for k in tracked["index"]]
    sample_frame = pd.DataFrame({
        "index": list(range(len(samples))), "status": "ok", "error_kind": None,
        "output": [s["output"] for s in samples.values()], "finish_reason": None,
        "system_fingerprint": [s["system_fingerprint"] for s in samples.values()],
        "model": None, "group": [s["group"] for s in samples.values()], "attempts": 1,
        "latency_s": float("nan"), "tokens": [()] * len(samples), "logprobs": [()] * len(samples),
        "bad_logprobs": 0,
    }, columns=SAMPLE_COLUMNS)
    tracked_frame = pd.DataFrame(tracked, columns=TRACKED_COLUMNS).astype(
        {"index": "int64", "slot": "int64", "position": "int64", "logprob": "float64"})
    slots = [{"label": t if t is not None else "logprob", "token": t if t is not None else "logprob",
              "position": 0} for t in tokens]
    return Frames(samples=sample_frame, tracked=tracked_frame, tracked_tokens=slots)


def _text(value: Any) -> str | None:
    """A cell as text; empty cells and nulls are None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text != "" else None
