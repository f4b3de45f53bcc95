"""The on-disk form of a run, and the only code that knows it.

A run lives in ``<root>/<run-id>/``:

- ``manifest.json``: what was run (probe, backend, n, tracked tokens, status...),
  with a ``format_version``; always replaced atomically (temp file + os.replace),
  so a crash never leaves half a manifest.
- ``samples.sqlite``: one row per sample index (``idx`` is the primary key, so a
  resumed run can never store an index twice), plus ``failed_attempts``, an
  append-only log of every attempt that failed (also those retried successfully).

SQLite runs in WAL mode with synchronous=NORMAL: each commit is an append to the
WAL without an fsync, so committing every sample is cheap, and a killed process
loses at most the requests that were in flight (resume sends them again).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from detaudit import runlock
from detaudit.records import Completion, Position, Sample, position_from_dict
from detaudit.redact import redact

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
DATABASE = "samples.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    idx INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    output TEXT,
    finish_reason TEXT,
    model TEXT,
    system_fingerprint TEXT,
    "group" TEXT,
    attempts INTEGER NOT NULL,
    started_at REAL NOT NULL,
    latency_s REAL NOT NULL,
    error_kind TEXT,
    error_message TEXT,
    positions TEXT,
    extra TEXT,
    raw TEXT,
    has_completion INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS failed_attempts (
    idx INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    at REAL NOT NULL,
    error_kind TEXT NOT NULL,
    error_message TEXT,
    retry_after REAL,
    raw TEXT
);
"""

_COLUMNS = ("idx", "status", "output", "finish_reason", "model", "system_fingerprint",
            '"group"', "attempts", "started_at", "latency_s", "error_kind",
            "error_message", "positions", "extra", "raw", "has_completion")

# A good row is never overwritten: the upsert only replaces a stored error.
_UPSERT = (f"INSERT INTO samples ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(_COLUMNS))}) "
           "ON CONFLICT(idx) DO UPDATE SET "
           + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:])
           + " WHERE samples.status != 'ok'")


class StoreError(Exception):
    """A run folder cannot be created or read; the message names the folder and the fix."""


def new_run_id(probe_name: str, model: str, now: datetime | None = None) -> str:
    """``<UTC timestamp>-<probe>-<model slug>``: sortable by time, readable at a glance.

    Microseconds in the timestamp keep two runs started in the same second apart;
    ``RunStore.create`` refuses an existing folder in any case.
    """
    now = now or datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond:06d}Z"
    return f"{stamp}-{_slug(probe_name)}-{_slug(model)}"


def _slug(text: str) -> str:
    # A local model path becomes its folder name; anything odd becomes "-".
    text = text.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.").lower()[:60] or "model"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunStore:
    """An open run folder: the manifest in memory, and one SQLite connection."""

    def __init__(self, path: Path, manifest: dict[str, Any], conn: sqlite3.Connection,
                 lock: runlock.RunLock | None = None):
        self.path = path
        self.manifest = manifest
        self._conn = conn
        self.lock = lock  # held by a store that writes samples (create, open(lock=True))

    # --- opening -------------------------------------------------------------

    @classmethod
    def create(cls, root: str | os.PathLike, run_id: str, manifest: dict[str, Any]) -> "RunStore":
        path = Path(root) / run_id
        try:
            path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise StoreError(f"{path}: a run folder with this id already exists; "
                             "choose another --out or resume it with --resume") from None
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the run folder ({exc.strerror}); "
                             "check --out") from None
        lock = runlock.acquire(path)  # before anything is written: a resume must wait
        manifest = {"format_version": FORMAT_VERSION, "run_id": run_id, **manifest}
        _write_json_atomic(path / MANIFEST, manifest)
        return cls(path, manifest, _connect(path / DATABASE), lock)

    @classmethod
    def open(cls, path: str | os.PathLike, lock: bool = False) -> "RunStore":
        """Open a run folder; ``lock``: for writing samples (a resume), refused at once
        with ``runlock.RunLocked`` while another process has it."""
        path = Path(path)
        manifest = read_manifest(path)
        if not (path / DATABASE).is_file():
            raise StoreError(f"{path}: {DATABASE} is missing; this run folder is incomplete")
        held = runlock.acquire(path) if lock else None
        try:
            conn = _connect(path / DATABASE)
        except BaseException:
            if held:
                held.release()
            raise
        return cls(path, manifest, conn, held)

    # --- samples -------------------------------------------------------------

    def record(self, sample: Sample) -> None:
        """Store one sample as it arrives; commits at once (WAL, no fsync)."""
        self.record_many((sample,))

    def record_many(self, samples: Iterable[Sample]) -> None:
        """Store samples that arrived together in one transaction (group commit):
        the runner passes every sample finished in one event-loop turn, so a commit
        is paid per turn, not per sample, and nothing waits for a timer."""
        self._conn.executemany(_UPSERT, map(_row, samples))
        self._conn.commit()

    def record_failed_attempt(self, index: int, attempt: int, kind: str,
                              message: str | None, retry_after: float | None = None,
                              raw: str | None = None) -> None:
        """Log an attempt that failed, with the body that came back if it was not a
        completion; committed with the next sample (it is only a log). Message and
        body are redacted: no secret is written."""
        self._conn.execute(
            "INSERT INTO failed_attempts (idx, attempt, at, error_kind, error_message, "
            "retry_after, raw) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (index, attempt, time.time(), kind, _redacted(message), retry_after, _redacted(raw)))

    def failed_attempts(self) -> list[dict[str, Any]]:
        cur = self._conn.execute("SELECT idx, attempt, at, error_kind, error_message, retry_after, "
                                 "raw FROM failed_attempts ORDER BY rowid")
        keys = ("index", "attempt", "at", "error_kind", "error_message", "retry_after", "raw")
        return [dict(zip(keys, row)) for row in cur]

    def done_indices(self) -> set[int]:
        """Indices stored with status ok (they are never sent again)."""
        return {i for (i,) in self._conn.execute("SELECT idx FROM samples WHERE status = 'ok'")}

    def missing_indices(self, n: int) -> list[int]:
        """Indices in ``range(n)`` still to send: never stored, or stored as an error
        (a resumed run retries those and replaces the error row)."""
        return list(self.iter_missing(n))

    def iter_missing(self, n: int, start: int = 0):
        """``missing_indices`` lazily, in order: memory grows with the stored good
        samples, never with ``n``."""
        index = start
        for done in self.done_in(start, n):
            yield from range(index, done)
            index = done + 1
        yield from range(index, n)

    def done_in(self, start: int, stop: int):
        """Good sample indices in ``start..stop-1``, ascending."""
        cur = self._conn.execute("SELECT idx FROM samples WHERE status = 'ok' AND idx >= ? "
                                 "AND idx < ? ORDER BY idx", (start, stop))
        return (i for (i,) in cur.fetchall())

    def count_done(self, start: int, stop: int) -> int:
        """How many good samples have an index in ``start..stop-1``."""
        return self._conn.execute("SELECT COUNT(*) FROM samples WHERE status = 'ok' "
                                  "AND idx >= ? AND idx < ?", (start, stop)).fetchone()[0]

    def count(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]

    def data_notes(self) -> dict[str, int]:
        """What good samples' ``extra`` says about their logprobs: how many samples
        carried -9999 sentinel entries (and how many entries), and how many had fewer
        top logprobs than asked (and the fewest seen). Zero counts are left out."""
        notes = {"sentinel_samples": 0, "sentinel_entries": 0, "short_top_samples": 0}
        fewest = None
        for (extra,) in self._conn.execute(
                "SELECT extra FROM samples WHERE status = 'ok' AND extra IS NOT NULL "
                "AND (extra LIKE '%sentinel_logprobs%' OR extra LIKE '%top_logprobs_short%')"):
            data = json.loads(extra)
            if data.get("sentinel_logprobs"):
                notes["sentinel_samples"] += 1
                notes["sentinel_entries"] += int(data["sentinel_logprobs"])
            if data.get("top_logprobs_short") is not None:
                notes["short_top_samples"] += 1
                short = int(data["top_logprobs_short"])
                fewest = short if fewest is None else min(fewest, short)
        if fewest is not None:
            notes["short_top_fewest"] = fewest
        return {k: v for k, v in notes.items() if v or k == "short_top_fewest"}

    def samples(self) -> list[Sample]:
        cur = self._conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM samples ORDER BY idx")
        return [_sample(row) for row in cur]

    # --- manifest ------------------------------------------------------------

    def update_manifest(self, **fields: Any) -> None:
        updated = {**self.manifest, **fields}
        _write_json_atomic(self.path / MANIFEST, updated)
        self.manifest = updated

    def close(self) -> None:
        if self._conn is not None:
            self._conn.commit()
            self._conn.close()
            self._conn = None  # type: ignore[assignment]
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a run folder, checked for a format this version can read."""
    if not path.is_dir():
        raise StoreError(f"{path}: no such run folder; give a folder under results/ "
                         "(e.g. results/<run-id>)")
    file = path / MANIFEST
    if not file.is_file():
        raise StoreError(f"{path}: not a detaudit run folder (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"{file}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"{file}: the manifest is not a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise StoreError(f"{file}: format_version is missing or not an integer")
    if version not in SUPPORTED_VERSIONS:
        newer = " (written by a newer detaudit; upgrade detaudit)" if version > FORMAT_VERSION else ""
        raise StoreError(f"{path}: run format version {version} is not supported{newer}; "
                         f"this detaudit reads version(s) {', '.join(map(str, SUPPORTED_VERSIONS))}")
    return manifest


def _connect(file: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(file, isolation_level="DEFERRED", check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(failed_attempts)")}
        if "raw" not in columns:  # a run stored before failed attempts kept their body
            conn.execute("ALTER TABLE failed_attempts ADD COLUMN raw TEXT")
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{file}: not a usable SQLite database ({exc})") from None
    return conn


def _write_json_atomic(file: Path, data: dict[str, Any]) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=file.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, file)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _row(s: Sample) -> tuple:
    c = s.completion
    if c is None:
        return (s.index, s.status, None, None, None, None, s.group, s.attempts, s.started_at,
                s.latency_s, s.error_kind, _redacted(s.error_message), None, None, None, 0)
    positions = _dumps([_position_dict(p) for p in c.positions])
    extra = _dumps(c.extra) if c.extra else None
    return (s.index, s.status, c.text, c.finish_reason, c.model, c.system_fingerprint, s.group,
            s.attempts, s.started_at, s.latency_s, s.error_kind, _redacted(s.error_message),
            positions, extra, c.raw, 1)


def _redacted(text: str | None) -> str | None:
    return None if text is None else redact(text)


_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=True).encode


def _position_dict(p: Position) -> dict[str, Any]:
    """``dataclasses.asdict`` by hand: asdict deep-copies and was 80% of store time."""
    return {"token": p.token, "logprob": p.logprob, "logprob_text": p.logprob_text,
            "top": [{"token": t.token, "logprob": t.logprob, "logprob_text": t.logprob_text,
                     "bytes": t.bytes} for t in p.top],
            "bytes": p.bytes}


def _sample(row: tuple) -> Sample:
    (idx, status, output, finish_reason, model, fingerprint, group, attempts, started_at,
     latency_s, error_kind, error_message, positions, extra, raw, has_completion) = row
    completion = None
    if has_completion:
        completion = Completion(
            text=output, finish_reason=finish_reason,
            positions=[position_from_dict(p) for p in json.loads(positions or "[]")],
            model=model, system_fingerprint=fingerprint,
            extra=json.loads(extra) if extra else {}, raw=raw)
    return Sample(index=idx, status=status, completion=completion, attempts=attempts,
                  started_at=started_at, latency_s=latency_s, error_kind=error_kind,
                  error_message=error_message, group=group)
