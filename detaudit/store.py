"""The on-disk form of a run, and the only code that knows it.

A run lives in ``<root>/<run-id>/``:

- ``manifest.json``: what was run (probe, backend, n, tracked tokens, status...),
  with a ``format_version``; always replaced atomically (temp file + os.replace),
  so a crash never leaves half a manifest.
- ``samples.sqlite``: one row per sample index (``idx`` is the primary key, so a
  resumed run can never store an index twice), plus ``failed_attempts``, an
  append-only log of every attempt that failed (also those retried successfully).
  Its tables are those of the manifest's ``format_version`` (``store_formats``: format
  2 stores each distinct positions text once; format 1 runs are read and resumed as
  they are).

SQLite runs in WAL mode with synchronous=NORMAL: each commit is an append to the
WAL without an fsync, so committing every sample is cheap, and a killed process
loses at most the requests that were in flight (resume sends them again).

``RunStore.open_read_only`` is for the commands that only read (report, export,
plot, compare): it creates and changes no file in the run folder, and it refuses a
store it would misread (an empty or foreign database, a manifest of the wrong
types, a row that is not what this module writes) with ``StoreError``.
"""

from __future__ import annotations

import json
import operator
import os
import re
import shutil
import sqlite3
import tempfile
import time
from urllib.parse import quote
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from detaudit import runlock, store_columns
from detaudit.gc_pause import collector_paused
from detaudit.records import Coded, Completion, Position, Sample, SampleColumns, position_from_dict
from detaudit.redact import redact
from detaudit.store_formats import FORMATS, Format1, Format2

FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
DATABASE = "samples.sqlite"


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
                 lock: runlock.RunLock | None = None, read_only: bool = False,
                 scratch: tempfile.TemporaryDirectory | None = None):
        self.path = path
        self.format: Format1 | Format2 = FORMATS[manifest["format_version"]]()
        self.manifest = manifest
        self._conn = conn
        self.lock = lock  # held by a store that writes samples (create, open(lock=True))
        self.read_only = read_only
        self._scratch = scratch  # a private copy of a database with a WAL (read-only opening)

    # --- opening -------------------------------------------------------------

    @classmethod
    def create(cls, root: str | os.PathLike, run_id: str, manifest: dict[str, Any],
               format_version: int = FORMAT_VERSION) -> "RunStore":
        """A new run folder; ``format_version`` other than the current one only to write
        a run as an older detaudit did (the compatibility tests)."""
        fmt = FORMATS[format_version]
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
        manifest = {"format_version": format_version, "run_id": run_id, **manifest}
        _write_json_atomic(path / MANIFEST, manifest)
        return cls(path, manifest, _connect(path / DATABASE, fmt), lock)

    @classmethod
    def open(cls, path: str | os.PathLike, lock: bool = False) -> "RunStore":
        """Open a run folder; ``lock``: for writing samples (a resume), refused at once
        with ``runlock.RunLocked`` while another process has it."""
        path = Path(path)
        manifest = read_manifest(path)
        if not (path / DATABASE).is_file():
            raise StoreError(f"{path}: {DATABASE} is missing; this run folder is incomplete")
        fmt = FORMATS[manifest["format_version"]]
        conn = _open_existing(path / DATABASE, fmt)  # checked before the lock: a refused
        try:                                    # resume touches no file of the folder
            held = runlock.acquire(path) if lock else None
        except BaseException:
            conn.close()
            raise
        try:
            _prepare(conn, path / DATABASE, fmt)
        except BaseException:
            conn.close()
            if held:
                held.release()
            raise
        return cls(path, manifest, conn, held)

    @classmethod
    def open_read_only(cls, path: str | os.PathLike) -> "RunStore":
        """Open a run to read it, leaving every file of the folder as it was.

        A database without a WAL file holds every commit in its main file and is read
        in place (SQLite ``mode=ro&immutable=1``: no -wal or -shm is created). One with
        a WAL (a killed or running run) would have SQLite write its -shm even when read
        only, so its two files are copied to a temporary folder and read there, a copy
        kept only if neither file changed while it was made. A run committing so often
        that no copy holds still is read in place with ``mode=ro``: its -wal and -shm
        exist already, and its own writer changes them anyway."""
        path = Path(path)
        manifest = read_manifest(path)
        for key in _REQUIRED_TO_READ:
            if key not in manifest:
                raise StoreError(f"{path / MANIFEST}: {key} is missing; the manifest was edited "
                                 "or damaged, so this run cannot be read")
        file = path / DATABASE
        if not file.is_file():
            raise StoreError(f"{path}: {DATABASE} is missing; this run folder is incomplete")
        wal = Path(f"{file}-wal")
        in_wal = wal.is_file() and wal.stat().st_size > 0
        if file.stat().st_size == 0 and not in_wal:
            raise StoreError(f"{file}: the file is empty (0 bytes), so the run's samples are "
                             "lost; nothing can be reported from it")
        scratch = None
        try:
            if in_wal:
                scratch = tempfile.TemporaryDirectory(prefix="detaudit-read-")
                copy = Path(scratch.name) / DATABASE
                copied = _still_copy(file, wal, copy)
                if copied:
                    uri = f"file:{quote(str(copy))}?mode=ro"
                else:
                    _discard(scratch)
                    scratch = None
                    # None: the writer closed meanwhile and folded its WAL into the file
                    mode = "mode=ro" if copied is False else "mode=ro&immutable=1"
                    uri = f"file:{quote(str(file.resolve()))}?{mode}"
            else:
                uri = f"file:{quote(str(file.resolve()))}?mode=ro&immutable=1"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            conn.execute(f"PRAGMA mmap_size = {_READ_MMAP_BYTES}")
            _check_tables(conn, file, FORMATS[manifest["format_version"]])
        except OSError as exc:
            _discard(scratch)
            raise StoreError(f"{file}: cannot read it ({exc.strerror or exc})") from None
        except sqlite3.DatabaseError as exc:
            _discard(scratch)
            raise StoreError(f"{file}: not a usable SQLite database ({exc})") from None
        except StoreError:
            _discard(scratch)
            raise
        return cls(path, manifest, conn, read_only=True, scratch=scratch)

    # --- samples -------------------------------------------------------------

    def record(self, sample: Sample) -> None:
        """Store one sample as it arrives; commits at once (WAL, no fsync)."""
        self.record_many((sample,))

    def record_many(self, samples: Iterable[Sample]) -> None:
        """Store samples that arrived together in one transaction (group commit):
        the runner passes every sample finished in one event-loop turn, so a commit
        is paid per turn, not per sample, and nothing waits for a timer."""
        self._writable()
        self.format.write(self._conn, map(_row, samples))
        self._conn.commit()

    def record_failed_attempt(self, index: int, attempt: int, kind: str,
                              message: str | None, retry_after: float | None = None,
                              raw: str | None = None) -> None:
        """Log an attempt that failed, with the body that came back if it was not a
        completion; committed with the next sample (it is only a log). Message and
        body are redacted: no secret is written."""
        self._writable()
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
        for idx, extra in self._conn.execute(
                "SELECT idx, extra FROM samples WHERE status = 'ok' AND extra IS NOT NULL "
                "AND (extra LIKE '%sentinel_logprobs%' OR extra LIKE '%top_logprobs_short%')"):
            try:
                data = _json_object(extra, "extra")
                sentinels = int(data.get("sentinel_logprobs") or 0)
                short = data.get("top_logprobs_short")
                short = None if short is None else int(short)
            except (BadRow, TypeError, ValueError) as exc:
                raise self._bad_row(idx, exc) from None
            if sentinels:
                notes["sentinel_samples"] += 1
                notes["sentinel_entries"] += sentinels
            if short is not None:
                notes["short_top_samples"] += 1
                fewest = short if fewest is None else min(fewest, short)
        if fewest is not None:
            notes["short_top_fewest"] = fewest
        return {k: v for k, v in notes.items() if v or k == "short_top_fewest"}

    def samples(self) -> list[Sample]:
        """Every stored sample; a row this module did not write that way -> StoreError."""
        try:
            cur = self._conn.execute(self.format.select_rows)
            out = []
            for row in cur:
                try:
                    out.append(_sample(row))
                except BadRow as exc:
                    raise self._bad_row(row[0], exc) from None
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path / DATABASE}: cannot read the samples ({exc})") from None
        return out

    def sample_columns(self) -> SampleColumns:
        """``samples()`` as columns (``records.SampleColumns``), for the analysis of a
        large run: from the column cache when it is current (``store_columns``), else
        one read of the rows, each distinct positions and extra text parsed once, no
        object per sample or position (a store that may be written then keeps them in
        the cache). Whatever ``samples()`` refuses this refuses with the same error (a
        damaged row sends it through ``samples()``)."""
        with collector_paused():
            columns = self._cached_columns()
            if columns is not None:
                return columns
            try:
                read = _sample_columns(self._conn.execute(self.format.select_columns),
                                       lambda keys: self.format.positions_texts(self._conn, keys))
            except sqlite3.OperationalError:  # a BLOB where text belongs: samples() says where
                read = None
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.path / DATABASE}: cannot read the samples "
                                 f"({exc})") from None
            if read is None:  # some row is not what _row writes: samples() says which
                return SampleColumns.from_samples(self.samples())
            columns, entry_keys = read
            if not self.read_only and self.format.version >= 2:
                self._keep_columns(columns, entry_keys)
            return columns

    def _cached_columns(self) -> SampleColumns | None:
        if self.format.version < 2:
            return None
        cached = store_columns.load(self._conn)
        if cached is None:
            return None
        fields, entry_keys = cached
        try:
            entries = _entries(entry_keys, lambda keys: self.format.positions_texts(self._conn, keys))
        except (BadRow, KeyError, TypeError, sqlite3.Error):
            return None  # the rows' own read finds and reports it
        return SampleColumns(**fields, distinct_positions=entries)

    def _keep_columns(self, columns: SampleColumns, entry_keys: list) -> None:
        """Save the columns in the cache; a store that cannot take them (a full disk)
        is read from its rows next time, as before."""
        try:
            store_columns.save(self._conn, columns, entry_keys)
        except (sqlite3.Error, ValueError):
            pass

    def _keep_columns_if_complete(self) -> None:
        """At close: a complete run without a current cache gets one, so every later
        report reads arrays, not rows."""
        if self.format.version < 2 or self.manifest.get("status") != "complete":
            return
        try:
            if store_columns.has_cache(self._conn):
                return
            self.sample_columns()
        except (StoreError, sqlite3.Error):
            pass  # a damaged run: whoever reads it is told

    def _bad_row(self, idx: Any, problem: Exception) -> StoreError:
        return StoreError(f"{self.path / DATABASE}: the row of sample {idx!r} is not readable: "
                          f"{problem}; the file was edited or damaged (detaudit never writes this)")

    def _writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.path}: opened read-only; nothing may be written to it")

    # --- manifest ------------------------------------------------------------

    def update_manifest(self, **fields: Any) -> None:
        self._writable()
        updated = {**self.manifest, **fields}
        _write_json_atomic(self.path / MANIFEST, updated)
        self.manifest = updated

    def close(self) -> None:
        if self._conn is not None:
            if not self.read_only:
                self._conn.commit()
                self._keep_columns_if_complete()
            self._conn.close()
            self._conn = None  # type: ignore[assignment]
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        _discard(self._scratch)
        self._scratch = None

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
    problem = manifest_problem(manifest)
    if problem:
        raise StoreError(f"{file}: {problem}; the manifest was edited or damaged, so this run "
                         "cannot be used (restore it, or start a new run)")
    return manifest


_REQUIRED_TO_READ = ("run_id", "probe", "n")
# A reader maps the database instead of copying it page by page through read(): reading
# every row of a 2 GB run (a million top-20 samples) takes half the time. SQLite caps
# the size at its build's limit (2 GB by default) and reads the rest as before.
_READ_MMAP_BYTES = 1 << 40
_TEXT, _LIST, _OBJECT, _NULL = (str,), (list,), (dict,), (type(None),)
# The manifest fields this module writes or readers rely on, and the JSON types they
# may have; fields not listed (added by newer code) are left alone.
_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "run_id": _TEXT, "tool_version": _TEXT, "probe": _OBJECT, "n": (int,),
    "concurrency": (int,), "backend": _OBJECT, "backend_config": _OBJECT,
    "tracked": _LIST + _NULL, "status": _TEXT, "started_at": _TEXT + _NULL,
    "ended_at": _TEXT + _NULL, "command": _LIST, "limits": _OBJECT + _NULL,
    "resumed_at": _LIST,
}
_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false",
               list: "a list", dict: "an object", type(None): "null"}


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the manifest's field types, or None: a string ``n`` or a list
    ``probe`` must stop a reader with a message, not a traceback deep in the report."""
    for key, allowed in _MANIFEST_TYPES.items():
        if key in manifest and not _is_a(manifest[key], allowed):
            return _wrong(key, manifest[key], allowed)
    n = manifest.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n < 1:
        return f"n is {n}, expected an integer >= 1"
    probe = manifest.get("probe") or {}
    for key in ("name", "kind", "api"):
        if key in probe and not isinstance(probe[key], str):
            return _wrong(f"probe.{key}", probe[key], _TEXT)
    if "name" not in probe and "probe" in manifest:
        return "probe.name is missing"
    for key, allowed in (("request", _OBJECT), ("track", _OBJECT)):
        if key in probe and not _is_a(probe[key], allowed):
            return _wrong(f"probe.{key}", probe[key], allowed)
    outcomes = (probe.get("track") or {}).get("outcomes")
    if outcomes is not None and not (isinstance(outcomes, list)
                                     and all(isinstance(o, str) for o in outcomes)):
        return "probe.track.outcomes must be a list of strings"
    for i, entry in enumerate(manifest.get("tracked") or []):
        where = f"tracked[{i}]"
        if not isinstance(entry, dict):
            return _wrong(where, entry, _OBJECT)
        for key, allowed in (("label", _TEXT + _NULL), ("token", _TEXT + _NULL)):
            if key in entry and not _is_a(entry[key], allowed):
                return _wrong(f"{where}.{key}", entry[key], allowed)
        position = entry.get("position", 0)
        if position != "all" and not (_is_a(position, (int,)) and position >= 0):
            return f"{where}.position is {position!r}, expected an integer >= 0 or \"all\""
    return None


def _is_a(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # JSON true/false is no integer
        return bool in allowed
    return isinstance(value, allowed)


def _wrong(key: str, value: Any, allowed: tuple[type, ...]) -> str:
    got = _JSON_NAMES.get(type(value), type(value).__name__)
    shown = json.dumps(value)[:40] if isinstance(value, (str, int, float, list, dict)) else ""
    return (f"{key} is {got}{f' ({shown})' if shown else ''}, expected "
            f"{' or '.join(_JSON_NAMES[t] for t in allowed)}")


def _check_tables(conn: sqlite3.Connection, file: Path, fmt: type) -> None:
    """The tables of the run's format with every column this module writes, or StoreError."""
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "samples" not in tables:
        found = f" (it has {', '.join(sorted(tables))})" if tables else " (it has no tables)"
        raise StoreError(f"{file}: no samples table{found}; this is not a detaudit run "
                         "database, or its samples were removed")
    for table, wanted in fmt.tables.items():
        if table not in tables:
            raise StoreError(f"{file}: the {table} table is missing; format {fmt.version} "
                             "(the manifest's format_version) needs it, so the file was "
                             "damaged or the manifest edited")
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise StoreError(f"{file}: the {table} table lacks column(s) {', '.join(missing)}; "
                             f"it was not written by this detaudit as format {fmt.version}")


def _still_copy(file: Path, wal: Path, copy: Path, tries: int = 5) -> bool | None:
    """Copy the database and its WAL to ``copy`` (+ ``-wal``) while neither changes;
    False when a writer kept changing them through every try, None when the WAL went
    away (its writer closed, which folds the WAL into the main file)."""
    def state() -> tuple:
        return tuple((s.st_size, s.st_mtime_ns) for s in (file.stat(), wal.stat()))

    try:
        for _ in range(tries):
            before = state()
            shutil.copyfile(wal, f"{copy}-wal")
            shutil.copyfile(file, copy)
            if state() == before:
                return True
    except FileNotFoundError:
        return None
    return False


def _discard(scratch: tempfile.TemporaryDirectory | None) -> None:
    if scratch is not None:
        scratch.cleanup()


def _connect(file: Path, fmt: type) -> sqlite3.Connection:
    """Open (creating) a run's database for writing."""
    try:
        conn = sqlite3.connect(file, isolation_level="DEFERRED", check_same_thread=False)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{file}: not a usable SQLite database ({exc})") from None
    _prepare(conn, file, fmt)
    return conn


def _open_existing(file: Path, fmt: type) -> sqlite3.Connection:
    """A stored run's database, checked before anything is written to it, so an empty
    or foreign file is refused instead of turned into an empty run."""
    _refuse_empty(file)
    try:
        conn = sqlite3.connect(file, isolation_level="DEFERRED", check_same_thread=False)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{file}: not a usable SQLite database ({exc})") from None
    try:
        _check_tables(conn, file, fmt)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"{file}: not a usable SQLite database ({exc})") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(conn: sqlite3.Connection, file: Path, fmt: type) -> None:
    """WAL, the schema, and columns added since older runs were stored."""
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(fmt.schema)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(failed_attempts)")}
        if "raw" not in columns:  # a run stored before failed attempts kept their body
            conn.execute("ALTER TABLE failed_attempts ADD COLUMN raw TEXT")
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{file}: not a usable SQLite database ({exc})") from None


def _refuse_empty(file: Path) -> None:
    if file.stat().st_size == 0:
        raise StoreError(f"{file}: the file is empty (0 bytes), so the run's samples "
                         "are lost; start a new run instead of resuming this one")


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


class BadRow(ValueError):
    """A stored row that is not what ``_row`` writes; the message says which field."""


def _sample(row: tuple) -> Sample:
    """A row in ``ROW_COLUMNS`` order and the id of its positions text (format 2; None
    where the text is inline) -> Sample."""
    (idx, status, output, finish_reason, model, fingerprint, group, attempts, started_at,
     latency_s, error_kind, error_message, positions, extra, raw, has_completion,
     positions_id) = row
    if positions_id is not None and positions is None:
        raise BadRow(f"positions_id is {positions_id!r}, which names no stored positions text")
    if status not in ("ok", "error"):
        raise BadRow(f"status is {status!r}, expected 'ok' or 'error'")
    for name, value in (("attempts", attempts), ("started_at", started_at), ("latency_s", latency_s)):
        if not _is_a(value, (int,) if name == "attempts" else (int, float)):
            raise BadRow(f"{name} is {value!r}, not a number")
    completion = None
    if has_completion:
        if output is not None and not isinstance(output, str):
            raise BadRow(f"output is {type(output).__name__}, not text")
        completion = Completion(
            text=output, finish_reason=finish_reason,
            positions=_positions(positions),
            model=model, system_fingerprint=fingerprint,
            extra=_json_object(extra, "extra") if extra else {}, raw=raw)
    return Sample(index=idx, status=status, completion=completion, attempts=attempts,
                  started_at=started_at, latency_s=latency_s, error_kind=error_kind,
                  error_message=error_message, group=group)


def _json(text: Any, name: str) -> Any:
    if not isinstance(text, (str, bytes)):
        raise BadRow(f"{name} is {type(text).__name__}, not JSON text")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadRow(f"{name} is not JSON ({exc}): {str(text)[:40]!r}") from None


def _json_object(text: Any, name: str) -> dict[str, Any]:
    value = _json(text, name)
    if not isinstance(value, dict):
        raise BadRow(f"{name} is {_JSON_NAMES.get(type(value), 'JSON')}, not a JSON object")
    return value


def _positions(text: Any) -> list[Position]:
    """The positions column -> Positions, every field checked for its type."""
    data = _json(text or "[]", "positions")
    if not isinstance(data, list):
        raise BadRow(f"positions is {_JSON_NAMES.get(type(data), 'JSON')}, not a list")
    for i, p in enumerate(data):
        _check_entry(p, f"positions[{i}]")
        top = p.get("top", [])
        if not isinstance(top, list):
            raise BadRow(f"positions[{i}].top is not a list")
        for j, t in enumerate(top):
            _check_entry(t, f"positions[{i}].top[{j}]")
    return [position_from_dict(p) for p in data]


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise BadRow(f"{where} is not a JSON object")
    if not isinstance(entry.get("token"), str):
        raise BadRow(f"{where}.token is {entry.get('token')!r}, not a string")
    if not _is_a(entry.get("logprob"), (int, float)):
        raise BadRow(f"{where}.logprob is {entry.get('logprob')!r}, not a number")
    if not isinstance(entry.get("logprob_text"), str):
        raise BadRow(f"{where}.logprob_text is {entry.get('logprob_text')!r}, not a string")


_OUTPUT, _POSITIONS, _FIELDS = map(operator.itemgetter, (2, 3, 4))


class _Numbering(dict):
    """Numbers values in order of first appearance: ``numbering[value]`` is its number
    (a C-level lookup through ``map``; only a new value runs Python)."""

    def __missing__(self, value: Any) -> int:
        number = self[value] = len(self)
        return number


def _sample_columns(cursor: sqlite3.Cursor, texts_of: Callable[[Iterable], dict],
                    chunk: int = 4096) -> tuple[SampleColumns, list] | None:
    """The rows of ``Format.select_columns`` as columns, with each positions entry's key
    (entry 0: none), or None when one of the rows is not what ``_row`` writes. Checks
    what ``_sample`` checks, once per distinct set of fields, and parses each distinct
    positions and extra text once. Rows are read a chunk at a time, so a million
    positions texts are never held at once: each is numbered and dropped. A row's
    positions key is its text (format 1) or its text's id (format 2); ``texts_of(keys)``
    gives {key: text}."""
    import numpy as np

    idx: list[int] = []
    latency_s: list[float] = []
    output_codes: list[int] = []
    key_codes: list[int] = []
    text_codes: list[int] = []
    outputs, keys, texts = _Numbering(), _Numbering(), _Numbering()
    while rows := cursor.fetchmany(chunk):
        for column, values in zip((idx, latency_s), zip(*rows)):
            column.extend(values)
        output_codes.extend(map(outputs.__getitem__, map(_OUTPUT, rows)))
        text_codes.extend(map(texts.__getitem__, map(_POSITIONS, rows)))
        key_codes.extend(map(keys.__getitem__, map(_FIELDS, rows)))
    per_key: list[list] = []
    try:
        for key in keys:
            (status, error_kind, group, attempts, has_completion, finish_reason, model,
             fingerprint, extra, attempts_type, started_type, latency_type, output_type) = json.loads(key)
            present = bool(has_completion)
            if status not in ("ok", "error") or attempts_type != "integer" \
                    or not {started_type, latency_type} <= {"integer", "real"} \
                    or present and output_type not in ("text", "null"):
                return None
            if present and extra:
                _json_object(extra, "extra")
            if not present:  # a row without its completion: None fields, no positions
                finish_reason = model = fingerprint = None
            per_key.append([status, error_kind, group, attempts, present, finish_reason, model,
                            fingerprint])
        key_of = np.asarray(key_codes, dtype=np.intp)
        table = np.empty((len(keys), 8), dtype=object)
        for code, values in enumerate(per_key):
            table[code] = values
        # the text fields of per_key, each coded by the rows' keys
        coded = {name: Coded(key_of, table[:, j].tolist()).normalized() for name, j in
                 (("status", 0), ("error_kind", 1), ("group", 2), ("finish_reason", 5),
                  ("model", 6), ("system_fingerprint", 7))}
        attempts = np.asarray(table[:, 3].tolist(), dtype=np.int64)[key_of]
        with_completion = np.asarray(table[:, 4].tolist(), dtype=bool)[key_of]
        # entry 0: no positions (a row without a completion); then each text that a row
        # with a completion has, parsed once (the others are not read, as in samples())
        text_of = np.asarray(text_codes, dtype=np.intp)
        used = np.zeros(len(texts), dtype=bool)
        used[text_of[with_completion]] = True
        entry_of = np.zeros(len(texts), dtype=np.intp)
        entry_of[used] = np.arange(1, int(used.sum()) + 1)
        entry_keys = [None] + [key for key, keep in zip(texts, used.tolist()) if keep]
        entries = _entries(entry_keys, texts_of)
    # KeyError: an id with no stored text; TypeError: an entry with keys _row never writes
    except (BadRow, TypeError, KeyError, OverflowError):
        return None
    codes = np.where(with_completion, entry_of[text_of], 0)
    output = Coded(output_codes, list(outputs))
    if not with_completion.all():  # a row without its completion has no output
        output = Coded(np.where(with_completion, output.codes, len(output.values)),
                       output.values + [None]).normalized()
    columns = SampleColumns(
        index=np.asarray(idx, dtype=np.int64), attempts=attempts,
        latency_s=np.asarray(latency_s, dtype=np.float64), has_completion=with_completion,
        output=output, positions=codes, distinct_positions=entries, **coded)
    return columns, entry_keys


def _entries(entry_keys: list, texts_of: Callable[[Iterable], dict]) -> list[list[Position]]:
    """Entry 0 (no positions), then each key's positions text parsed. KeyError: a key
    with no stored text; BadRow: a text that is not what ``_row`` writes."""
    text_of_key = texts_of(entry_keys[1:])
    return [[]] + [_positions(text_of_key[key]) for key in entry_keys[1:]]
