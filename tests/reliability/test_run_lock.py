"""One process per run folder: a second `run --resume` of a folder in use is refused at
once, names the holder and writes nothing; a holder killed with SIGKILL leaves a stale
lock that the next resume takes over. Real subprocesses against the fake server."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

from detaudit.runlock import LOCK_FILE
from tests.reliability.helpers import (MODEL, ROOT, cli, detaudit_command, manifest, only_run,
                                       rows, run_detaudit, subprocess_env)

N = 8


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(detaudit_command(*args), cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file in the folder: size, modification time and content hash."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns,
                     hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir())}


def test_a_folder_in_use_is_refused_at_once_and_a_killed_holders_lock_is_taken_over(
        fake_openai, tmp_path):
    fake_openai.configure(delay=120)  # the holder's requests hang: it writes nothing meanwhile
    out = tmp_path / "results"
    holder = start("run", "--model", MODEL, "--base-url", fake_openai.url, "--n", N,
                   "--concurrency", 4, "--out", out, "--quiet")
    try:
        wait_for(lambda: len(fake_openai.received) >= 4, "the holder's requests")
        run_dir = only_run(out)
        before = snapshot(run_dir)

        t0 = time.monotonic()
        refused = run_detaudit("run", "--resume", run_dir, "--quiet")
        elapsed = time.monotonic() - t0
        assert refused.returncode == 2, refused.stderr
        assert elapsed < 60  # at once: it did not wait for the holder's 120 s requests
        message = " ".join(refused.stderr.split())
        assert f"pid {holder.pid} on {socket.gethostname()} (detaudit run)" in message
        assert "in use" in message and f"kill {holder.pid}" in message
        assert "Traceback" not in refused.stderr
        assert snapshot(run_dir) == before  # wrote nothing
        assert len(fake_openai.received) == 4  # sent nothing

        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        holder.kill()
        holder.communicate()
    assert manifest(run_dir)["status"] == "running"  # what the killed holder left
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == holder.pid  # and its stale lock

    # The next resume takes the stale lock over; while it runs, it holds the folder.
    fake_openai.configure(delay=6)  # one round of N requests, long enough to be caught running
    resume = start("run", "--resume", run_dir, "--quiet", "--concurrency", N, "--json")
    try:
        wait_for(lambda: len(fake_openai.received) >= 1, "the resume's first request")
        second = run_detaudit("run", "--resume", run_dir, "--quiet")
        assert second.returncode == 2, second.stderr
        message = " ".join(second.stderr.split())
        assert f"pid {resume.pid}" in message and "(detaudit run --resume)" in message
        stdout, stderr = resume.communicate(timeout=120)
    finally:
        resume.kill()
    assert resume.returncode == 0, stderr
    assert f"took over the lock of pid {holder.pid}" in " ".join(stderr.split())
    summary = json.loads(stdout)
    assert (summary["ok"], summary["run"]["status"]) == (N, "complete")
    assert rows(run_dir, "SELECT COUNT(*) FROM samples WHERE status = 'ok'") == [(N,)]
    assert (run_dir / LOCK_FILE).read_text() == ""  # released cleanly: nothing stale

    again = run_detaudit("run", "--resume", run_dir, "--quiet", "--json")
    assert again.returncode == 0 and "took over" not in again.stderr


def test_a_fresh_run_into_a_run_folder_is_refused(fake_openai, tmp_path):
    out = tmp_path / "results"
    first = cli("run", "--model", MODEL, "--base-url", fake_openai.url, "--n", 2, "--out", out,
                "--quiet")
    assert first.exit_code == 0, first.stderr
    run_dir = only_run(out)
    before = snapshot(run_dir)
    nested = cli("run", "--model", MODEL, "--base-url", fake_openai.url, "--n", 2,
                 "--out", run_dir, "--quiet")
    assert nested.exit_code == 2
    assert "is a run folder" in nested.stderr and f"--resume {run_dir}" in " ".join(nested.stderr.split())
    assert snapshot(run_dir) == before and len(fake_openai.received) == 2
