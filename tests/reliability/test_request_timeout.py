"""--request-timeout is an overall deadline per attempt (connect, send, every read),
not httpx's per-read timeout: a server that sends one byte every 0.2 s (each read
gets a byte in time; the whole answer would take minutes) is cut off at the deadline,
and the attempt counts as a timeout, retried like any other. Through the real CLI
against the fake server on 127.0.0.1."""

from __future__ import annotations

import json
import time

import pytest

from tests.reliability.helpers import MODEL, cli, manifest, only_run, remote, rows
from tests.servers.fake_openai import Fault

DRIBBLE_S = 0.2  # between bytes: far below the 1 s deadline, so only an overall one cuts it


def dribbling(**where) -> Fault:
    return Fault("dribble", delay=DRIBBLE_S, **where)


def test_a_dribbling_server_is_cut_off_at_the_deadline(fake_openai, tmp_path):
    fake_openai.configure(faults=[dribbling(rate=1.0)])
    started = time.monotonic()
    result = remote(fake_openai, tmp_path, "--n", "1", "--max-attempts", "2",
                    "--request-timeout", "1")
    elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.stderr  # the one sample failed
    whole = int(fake_openai.sent[0]["body"].strip("<> bytes").replace(",", ""))
    assert whole * DRIBBLE_S > 60  # the full answer would have taken minutes
    assert elapsed < 8  # two 1 s attempts, a backoff, the CLI itself
    run_dir = only_run(tmp_path)
    attempts = rows(run_dir, "SELECT attempt, error_kind, error_message FROM failed_attempts")
    assert [(a, k) for a, k, _ in attempts] == [(1, "timeout"), (2, "timeout")]
    assert all("within 1 s" in m and "--request-timeout" in m for *_, m in attempts)
    assert rows(run_dir, "SELECT status, error_kind, attempts FROM samples") == [("error", "timeout", 2)]
    assert "Traceback" not in result.stderr


def test_a_timed_out_attempt_is_retried_and_the_next_one_succeeds(fake_openai, tmp_path):
    fake_openai.configure(faults=[dribbling(on={0})])
    result = remote(fake_openai, tmp_path, "--n", "2", "--concurrency", "1",
                    "--request-timeout", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert (json.loads(result.stdout)["ok"], json.loads(result.stdout)["errors"]) == (2, 0)
    run_dir = only_run(tmp_path)
    assert rows(run_dir, "SELECT idx, attempts FROM samples ORDER BY idx") == [(0, 2), (1, 1)]
    assert rows(run_dir, "SELECT error_kind FROM failed_attempts") == [("timeout",)]


def test_the_timeout_is_stored_and_used_on_resume(fake_openai, tmp_path):
    fake_openai.configure(faults=[dribbling(rate=1.0)])
    first = remote(fake_openai, tmp_path, "--n", "1", "--max-attempts", "1", "--request-timeout", "1")
    assert first.exit_code == 1
    run_dir = only_run(tmp_path)
    assert manifest(run_dir)["limits"]["request_timeout_s"] == 1.0
    assert "--request-timeout" in manifest(run_dir)["command"]

    # Without the flag the resumed run keeps 1 s (the default would hang for 60 s).
    started = time.monotonic()
    again = cli("run", "--resume", run_dir, "--max-attempts", "1", "--quiet")
    assert again.exit_code == 1 and time.monotonic() - started < 6
    messages = rows(run_dir, "SELECT error_message FROM failed_attempts ORDER BY rowid")
    assert len(messages) == 2 and "within 1 s" in messages[1][0]

    # A flag on resume wins, is used and stored.
    fake_openai.configure(faults=[dribbling(on={0})])
    last = cli("run", "--resume", run_dir, "--request-timeout", "1.5", "--quiet", "--json")
    assert last.exit_code == 0, last.stderr
    assert manifest(run_dir)["limits"]["request_timeout_s"] == 1.5
    assert "within 1.5 s" in rows(run_dir, "SELECT error_message FROM failed_attempts "
                                           "ORDER BY rowid DESC LIMIT 1")[0][0]


def test_the_default_is_60_seconds(fake_openai, tmp_path):
    result = remote(fake_openai, tmp_path, "--n", "1")
    assert result.exit_code == 0, result.stderr
    assert manifest(only_run(tmp_path))["limits"]["request_timeout_s"] == 60.0


def test_gate_takes_the_flag_and_stores_it(fake_openai, tmp_path):
    fake_openai.configure(faults=[dribbling(rate=1.0)])
    started = time.monotonic()
    result = cli("gate", "--base-url", fake_openai.url, "--model", MODEL, "--out", tmp_path,
                 "--max-attempts", "1", "--request-timeout", "1", "--json")
    assert time.monotonic() - started < 30  # 20 samples, 4 at a time, 1 s each
    assert result.exit_code == 1, result.stderr  # every request timed out: the run failed
    run_dir = only_run(tmp_path)
    assert manifest(run_dir)["limits"]["request_timeout_s"] == 1.0
    assert {k for (k,) in rows(run_dir, "SELECT error_kind FROM failed_attempts")} == {"timeout"}


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
@pytest.mark.parametrize("command", ["run", "gate"])
def test_a_bad_timeout_is_a_usage_error(fake_openai, tmp_path, command, value):
    result = cli(command, "--model", MODEL, "--base-url", fake_openai.url, "--out", tmp_path,
                 "--request-timeout", value)
    assert result.exit_code == 2, result.stderr
    assert "--request-timeout" in result.stderr and "Traceback" not in result.stderr
    assert not fake_openai.received
