"""The column cache of a format-2 run (``detaudit.store_columns``): a complete run keeps
its sample columns as arrays, a reader gets the same columns as from the rows, any
change to the rows empties it in the same transaction, and a cache that cannot be
trusted is never used."""

from __future__ import annotations

import hashlib
import sqlite3

from detaudit import store_columns
from detaudit.records import CODED_COLUMNS, Coded, SampleColumns
from detaudit.store import DATABASE, RunStore
from tests import store_damage
from tests.test_store import ok_sample
from tests.test_store_formats import a_run


OUTPUT = [n for n in SampleColumns.__dataclass_fields__ if n != "positions"].index("output")


def complete_run(tmp_path, samples=None, name: str = "run"):
    samples = a_run() if samples is None else samples
    with RunStore.create(tmp_path, name, {"n": len(samples), "probe": {"name": "coin-flip"}}) as store:
        store.record_many(samples)
        store.update_manifest(status="complete")
    return tmp_path / name


def cache_rows(run) -> int:
    conn = sqlite3.connect(run / DATABASE)
    try:
        return conn.execute("SELECT count(*) FROM column_cache").fetchone()[0]
    finally:
        conn.close()


def sql(run, *statements: str) -> None:
    conn = sqlite3.connect(run / DATABASE)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def per_sample(columns: SampleColumns) -> list[tuple]:
    """Each sample's fields, its positions entry resolved (entries may be shared)."""
    fields = [name for name in SampleColumns.__dataclass_fields__
              if name not in ("positions", "distinct_positions")]
    values = [list(getattr(columns, name)) for name in fields]
    entries = [list(columns.distinct_positions[e]) for e in list(columns.positions)]
    return list(zip(*values, entries))


def read(run) -> tuple[list, list, bool]:
    """(sample_columns per sample, the same from samples(), whether a current cache was
    there), and the columns' text columns numbered as ``Coded.of`` numbers them."""
    with RunStore.open_read_only(run) as store:
        cached = store_columns.load(store._conn) is not None
        columns = store.sample_columns()
        for name in CODED_COLUMNS:
            coded = getattr(columns, name)
            again = Coded.of(coded.tolist())
            assert coded.values == again.values and coded.codes.tolist() == again.codes.tolist()
        return (per_sample(columns), per_sample(SampleColumns.from_samples(store.samples())),
                cached)


def test_a_complete_run_keeps_its_columns_and_a_reader_gets_them_back_equal(tmp_path):
    run = complete_run(tmp_path)
    assert cache_rows(run) > 0
    columns, from_samples, cached = read(run)
    assert cached and columns == from_samples
    with RunStore.open_read_only(run) as store:
        stored = store.sample_columns()
    assert len(stored.distinct_positions) == 5  # none, three texts, the empty list
    assert stored.output.values == ["Tails", "Heads", None]


def test_without_its_triggers_the_cache_would_go_stale_so_a_reader_uses_it(tmp_path):
    # what the triggers prevent, shown by removing them: the reader takes the cache
    run = complete_run(tmp_path)
    sql(run, *(f"DROP TRIGGER samples_{event}_drops_column_cache"
               for event in ("insert", "update", "delete")),
        "UPDATE samples SET output = 'Edge' WHERE idx = 1")
    columns, from_samples, cached = read(run)
    assert cached and columns[1][OUTPUT] == "Heads" and from_samples[1][OUTPUT] == "Edge"


def test_any_change_to_the_rows_empties_the_cache_in_its_transaction(tmp_path):
    run = complete_run(tmp_path)
    store_damage.set_field(run, (1,), "output", "Edge")  # an update
    assert cache_rows(run) == 0
    columns, from_samples, cached = read(run)
    assert not cached and columns == from_samples and columns[1][OUTPUT] == "Edge"

    with RunStore.open(run, lock=True) as store:  # a resume: one more sample, an insert
        assert cache_rows(run) == 0  # the read above was read-only: it wrote no cache
        store.record(ok_sample(30, text="Late"))
    assert cache_rows(run) > 0  # rebuilt at close: the run is complete
    columns, from_samples, cached = read(run)
    assert cached and len(columns) == 31 and columns[30][OUTPUT] == "Late" and columns == from_samples

    sql(run, "DELETE FROM samples WHERE idx = 30")
    assert cache_rows(run) == 0
    columns, from_samples, cached = read(run)
    assert not cached and len(columns) == 30 and columns == from_samples


def test_a_cache_that_cannot_be_trusted_is_never_used(tmp_path):
    samples = a_run()
    damages = {
        "a blob that is no zlib": "UPDATE column_cache SET data = x'00' WHERE name = 'output'",
        "another version": "UPDATE column_cache SET data = CAST(json_set(CAST(data AS TEXT), "
                           "'$.version', 99) AS BLOB) WHERE name = 'meta'",
        "codes past the values": "UPDATE column_cache SET data = CAST(json_set(CAST(data AS TEXT), "
                                 "'$.values.output', json('[\"Heads\"]')) AS BLOB) WHERE name = 'meta'",
        "no meta": "DELETE FROM column_cache WHERE name = 'meta'",
        "another row count": "DELETE FROM samples WHERE idx = 29",  # triggers dropped first
    }
    for n, (what, damage) in enumerate(damages.items()):
        run = complete_run(tmp_path, samples, name=f"run{n}")
        sql(run, *(f"DROP TRIGGER samples_{event}_drops_column_cache"
                   for event in ("insert", "update", "delete")), damage)
        columns, from_samples, cached = read(run)
        assert not cached, what
        assert columns == from_samples, what


def test_a_reader_never_writes_the_cache(tmp_path):
    with RunStore.create(tmp_path, "run", {"n": 30, "probe": {"name": "coin-flip"}}) as store:
        store.record_many(a_run())  # not complete: no cache at close
    run = tmp_path / "run"
    before = hashlib.sha256((run / DATABASE).read_bytes()).hexdigest()
    files = sorted(p.name for p in run.iterdir())
    columns, from_samples, cached = read(run)
    assert hashlib.sha256((run / DATABASE).read_bytes()).hexdigest() == before
    assert sorted(p.name for p in run.iterdir()) == files
    assert not cached and columns == from_samples and cache_rows(run) == 0


def test_a_format_2_run_stored_before_the_cache_is_read_and_gets_one_when_written(tmp_path):
    run = complete_run(tmp_path)
    sql(run, *(f"DROP TRIGGER samples_{event}_drops_column_cache"
               for event in ("insert", "update", "delete")), "DROP TABLE column_cache")
    columns, from_samples, cached = read(run)
    assert not cached and columns == from_samples
    with RunStore.open(run, lock=True):
        pass  # opened for writing: the table and its triggers are added, the cache built at close
    assert cache_rows(run) > 0
    store_damage.set_field(run, (3,), "output", "Edge")
    assert cache_rows(run) == 0  # the triggers came with it
