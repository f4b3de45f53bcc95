"""A store is never misread or rewritten: report, export, plot and compare leave every
file of a run folder as it was (bytes and mtimes), and a store they would misread (an
empty or foreign database, a manifest of the wrong types, a row that is not JSON) stops
them with exit 2, the path and what is wrong. Through the real CLI, on runs made
against the fake server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.helpers import cli, manifest, only_run, remote, rows
from tests import store_damage

READERS = {
    "report": lambda run, tmp: ["report", run],
    "report-json": lambda run, tmp: ["report", run, "--json"],
    "export": lambda run, tmp: ["export", run, "--clusters", tmp / "c.csv", "--samples", tmp / "s.csv"],
    "plot": lambda run, tmp: ["plot", run, "-o", tmp / "p.png"],
    "compare": lambda run, tmp: ["compare", run, run, "--json"],
}


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file of the folder: mtime (ns) and a hash of its bytes."""
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir())}


def usage_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


@pytest.fixture
def run_dir(fake_openai, tmp_path) -> Path:
    result = remote(fake_openai, tmp_path / "runs", "--n", "6")
    assert result.exit_code == 0, result.stderr
    return only_run(tmp_path / "runs")


@pytest.mark.parametrize("reader", READERS, ids=list(READERS))
def test_readers_create_and_change_no_file(run_dir, tmp_path, reader):
    before = snapshot(run_dir)
    assert sorted(before) == ["manifest.json", "run.lock", "samples.sqlite"]  # closed cleanly: no WAL
    result = cli(*READERS[reader](run_dir, tmp_path))
    assert result.exit_code == 0, result.stderr
    assert snapshot(run_dir) == before


def test_a_run_being_written_is_read_with_its_wal_and_left_alone(run_dir, tmp_path):
    # A writer holds the database open with a commit only in the WAL (a run in progress).
    writer = sqlite3.connect(run_dir / "samples.sqlite")
    try:
        writer.execute("INSERT INTO samples (idx, status, attempts, started_at, latency_s, "
                       "error_kind, has_completion) VALUES (6, 'error', 1, 0, 0, 'timeout', 0)")
        writer.commit()
        assert (run_dir / "samples.sqlite-wal").stat().st_size > 0
        before = snapshot(run_dir)
        result = cli("report", run_dir, "--json")
        assert result.exit_code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert (summary["n"], summary["errors"], summary["errors_by_kind"]) == (7, 1, {"timeout": 1})
        assert snapshot(run_dir) == before
    finally:
        writer.close()


def test_a_killed_run_with_its_wal_and_shm_left_behind_is_read_and_left_alone(run_dir):
    # The process that committed dies without closing: -wal and -shm stay on disk.
    code = ("import os, sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1])\n"
            "c.execute(\"UPDATE samples SET status = 'error', error_kind = 'timeout' WHERE idx = 0\")\n"
            "c.commit()\n"
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(run_dir / "samples.sqlite")], check=True)
    before = snapshot(run_dir)
    assert {"samples.sqlite-wal", "samples.sqlite-shm"} <= set(before)
    result = cli("report", run_dir, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["errors_by_kind"] == {"timeout": 1}  # the WAL was read
    assert snapshot(run_dir) == before


def test_a_zero_byte_database_is_refused_and_stays_zero_bytes(run_dir, tmp_path):
    (run_dir / "samples.sqlite").write_bytes(b"")
    before = snapshot(run_dir)
    for reader in READERS:
        usage_error(cli(*READERS[reader](run_dir, tmp_path)),
                    str(run_dir / "samples.sqlite"), "empty (0 bytes)")
    usage_error(cli("run", "--resume", run_dir), "samples.sqlite", "empty (0 bytes)")
    assert snapshot(run_dir) == before
    assert not (tmp_path / "c.csv").exists() and not (tmp_path / "p.png").exists()


def test_a_database_without_its_samples_table_is_refused(run_dir, tmp_path):
    conn = sqlite3.connect(run_dir / "samples.sqlite")
    conn.execute("DROP TABLE samples")
    conn.commit()
    conn.close()
    before = snapshot(run_dir)
    for reader in READERS:
        usage_error(cli(*READERS[reader](run_dir, tmp_path)), str(run_dir / "samples.sqlite"),
                    "no samples table")
    usage_error(cli("run", "--resume", run_dir), "no samples table")
    assert snapshot(run_dir) == before
    tables = rows(run_dir, "SELECT name FROM sqlite_master WHERE type = 'table'")
    assert ("samples",) not in tables  # resume did not make a new, empty samples table


@pytest.mark.parametrize("field, value, needle", [
    ("n", "6", "n is a string"),
    ("probe", ["coin-flip"], "probe is a list"),
    ("n", 0, "n is 0"),
    ("tracked", [{"label": "Heads", "token": "Heads", "position": "first"}], "tracked[0].position"),
    ("backend", "openai", "backend is a string"),
    ("run_id", None, "run_id is null"),
])
def test_a_manifest_of_the_wrong_types_is_refused(run_dir, tmp_path, field, value, needle):
    data = manifest(run_dir)
    data[field] = value
    (run_dir / "manifest.json").write_text(json.dumps(data))
    before = snapshot(run_dir)
    for reader in ("report", "export", "compare"):
        usage_error(cli(*READERS[reader](run_dir, tmp_path)), str(run_dir / "manifest.json"), needle)
    usage_error(cli("run", "--resume", run_dir), needle)
    assert snapshot(run_dir) == before


def test_a_manifest_without_its_probe_is_refused(run_dir, tmp_path):
    data = manifest(run_dir)
    del data["probe"]
    (run_dir / "manifest.json").write_text(json.dumps(data))
    usage_error(cli("report", run_dir), "manifest.json", "probe is missing")


@pytest.mark.parametrize("column, value, needle", [
    ("positions", "{not json", "positions is not JSON"),
    ("positions", '{"token": "Heads"}', "positions is an object, not a list"),
    ("positions", '[{"token": "Heads", "logprob": "-0.3", "logprob_text": "-0.3"}]',
     "positions[0].logprob is '-0.3', not a number"),
    ("extra", "[1, 2", "extra is not JSON"),
    ("latency_s", "soon", "latency_s is 'soon'"),
])
def test_a_row_that_is_not_what_detaudit_writes_is_refused(run_dir, tmp_path, column, value, needle):
    store_damage.set_field(run_dir, (2,), column, value)
    before = snapshot(run_dir)
    for reader in READERS:
        usage_error(cli(*READERS[reader](run_dir, tmp_path)), str(run_dir / "samples.sqlite"),
                    "sample 2", needle)
    assert snapshot(run_dir) == before


def test_compare_refuses_runs_of_different_probes(fake_openai, tmp_path):
    out = tmp_path / "runs"
    assert remote(fake_openai, out, "--n", "6").exit_code == 0
    coin = only_run(out)
    other = tmp_path / "other"
    assert remote(fake_openai, other, "--n", "6", "--probe", "top-logprobs").exit_code == 0
    usage_error(cli("compare", coin, only_run(other)), str(coin), "cannot be compared",
                "different probes", "coin-flip", "top-logprobs")
    prompt = tmp_path / "prompt"
    assert remote(fake_openai, prompt, "--n", "6", "--prompt", "Toss a coin.").exit_code == 0
    usage_error(cli("compare", coin, only_run(prompt), "--json"), "different requests",
                "messages differ")


def test_compare_refuses_a_label_tracked_by_other_tokens(fake_openai, tmp_path):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert remote(fake_openai, out_a, "--n", "6").exit_code == 0
    assert remote(fake_openai, out_b, "--n", "6").exit_code == 0
    run_a, run_b = only_run(out_a), only_run(out_b)
    assert cli("compare", run_a, run_b).exit_code == 0  # the control: same probe, same tokens
    data = manifest(run_b)
    assert data["tracked"][1] == {"label": "Tails", "token": "T", "position": 0}
    data["tracked"][1]["token"] = "Tails"  # as another tokenizer would resolve it
    (run_b / "manifest.json").write_text(json.dumps(data))
    usage_error(cli("compare", run_a, run_b), "cannot be compared", "'Tails'", "different tokens")
