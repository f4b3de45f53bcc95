"""`detaudit run` as a real subprocess, killed with SIGKILL at random moments and resumed,
then checked against what the fake server logged it sent; and Ctrl-C (SIGINT) and
SIGTERM, which both end in a partial report and a resumable run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import pytest

from tests.reliability.helpers import (MODEL, ROOT, detaudit_command, interrupt_after, manifest,
                                       rows, run_detaudit, stored_count, subprocess_env)
from tests.servers.fake_openai import Fault, outcome_states

N = 240
VALUES = [(-0.31326166, 5), (-0.3132617, 3), (-0.3140001, 2)]


def test_sigkill_at_random_moments_then_resume_gives_exactly_n_of_what_was_sent(fake_openai, tmp_path):
    fake_openai.configure(delay=0.01, states=outcome_states("Heads", VALUES, {"T": -1.3}),
                          faults=[Fault("status", status=503, headers={"Retry-After": "0"}, rate=0.05)],
                          seed=11)
    out = tmp_path / "results"
    rng = random.Random(2024)
    fresh = detaudit_command("run", "--model", MODEL, "--base-url", fake_openai.url, "--n", N,
                             "--concurrency", 6, "--out", out, "--quiet")
    kills = 0
    for _ in range(4):
        run_dirs = [p for p in out.iterdir()] if out.exists() else []
        command = detaudit_command("run", "--resume", run_dirs[0], "--quiet") if run_dirs else fresh
        before = stored_count(out)
        proc = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # Kill once this session has stored a random number of samples (or at once).
        target = before + rng.randint(0, 40)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and stored_count(out) < target:
            time.sleep(rng.uniform(0.005, 0.03))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(30)
        assert "Traceback" not in proc.stderr.read()
    assert kills >= 3

    (run_dir,) = list(out.iterdir())
    assert manifest(run_dir)["status"] == "running"  # what a killed run leaves behind
    for _ in range(3):  # a few 503s may outlast 5 attempts: resume retries those
        done = run_detaudit("run", "--resume", run_dir, "--quiet", "--json")
        assert "Traceback" not in done.stderr
        if json.loads(done.stdout)["ok"] == N:
            break
    summary = json.loads(done.stdout)
    assert (summary["n"], summary["ok"], summary["errors"], summary["run"]["status"]) == (N, N, 0, "complete")

    stored = rows(run_dir, "SELECT idx, status, raw, positions FROM sample_rows ORDER BY idx")
    assert [idx for idx, *_ in stored] == list(range(N))  # every index once, no duplicates
    assert {status for _, status, *_ in stored} == {"ok"}
    sent_bodies = {entry["body"] for entry in fake_openai.sent if entry["status"] == 200}
    sent_texts = {tuple(entry["logprobs"]) for entry in fake_openai.sent if entry["status"] == 200}
    for idx, _, raw, positions in stored:
        assert raw in sent_bodies, f"sample {idx} holds a body the server never sent"
        (position,) = json.loads(positions)
        texts = tuple(t["logprob_text"] for t in position["top"]) + (position["logprob_text"],)
        assert texts in sent_texts, f"sample {idx} holds logprob texts the server never sent"
    # Killed sessions lose only what was in flight: far fewer answers than kills x N.
    answered = sum(1 for entry in fake_openai.sent if entry["status"] == 200)
    assert N <= answered <= N + kills * 6 + 6


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_interrupt_prints_the_partial_report_exits_and_resume_finishes(fake_openai, tmp_path,
                                                                       sig, code):
    fake_openai.configure(delay=0.01, states=outcome_states("Heads", VALUES, {"T": -1.3}))
    out = tmp_path / "results"
    returncode, stdout, stderr = interrupt_after(
        out, 30, "run", "--model", MODEL, "--base-url", fake_openai.url, "--n", 400,
        "--concurrency", 4, "--out", out, sig=sig)
    assert returncode == code, stderr
    assert "Traceback" not in stderr
    assert "partial report" in stderr and "--resume" in stderr
    assert "Heads" in stdout  # the report of what is stored
    (run_dir,) = list(out.iterdir())
    assert manifest(run_dir)["status"] == "interrupted"
    stored = stored_count(out)
    assert 30 <= stored < 400

    done = run_detaudit("run", "--resume", run_dir, "--quiet", "--json")
    summary = json.loads(done.stdout)
    assert (summary["ok"], summary["run"]["sent"]) == (400, 400 - stored)


def test_ctrl_c_with_json_prints_one_json_object(fake_openai, tmp_path):
    fake_openai.configure(delay=0.02)
    out = tmp_path / "results"
    returncode, stdout, stderr = interrupt_after(
        out, 10, "run", "--model", MODEL, "--base-url", fake_openai.url, "--n", 400,
        "--concurrency", 2, "--out", out, "--json")
    assert returncode == 130, stderr
    summary = json.loads(stdout)
    assert summary["run"]["status"] == "interrupted" and 10 <= summary["ok"] < 400
