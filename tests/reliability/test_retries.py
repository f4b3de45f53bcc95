"""Retries, error accounting and --max-errors, through the real CLI against the fake
OpenAI server on 127.0.0.1 (failures injected by request number, so counts are exact)."""

from __future__ import annotations

import asyncio
import json

import pytest

from detaudit.backends.openai_backend import OpenAIBackend
from detaudit.probes import load_probe
from detaudit.runner import run as run_probe
from detaudit.store import RunStore
from tests.reliability.helpers import cli, manifest, only_run, remote, rows
from tests.servers.fake_openai import Fault

# Backoff from the server's hints stays short; these keep the tests fast.
FAST_RETRY = {"Retry-After": "0"}


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_retryable_statuses_are_retried_and_the_attempts_stored(fake_openai, tmp_path, status):
    # Request numbers 1 and 2 fail: with one worker both belong to sample 1.
    fake_openai.configure(faults=[Fault("status", status=status, headers=FAST_RETRY, on={1, 2})])
    result = remote(fake_openai, tmp_path, "--n", "4", "--concurrency", "1", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["ok"], summary["errors"]) == (4, 0)
    assert len(fake_openai.received) == 6
    run_dir = only_run(tmp_path)
    assert rows(run_dir, "SELECT idx, attempts FROM samples ORDER BY idx") == [(0, 1), (1, 3), (2, 1), (3, 1)]
    logged = rows(run_dir, "SELECT idx, attempt FROM failed_attempts ORDER BY rowid")
    assert logged == [(1, 1), (1, 2)]


def test_retry_after_ms_is_honoured_before_retry_after(fake_openai, tmp_path):
    # retry-after-ms says 300 ms, Retry-After says 30 s: the ms header wins.
    fake_openai.configure(faults=[Fault("status", status=429, on={0},
                                        headers={"retry-after-ms": "300", "Retry-After": "30"})])
    result = remote(fake_openai, tmp_path, "--n", "1", "--json")
    assert result.exit_code == 0, result.stderr
    first, second = fake_openai.received
    assert 0.28 <= second["at"] - first["at"] < 5
    assert rows(only_run(tmp_path), "SELECT retry_after FROM failed_attempts") == [(0.3,)]


def test_retry_after_in_seconds_is_waited_for(fake_openai, tmp_path):
    fake_openai.configure(faults=[Fault("status", status=503, on={0}, headers={"Retry-After": "1"})])
    result = remote(fake_openai, tmp_path, "--n", "1", "--json")
    assert result.exit_code == 0, result.stderr
    first, second = fake_openai.received
    assert second["at"] - first["at"] >= 0.98


def test_dropped_connections_and_html_502_pages_are_retried(fake_openai, tmp_path):
    fake_openai.configure(faults=[Fault("drop", on={0}),
                                  Fault("html", status=502, on={1}, headers=FAST_RETRY)])
    result = remote(fake_openai, tmp_path, "--n", "3", "--concurrency", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["ok"] == 3
    kinds = rows(only_run(tmp_path), "SELECT error_kind FROM failed_attempts ORDER BY rowid")
    assert kinds == [("connection",), ("server_error",)]


def test_timeouts_are_retried(fake_openai, tmp_path):
    """The backend's timeout is not a CLI flag; the runner and backend are driven directly."""
    fake_openai.configure(faults=[Fault("slow", delay=2.0, on={0})])
    probe = load_probe("coin-flip")
    store = RunStore.create(tmp_path, "timeouts", {"n": 2, "probe": probe.to_dict()})

    async def session():
        backend = OpenAIBackend("gpt-4o-mini", fake_openai.url, timeout=0.5)
        try:
            return await run_probe(probe, backend, store, 2, 1, backoff_base_s=0.01)
        finally:
            await backend.aclose()

    result = asyncio.run(session())
    assert (result.ok, result.errors) == (2, 0)
    assert [(s.index, s.attempts) for s in store.samples()] == [(0, 2), (1, 1)]
    assert [a["error_kind"] for a in store.failed_attempts()] == ["timeout"]
    store.close()


def test_after_the_last_attempt_the_sample_is_an_error_of_its_kind(fake_openai, tmp_path):
    fake_openai.configure(faults=[
        Fault("status", status=503, headers=FAST_RETRY, on={0, 1, 2}),
        Fault("drop", on={4, 5, 6}),
        Fault("status", status=400, on={7}),  # not retried: the server refused the request
    ])
    result = remote(fake_openai, tmp_path, "--n", "6", "--concurrency", "1",
                    "--max-attempts", "3", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["n"], summary["ok"], summary["errors"]) == (6, 3, 3)
    assert summary["errors_by_kind"] == {"server_error": 1, "connection": 1, "bad_request": 1}
    stored = rows(only_run(tmp_path), "SELECT idx, status, attempts, error_kind FROM samples ORDER BY idx")
    assert stored == [(0, "error", 3, "server_error"), (1, "ok", 1, None),
                      (2, "error", 3, "connection"), (3, "error", 1, "bad_request"),
                      (4, "ok", 1, None), (5, "ok", 1, None)]


def test_the_report_counts_errors_by_kind(fake_openai, tmp_path):
    fake_openai.configure(faults=[Fault("status", status=500, headers=FAST_RETRY, on={0, 1}),
                                  Fault("empty_choices", on={3, 4})])  # both tries of one
    result = remote(fake_openai, tmp_path, "--n", "5", "--concurrency", "1", "--max-attempts", "2")
    assert result.exit_code == 0, result.stderr
    assert "server_error" in result.stdout and "bad_response" in result.stdout


def test_max_errors_stops_early_with_a_clear_message_and_resume_finishes(fake_openai, tmp_path):
    fake_openai.configure(faults=[Fault("status", status=500, headers=FAST_RETRY, rate=0.6)], seed=3)
    result = remote(fake_openai, tmp_path, "--n", "200", "--concurrency", "2",
                    "--max-attempts", "1", "--max-errors", "5")
    assert result.exit_code == 1
    assert "more than --max-errors 5" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr
    run_dir = only_run(tmp_path)
    stored_errors = rows(run_dir, "SELECT COUNT(*) FROM samples WHERE status = 'error'")[0][0]
    assert 6 <= stored_errors <= 7  # the budget, plus one; the other worker may finish one more
    assert rows(run_dir, "SELECT COUNT(*) FROM samples")[0][0] < 200
    assert manifest(run_dir)["status"] == "failed"
    assert manifest(run_dir)["limits"]["max_errors"] == "5"

    fake_openai.configure(faults=[])
    resumed = cli("run", "--resume", run_dir, "--quiet", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["n"], summary["ok"], summary["errors"]) == (200, 200, 0)


@pytest.mark.parametrize("spec, budget", [("0.05", 5), ("5%", 5), ("0", 0)])
def test_max_errors_as_a_fraction_of_n(fake_openai, tmp_path, spec, budget):
    fake_openai.configure(faults=[Fault("status", status=500, headers=FAST_RETRY, rate=1.0)])
    # Every request fails; the first-20-failed guard would stop at 20, the budget earlier.
    result = remote(fake_openai, tmp_path, "--n", "100", "--concurrency", "1",
                    "--max-attempts", "1", "--max-errors", spec)
    assert result.exit_code == 1, result.stderr
    assert f"({budget} of 100)" in result.stderr
    assert rows(only_run(tmp_path), "SELECT COUNT(*) FROM samples")[0][0] == budget + 1


@pytest.mark.parametrize("spec", ["lots", "-1", "2.5", "nan"])
def test_bad_max_errors_is_a_usage_error(fake_openai, tmp_path, spec):
    result = remote(fake_openai, tmp_path, "--n", "3", "--max-errors", spec)
    assert result.exit_code == 2
    assert "--max-errors" in result.stderr and "Traceback" not in result.stderr
    assert not fake_openai.received


# --- a 200 that is no completion is a transport fault ----------------------------------------

@pytest.mark.parametrize("fault", [Fault("malformed_json"), Fault("html", status=200),
                                   Fault("error_200"), Fault("empty_choices")],
                         ids=["cut-off", "html-200", "error-in-200", "no-choices"])
def test_a_200_that_is_no_completion_is_retried_and_its_body_kept(fake_openai, tmp_path, fault):
    fault.on, fault.headers = {1}, FAST_RETRY
    fake_openai.configure(faults=[fault])
    result = remote(fake_openai, tmp_path, "--n", "3", "--concurrency", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["errors"] == 0
    run_dir = only_run(tmp_path)
    assert rows(run_dir, "SELECT idx, attempts FROM samples ORDER BY idx") == [(0, 1), (1, 2), (2, 1)]
    [(idx, kind, raw)] = rows(run_dir, "SELECT idx, error_kind, raw FROM failed_attempts")
    assert (idx, kind) == (1, "bad_response")
    assert raw == fake_openai.sent[1]["body"] and raw  # the body as it came, for a post-mortem


def test_a_flaky_server_costs_at_most_two_samples_in_300(fake_openai, tmp_path):
    """About 19% of requests fail (429 with Retry-After, 500, a cut-off 200, a 502 HTML
    page); with the default 5 attempts almost no sample uses them all up."""
    rate = 1 - 0.81 ** 0.25  # four faults drawn in turn: 19% of requests hit one
    fake_openai.configure(seed=1, faults=[
        Fault("status", status=429, rate=rate, headers={"Retry-After": "1"}),
        Fault("status", status=500, rate=rate),
        Fault("malformed_json", rate=rate),
        Fault("html", status=502, rate=rate, message="Bad Gateway"),
    ])
    result = remote(fake_openai, tmp_path, "--n", "300", "--concurrency", "16", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    faults = [s["fault"] for s in fake_openai.sent if s["fault"]]
    assert 0.15 <= len(faults) / len(fake_openai.sent) <= 0.24  # the server was that flaky
    assert {"status", "malformed_json", "html"} <= set(faults)
    assert summary["n"] == 300 and summary["errors"] <= 2 and summary["ok"] >= 298
    run_dir = only_run(tmp_path)
    logged = rows(run_dir, "SELECT error_kind, COUNT(*) FROM failed_attempts GROUP BY error_kind")
    assert dict(logged).keys() == {"rate_limit", "server_error", "bad_response"}
    assert sum(count for _, count in logged) == len(faults)  # every failed try is in the log
    cut = rows(run_dir, "SELECT raw FROM failed_attempts WHERE error_kind = 'bad_response'")
    sent_bodies = {s["body"] for s in fake_openai.sent if s["fault"] == "malformed_json"}
    assert {raw for (raw,) in cut} <= sent_bodies
