"""A format-2 run's sample columns as arrays, kept beside its rows (``column_cache``).

Reading a million rows through Python's sqlite3 makes millions of objects and takes
over a second and a half; the analysis needs the same few columns every time. So once
a run is complete the store writes them here: per column an int or float array (texts
as codes into their few distinct values) in one compressed blob, and a JSON row with
the distinct values, the positions ids of the distinct entries and the row count.
Reading them back takes milliseconds.

The cache can never go stale: triggers on ``samples`` empty it in the same transaction
as any insert, update or delete of a row, whoever makes it (an older detaudit, a user's
SQL). A reader also checks the row count, and anything it cannot read back is ignored:
the rows are read instead, and their checks report what is wrong with them.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from typing import Any

from detaudit.records import CODED_COLUMNS, Coded, SampleColumns, compact_codes

SCHEMA = """
CREATE TABLE IF NOT EXISTS column_cache (
    name TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
""" + "".join(f"""
CREATE TRIGGER IF NOT EXISTS samples_{event.lower()}_drops_column_cache AFTER {event} ON samples
BEGIN DELETE FROM column_cache; END;
""" for event in ("INSERT", "UPDATE", "DELETE"))

VERSION = 1
# numeric columns and the dtype each is kept in
_NUMBERS = {"index": "<i8", "attempts": "<i8", "latency_s": "<f8", "has_completion": "|b1",
            "positions": None}  # positions: codes, sized like the coded columns
_META = "meta"


def save(conn: sqlite3.Connection, columns: SampleColumns, entry_keys: list) -> None:
    """Replace the cache with ``columns`` (as ``store._sample_columns`` read them) and
    the positions id of each distinct entry (``entry_keys[0]`` is None: no positions)."""
    import numpy as np

    blobs = {}
    for name, dtype in _NUMBERS.items():
        values = np.asarray(getattr(columns, name))
        blobs[name] = _pack(values.astype(dtype) if dtype else
                            compact_codes(values, len(columns.distinct_positions)))
    values = {}
    for name in CODED_COLUMNS:
        coded = getattr(columns, name)
        blobs[name] = _pack(compact_codes(coded.codes, len(coded.values)))
        values[name] = coded.values
    meta = {"version": VERSION, "rows": len(columns), "values": values, "entries": entry_keys,
            "dtypes": {name: dtype for name, (dtype, _) in blobs.items()}}
    with conn:
        conn.execute("DELETE FROM column_cache")
        conn.executemany("INSERT INTO column_cache (name, data) VALUES (?, ?)",
                         [(name, data) for name, (_, data) in blobs.items()]
                         + [(_META, json.dumps(meta, allow_nan=False).encode())])


def has_cache(conn: sqlite3.Connection) -> bool:
    """Whether a cache is stored (current: the triggers empty it on any change)."""
    try:
        return conn.execute("SELECT 1 FROM column_cache WHERE name = ?", (_META,)).fetchone() is not None
    except sqlite3.Error:
        return False


def load(conn: sqlite3.Connection) -> tuple[dict[str, Any], list] | None:
    """The cached columns (without ``distinct_positions``) and the entries' positions
    ids, or None when there is no whole, current cache to read."""
    import numpy as np

    try:
        stored, rows = _snapshot(conn)
        if _META not in stored:
            return None
        meta = json.loads(stored.pop(_META))
        if meta.get("version") != VERSION or meta["rows"] != rows:
            return None
        fields: dict[str, Any] = {}
        for name in (*_NUMBERS, *CODED_COLUMNS):
            array = np.frombuffer(zlib.decompress(stored[name]), dtype=meta["dtypes"][name])
            if len(array) != rows:
                return None
            fields[name] = array
        for name in CODED_COLUMNS:
            values = meta["values"][name]
            codes = fields[name]
            if len(codes) and (codes.min() < 0 or codes.max() >= len(values)):
                return None
            fields[name] = Coded(codes, values)
        entries = meta["entries"]
        positions = fields["positions"]
        if len(positions) and (positions.min() < 0 or positions.max() >= len(entries)):
            return None
        fields["positions"] = positions
        fields["has_completion"] = fields["has_completion"].astype(bool)
        for name in ("index", "attempts", "latency_s"):
            fields[name] = fields[name].copy()  # writable, as a column read from rows
        return fields, entries
    except (sqlite3.Error, KeyError, TypeError, ValueError, zlib.error):
        return None  # no cache (an older store, a read-only one never completed) or damaged


def _snapshot(conn: sqlite3.Connection) -> tuple[dict[str, bytes], int]:
    """The cache's rows and the samples' count, read in one transaction."""
    own = not conn.in_transaction  # a writer's open transaction is one snapshot already
    if own:
        conn.execute("BEGIN")
    try:
        stored = dict(conn.execute("SELECT name, data FROM column_cache"))
        (rows,) = conn.execute("SELECT count(*) FROM samples").fetchone()
    finally:
        if own:
            conn.execute("COMMIT")
    return stored, rows


def _pack(array: Any) -> tuple[str, bytes]:
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)  # the same file on any machine
    return array.dtype.str, zlib.compress(array.tobytes(), 1)

