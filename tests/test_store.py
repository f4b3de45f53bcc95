"""The run folder: manifest + SQLite, reopened exactly, never duplicating an index."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone

import pytest

from detaudit.records import Completion, Position, Sample, TokenLogprob
from detaudit.runlock import LOCK_FILE
from detaudit.store import DATABASE, FORMAT_VERSION, MANIFEST, RunStore, StoreError, new_run_id


def ok_sample(index: int, text: str = "Heads", logprob_text: str = "-0.31326166",
              group: str | None = None) -> Sample:
    top = [TokenLogprob("Heads", float(logprob_text), logprob_text, [72, 101]),
           TokenLogprob("T", -1.3132617, "-1.3132617e0", None)]
    position = Position(text, float(logprob_text), logprob_text, top, [72])
    completion = Completion(text=text, finish_reason="stop", positions=[position],
                            model="gpt-4o-mini", system_fingerprint="fp_a",
                            extra={"batch_size": 8, "batch_position": 3}, raw='{"id":"x"}')
    return Sample(index, "ok", completion, attempts=2, started_at=1700000000.25,
                  latency_s=0.125, group=group)


def error_sample(index: int, kind: str = "rate_limit") -> Sample:
    return Sample(index, "error", None, attempts=5, started_at=1700000001.5, latency_s=0.5,
                  error_kind=kind, error_message="HTTP 429 from http://127.0.0.1/v1")


@pytest.fixture
def store(tmp_path):
    s = RunStore.create(tmp_path, "run-1", {"n": 10, "status": "running"})
    yield s
    s.close()


def test_create_then_reopen_gives_back_every_field(tmp_path):
    with RunStore.create(tmp_path, "run-1", {"n": 3, "probe": {"name": "coin-flip"}}) as s:
        s.record(ok_sample(2, group="8"))
        s.record(error_sample(0))
    with RunStore.open(tmp_path / "run-1") as s:
        assert s.manifest["format_version"] == FORMAT_VERSION
        assert s.manifest["run_id"] == "run-1"
        assert s.manifest["probe"] == {"name": "coin-flip"}
        samples = s.samples()
    assert [x.index for x in samples] == [0, 2]
    assert samples[0] == error_sample(0)
    assert samples[1] == ok_sample(2, group="8")  # dataclass equality: every field, nested


def test_samples_come_back_ordered_by_index(store):
    for i in (5, 1, 9, 0, 3):
        store.record(ok_sample(i))
    assert [s.index for s in store.samples()] == [0, 1, 3, 5, 9]


def test_an_index_is_never_stored_twice_and_a_good_row_is_never_overwritten(store):
    store.record(ok_sample(4, text="Heads"))
    store.record(ok_sample(4, text="Tails"))
    store.record(error_sample(4))
    (only,) = store.samples()
    assert only.status == "ok" and only.completion.text == "Heads"
    rows = sqlite3.connect(store.path / DATABASE).execute("SELECT COUNT(*) FROM samples").fetchone()
    assert rows == (1,)


def test_an_error_row_is_replaced_when_the_index_is_retried(store):
    store.record(error_sample(7))
    assert store.missing_indices(10) == list(range(10))  # errors are sent again on resume
    store.record(ok_sample(7))
    assert [s.status for s in store.samples()] == ["ok"]
    assert 7 not in store.missing_indices(10)


def test_missing_and_done_indices(store):
    store.record_many([ok_sample(i) for i in (0, 2, 3)] + [error_sample(5)])
    assert store.done_indices() == {0, 2, 3}
    assert store.missing_indices(7) == [1, 4, 5, 6]
    assert store.count() == 4


def test_failed_attempts_are_an_append_only_log(store):
    store.record_failed_attempt(3, 1, "rate_limit", "slow down", retry_after=0.5)
    store.record_failed_attempt(3, 2, "server_error", "HTTP 500", None)
    store.record(ok_sample(3))
    log = store.failed_attempts()
    assert [(e["index"], e["attempt"], e["error_kind"], e["retry_after"]) for e in log] == \
        [(3, 1, "rate_limit", 0.5), (3, 2, "server_error", None)]


def test_a_failed_attempt_keeps_its_body_redacted(store):
    from detaudit.redact import register

    register("Zk3yFORthe5tore0f1ailedA77empts")
    store.record_failed_attempt(1, 1, "bad_response", "cut off: Zk3yFORthe5tore0f1ailedA77empts",
                                raw='{"choices": [{"mess Bearer Zk3yFORthe5tore0f1ailedA77empts')
    store.record(error_sample(1, "bad_response"))
    [entry] = store.failed_attempts()
    assert entry["error_message"] == "cut off: ***"
    assert entry["raw"] == '{"choices": [{"mess Bearer ***'


def test_a_store_from_before_failed_attempt_bodies_is_upgraded_in_place(tmp_path):
    store = RunStore.create(tmp_path, "old", {"n": 2, "status": "running"})
    store.close()
    db = tmp_path / "old" / DATABASE
    with sqlite3.connect(db) as conn:  # the table as detaudit wrote it before `raw`
        conn.execute("DROP TABLE failed_attempts")
        conn.execute("CREATE TABLE failed_attempts (idx INTEGER NOT NULL, attempt INTEGER NOT "
                     "NULL, at REAL NOT NULL, error_kind TEXT NOT NULL, error_message TEXT, "
                     "retry_after REAL)")
        conn.execute("INSERT INTO failed_attempts VALUES (0, 1, 1.0, 'timeout', 'old', NULL)")
    with RunStore.open(tmp_path / "old") as reopened:
        reopened.record_failed_attempt(0, 2, "bad_response", "new", raw="<html>")
        reopened.record(error_sample(0))
        assert [(e["error_message"], e["raw"]) for e in reopened.failed_attempts()] == \
            [("old", None), ("new", "<html>")]


def test_database_is_in_wal_mode_and_each_sample_is_visible_at_once(store):
    conn = sqlite3.connect(store.path / DATABASE)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    store.record(ok_sample(1))
    # another reader sees it without close(): it was committed when recorded
    assert conn.execute("SELECT idx FROM samples").fetchall() == [(1,)]


def test_a_killed_process_keeps_every_sample_it_recorded(tmp_path):
    script = textwrap.dedent(f"""
        import os
        from detaudit.store import RunStore
        from detaudit.records import Sample
        s = RunStore.create({str(tmp_path)!r}, "killed", {{"n": 50}})
        for i in range(50):
            s.record(Sample(i, "ok", None, 1, 0.0, 0.0))
        os._exit(9)  # no close(), no flush: like SIGKILL
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    with RunStore.open(tmp_path / "killed") as s:
        assert s.missing_indices(50) == []


def test_update_manifest_replaces_the_file(store):
    store.update_manifest(status="complete", ended_at="2025-01-01T00:00:00+00:00")
    on_disk = json.loads((store.path / MANIFEST).read_text())
    assert on_disk["status"] == "complete" and on_disk["n"] == 10


@pytest.mark.parametrize("bad", [{"x": object()}, {"x": math.nan}])
def test_a_failed_manifest_write_leaves_the_old_manifest_whole(store, bad):
    before = (store.path / MANIFEST).read_bytes()
    with pytest.raises((TypeError, ValueError)):
        store.update_manifest(**bad)
    assert (store.path / MANIFEST).read_bytes() == before
    assert "x" not in store.manifest
    assert sorted(p.name for p in store.path.iterdir()
                  if not p.name.startswith(DATABASE) and p.name != LOCK_FILE) == [MANIFEST]


def test_create_refuses_an_existing_run_folder(tmp_path, store):
    with pytest.raises(StoreError, match="already exists"):
        RunStore.create(tmp_path, "run-1", {})


def test_open_names_the_folder_when_it_is_not_a_run(tmp_path):
    with pytest.raises(StoreError, match=r"no such run folder"):
        RunStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match=r"empty: not a detaudit run folder \(no manifest.json\)"):
        RunStore.open(tmp_path / "empty")


def test_open_rejects_a_newer_format_naming_both_versions(tmp_path, store):
    store.update_manifest(format_version=FORMAT_VERSION + 1)
    with pytest.raises(StoreError) as err:
        RunStore.open(store.path)
    message = str(err.value)
    assert str(store.path) in message
    assert f"version {FORMAT_VERSION + 1}" in message and "newer detaudit" in message
    assert "reads version(s) 1, 2" in message


@pytest.mark.parametrize("version", [0, "1", None])
def test_open_rejects_an_unsupported_or_missing_version(store, version):
    store.update_manifest(format_version=version)
    with pytest.raises(StoreError, match="format"):
        RunStore.open(store.path)


def test_open_rejects_a_corrupt_manifest(store):
    (store.path / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match="unreadable manifest"):
        RunStore.open(store.path)


def test_run_ids_are_unique_sortable_and_readable():
    t0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
    ids = [new_run_id("coin-flip", "gpt-4o", t0 + timedelta(microseconds=k)) for k in (0, 1, 2)]
    assert len(set(ids)) == 3 and ids == sorted(ids)
    assert ids[0] == "20250301T120000000000Z-coin-flip-gpt-4o"
    later = new_run_id("coin-flip", "gpt-4o", t0 + timedelta(days=1))
    assert later > ids[-1]
    # a local model folder becomes its name; odd characters never reach the path
    assert new_run_id("p", "/models/Qwen2.5 7B/", t0).endswith("-p-qwen2.5-7b")
    assert "/" not in new_run_id("my probe", "org/model:latest", t0)


def test_lazy_missing_indices_and_the_affordable_prefix_on_a_resume(tmp_path):
    """The budget walks stored good indices, not a list of range(n): check it against
    the plain list of missing indices, errors (retried on resume) included."""
    from detaudit.budget import RequestPlan, Segment, affordable_prefix
    from detaudit.cost import CostPlan, Price

    with RunStore.create(tmp_path, "run-1", {"n": 12}) as s:
        s.record_many([ok_sample(i) for i in (0, 2, 3, 7, 11)] + [error_sample(5)])
        missing = [i for i in range(12) if i not in {0, 2, 3, 7, 11}]
        assert list(s.iter_missing(12)) == missing == s.missing_indices(12)
        assert s.count_done(2, 8) == 3 and list(s.done_in(1, 8)) == [2, 3, 7]
        plan = RequestPlan([Segment(0, 12, 12 - s.count_done(0, 12), 0)])
        cost = CostPlan("m", plan.targets, 10, 0, "t", False, Price(1e5, 0.0, "test"))  # 1 USD each
        for budget in range(0, len(missing) + 2):
            end, session = affordable_prefix(plan, cost, budget + 0.5, s)
            sent = [i for i in range(end) if i in missing]
            assert sent == missing[:budget] and session.targets == len(sent)
