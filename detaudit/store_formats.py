"""The two forms of a run's ``samples.sqlite``: their tables, and how each writes a
sample and reads samples back. ``detaudit.store`` picks one by the manifest's
``format_version``; a run keeps the form it was created in (a resume of a format-1
run writes format-1 rows), so no database ever mixes the two.

- Format 1: one wide row per sample, its positions (the chosen tokens and their top-k
  logprobs as JSON: about 1.5 KB in a top-20 run) and its raw response body inline.
  Reading a million samples for the analysis meant reading 2 GB of rows.
- Format 2 (new runs): each distinct positions text is stored once, in
  ``positions_texts`` (found again by its 16-byte BLAKE2b digest), and raw bodies live
  in ``raw_bodies``. A sample's row is about 100 bytes and names its positions by id:
  a million coin flips with a few dozen distinct top-k lists are read in a fraction
  of the time. The view ``sample_rows`` shows every sample with format 1's columns, for
  whoever queries the file with SQL.

Both keep the rule that a good row is never overwritten: a write only replaces a
stored error.
"""

from __future__ import annotations

import hashlib
import sqlite3
from typing import Iterable

from detaudit import store_columns
from detaudit.records import Sample

_FAILED_ATTEMPTS = """
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

# The columns of a sample as format 1 stores them, in the order ``store._sample`` reads.
ROW_COLUMNS = ("idx", "status", "output", "finish_reason", "model", "system_fingerprint",
               '"group"', "attempts", "started_at", "latency_s", "error_kind",
               "error_message", "positions", "extra", "raw", "has_completion")

# What sample_columns reads besides index, latency, output and positions: one JSON text
# of the fields few rows differ in (with the SQL types ``store._sample`` checks), which a
# run holds a handful of, so each is parsed once.
_FEW_VALUES = """json_array(s.status, s.error_kind, s."group", s.attempts, s.has_completion,
    s.finish_reason, s.model, s.system_fingerprint, s.extra, typeof(s.attempts),
    typeof(s.started_at), typeof(s.latency_s), typeof(s.output))"""


def _upsert_sql(columns: tuple[str, ...]) -> str:
    """Insert a sample's row; on its index, replace only a stored error, never a good row."""
    return (f"INSERT INTO samples ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            "ON CONFLICT(idx) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in columns[1:])
            + " WHERE samples.status != 'ok'")


class Format1:
    """One wide row per sample."""

    version = 1
    schema = """
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
);""" + _FAILED_ATTEMPTS
    tables = {"samples": tuple(c.strip('"') for c in ROW_COLUMNS)}
    _upsert = _upsert_sql(ROW_COLUMNS)
    # rows in ROW_COLUMNS order, then the positions id (None: inline)
    select_rows = f"SELECT {', '.join(ROW_COLUMNS)}, NULL FROM samples ORDER BY idx"
    # index, latency, output, the positions key (here the text), the few-values text
    select_columns = (f"SELECT s.idx, s.latency_s, s.output, s.positions, {_FEW_VALUES} "
                      "FROM samples AS s ORDER BY s.idx")

    def write(self, conn: sqlite3.Connection, rows: Iterable[tuple]) -> None:
        """``rows``: tuples in ROW_COLUMNS order (``store._row``)."""
        conn.executemany(self._upsert, rows)

    def positions_texts(self, conn: sqlite3.Connection, keys: Iterable) -> dict:
        """Format 1's positions key is the text itself."""
        return {key: key for key in keys}


class Format2:
    """Small sample rows; each distinct positions text once; raw bodies apart."""

    version = 2
    schema = """
CREATE TABLE IF NOT EXISTS samples (
    idx INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    has_completion INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    started_at REAL NOT NULL,
    latency_s REAL NOT NULL,
    "group" TEXT,
    output TEXT,
    finish_reason TEXT,
    model TEXT,
    system_fingerprint TEXT,
    error_kind TEXT,
    error_message TEXT,
    positions_id INTEGER,
    extra TEXT
);
CREATE TABLE IF NOT EXISTS positions_texts (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    text TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS raw_bodies (
    idx INTEGER PRIMARY KEY,
    raw TEXT NOT NULL
);
CREATE VIEW IF NOT EXISTS sample_rows AS
    SELECT s.idx, s.status, s.output, s.finish_reason, s.model, s.system_fingerprint,
           s."group", s.attempts, s.started_at, s.latency_s, s.error_kind, s.error_message,
           p.text AS positions, s.extra, r.raw, s.has_completion
    FROM samples AS s
    LEFT JOIN positions_texts AS p ON p.id = s.positions_id
    LEFT JOIN raw_bodies AS r ON r.idx = s.idx;
""" + _FAILED_ATTEMPTS + store_columns.SCHEMA
    _sample_columns = ("idx", "status", "has_completion", "attempts", "started_at", "latency_s",
                       '"group"', "output", "finish_reason", "model", "system_fingerprint",
                       "error_kind", "error_message", "positions_id", "extra")
    tables = {"samples": tuple(c.strip('"') for c in _sample_columns),
              "positions_texts": ("id", "digest", "text"), "raw_bodies": ("idx", "raw")}
    _upsert = _upsert_sql(_sample_columns)
    # Before the sample's own upsert: its raw body replaces (or its absence removes) what
    # an error row left, never a good row's.
    _raw_upsert = ("INSERT INTO raw_bodies (idx, raw) VALUES (?, ?) ON CONFLICT(idx) DO UPDATE "
                   "SET raw = excluded.raw WHERE (SELECT status FROM samples "
                   "WHERE samples.idx = excluded.idx) IS NOT 'ok'")
    _raw_delete = ("DELETE FROM raw_bodies WHERE idx = ?1 AND (SELECT status FROM samples "
                   "WHERE samples.idx = ?1) IS NOT 'ok'")
    select_rows = ("SELECT s.idx, s.status, s.output, s.finish_reason, s.model, "
                   "s.system_fingerprint, s.\"group\", s.attempts, s.started_at, s.latency_s, "
                   "s.error_kind, s.error_message, p.text, s.extra, r.raw, s.has_completion, "
                   "s.positions_id FROM samples AS s "
                   "LEFT JOIN positions_texts AS p ON p.id = s.positions_id "
                   "LEFT JOIN raw_bodies AS r ON r.idx = s.idx ORDER BY s.idx")
    select_columns = (f"SELECT s.idx, s.latency_s, s.output, s.positions_id, {_FEW_VALUES} "
                      "FROM samples AS s ORDER BY s.idx")
    # digests -> ids of positions texts this process wrote or found (bounded: a run of
    # long, ever different completions would otherwise grow it without end)
    CACHE_ENTRIES = 1 << 16

    def __init__(self) -> None:
        self._ids: dict[bytes, int] = {}

    def write(self, conn: sqlite3.Connection, rows: Iterable[tuple]) -> None:
        """``rows``: tuples in ROW_COLUMNS order (``store._row``)."""
        try:
            self._write(conn, rows)
        except BaseException:
            # SQLite may have rolled the transaction back (a full disk, an I/O error):
            # ids cached since the last commit could name texts that were never stored
            self._ids.clear()
            raise

    def _write(self, conn: sqlite3.Connection, rows: Iterable[tuple]) -> None:
        samples, raws, no_raw = [], [], []
        for (idx, status, output, finish_reason, model, fingerprint, group, attempts,
             started_at, latency_s, error_kind, error_message, positions, extra, raw,
             has_completion) in rows:
            positions_id = None if positions is None else self._position_id(conn, positions)
            samples.append((idx, status, has_completion, attempts, started_at, latency_s, group,
                            output, finish_reason, model, fingerprint, error_kind, error_message,
                            positions_id, extra))
            (no_raw.append((idx,)) if raw is None else raws.append((idx, raw)))
        conn.executemany(self._raw_upsert, raws)
        conn.executemany(self._raw_delete, no_raw)
        conn.executemany(self._upsert, samples)

    def _position_id(self, conn: sqlite3.Connection, text: str) -> int:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        found = self._ids.get(digest)
        if found is not None:
            return found
        conn.execute("INSERT INTO positions_texts (digest, text) VALUES (?, ?) "
                     "ON CONFLICT(digest) DO NOTHING", (digest, text))
        found, stored = conn.execute("SELECT id, text FROM positions_texts WHERE digest = ?",
                                     (digest,)).fetchone()
        if stored != text:  # two texts with one 128-bit digest: never silently merge them
            raise sqlite3.IntegrityError(f"positions text {found} has the digest of another text")
        if len(self._ids) >= self.CACHE_ENTRIES:
            self._ids.clear()
        self._ids[digest] = found
        return found

    def positions_texts(self, conn: sqlite3.Connection, keys: Iterable) -> dict:
        """{positions id: its text} for the ids asked (None -> None); an id with no
        stored text is left out, so the caller sees the damage."""
        wanted = {key for key in keys if key is not None}
        texts: dict = {None: None}
        for key, text in conn.execute("SELECT id, text FROM positions_texts"):
            if key in wanted:
                texts[key] = text
        return texts


FORMATS = {1: Format1, 2: Format2}
