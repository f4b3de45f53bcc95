"""Format 2 (each distinct positions text once, raw bodies apart) against format 1 (one
wide row per sample): the same samples come back from both, a format-1 run is read and
resumed in its own format, and damage in format 2's own tables is refused by name."""

from __future__ import annotations

import json
import sqlite3

import pytest

from detaudit.store import DATABASE, FORMAT_VERSION, RunStore, StoreError
from tests.test_store import error_sample, ok_sample


def a_run() -> list:
    """Few distinct positions texts among many samples, errors, a completion without
    positions or raw body, groups."""
    samples = [ok_sample(i, text="Heads" if i % 3 else "Tails",
                         logprob_text=("-0.31326166", "-0.3132617", "-0.25")[i % 3],
                         group=str(i % 2)) for i in range(30)]
    samples[4] = error_sample(4)
    samples[9] = error_sample(9, "timeout")
    bare = ok_sample(12)
    bare.completion.positions = []
    bare.completion.raw = None
    samples[12] = bare
    return samples


def stored(tmp_path, version: int, samples, name: str | None = None) -> RunStore:
    name = name or f"v{version}"
    with RunStore.create(tmp_path, name, {"n": len(samples), "probe": {"name": "coin-flip"}},
                         format_version=version) as store:
        store.record_many(samples)
    return RunStore.open_read_only(tmp_path / name)


def rows(path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path / DATABASE)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_new_runs_are_format_2_and_both_formats_give_back_the_same_samples(tmp_path):
    assert FORMAT_VERSION == 2
    samples = a_run()
    with stored(tmp_path, 1, samples) as one, stored(tmp_path, 2, samples) as two:
        assert one.manifest["format_version"] == 1 and two.manifest["format_version"] == 2
        assert one.samples() == two.samples() == sorted(samples, key=lambda s: s.index)
        assert one.sample_columns() == two.sample_columns()


def test_format_2_stores_each_distinct_positions_text_once_and_raw_bodies_apart(tmp_path):
    samples = a_run()
    with stored(tmp_path, 2, samples) as store:
        path = store.path
    texts = rows(path, "SELECT text FROM positions_texts")
    # three logprob texts x two chosen tokens at most, and the empty list of the bare one
    assert len(texts) == len({t for (t,) in texts}) == 4
    assert rows(path, "SELECT COUNT(*) FROM samples WHERE positions_id IS NULL") == [(2,)]  # errors
    assert rows(path, "SELECT COUNT(*) FROM raw_bodies") == [(27,)]  # not the errors, not the bare one
    # the view shows format 1's columns, the same values as a format-1 file holds
    with stored(tmp_path, 1, samples) as one:
        inline = rows(one.path, "SELECT * FROM samples ORDER BY idx")
    assert rows(path, "SELECT * FROM sample_rows ORDER BY idx") == inline


def test_format_2_keeps_a_good_row_and_its_body_and_replaces_an_error_with_its_body(tmp_path):
    with RunStore.create(tmp_path, "run", {"n": 3}) as store:
        store.record(ok_sample(0, text="Heads"))
        store.record(ok_sample(0, text="Tails"))     # a good row is never overwritten
        store.record(error_sample(0))
        store.record(error_sample(1))
        replacement = ok_sample(1, text="Tails")
        replacement.completion.raw = '{"id":"second"}'
        store.record(replacement)                    # the error is replaced, body and all
        samples = store.samples()
    assert [s.completion.text for s in samples] == ["Heads", "Tails"]
    assert rows(tmp_path / "run", "SELECT idx, raw FROM raw_bodies ORDER BY idx") == [
        (0, '{"id":"x"}'), (1, '{"id":"second"}')]


def test_a_format_1_run_is_resumed_in_format_1(tmp_path):
    samples = a_run()
    with RunStore.create(tmp_path, "old", {"n": 40}, format_version=1) as store:
        store.record_many(samples[:20])
    with RunStore.open(tmp_path / "old", lock=True) as store:
        assert store.manifest["format_version"] == 1
        store.record_many(samples[20:])
        again = store.samples()
    assert again == sorted(samples, key=lambda s: s.index)
    tables = {t for (t,) in rows(tmp_path / "old", "SELECT name FROM sqlite_master")}
    assert "positions_texts" not in tables and "raw_bodies" not in tables
    inline = rows(tmp_path / "old", "SELECT positions FROM samples WHERE idx = 25")[0][0]
    assert json.loads(inline)[0]["token"] == samples[25].completion.positions[0].token


def test_a_positions_id_that_names_no_text_is_refused_by_both_readers(tmp_path):
    with stored(tmp_path, 2, a_run()) as store:
        path = store.path
    conn = sqlite3.connect(path / DATABASE)
    conn.execute("UPDATE samples SET positions_id = 999 WHERE idx = 7")
    conn.commit()
    conn.close()
    with RunStore.open_read_only(path) as store:
        with pytest.raises(StoreError) as by_rows:
            store.samples()
        with pytest.raises(StoreError) as by_columns:
            store.sample_columns()
    assert str(by_rows.value) == str(by_columns.value)
    assert "sample 7" in str(by_rows.value) and "names no stored positions text" in str(by_rows.value)


@pytest.mark.parametrize("table", ["positions_texts", "raw_bodies"])
def test_a_format_2_file_without_one_of_its_tables_is_refused(tmp_path, table):
    with stored(tmp_path, 2, a_run()) as store:
        path = store.path
    conn = sqlite3.connect(path / DATABASE)
    conn.execute("DROP VIEW sample_rows")
    conn.execute(f"DROP TABLE {table}")
    conn.commit()
    conn.close()
    for opening in (RunStore.open_read_only, RunStore.open):
        with pytest.raises(StoreError, match=f"the {table} table is missing; format 2"):
            opening(path)
