"""The API key never lands anywhere: a recognisable key goes through a full audit with
failures (a 401 that echoes the key, 500s, dropped connections, retries), every
command that writes something runs, and then every file written and every line
printed is searched for it."""

from __future__ import annotations

from pathlib import Path

from tests.reliability.helpers import MODEL, cli, only_run, rows, run_detaudit, subprocess_env
from tests.servers.fake_openai import Fault

KEY = "sk-canary-DETAUDIT-7f3a9c21e4b85d60-SECRET"


def test_the_key_is_in_no_file_and_no_output(fake_openai, tmp_path):
    env = {"OPENAI_API_KEY": KEY}
    out = tmp_path / "results"
    printed: list[str] = []

    def run(*args):
        result = cli(*args, env=env)
        printed.extend([result.stdout, result.stderr])
        return result

    # 1. The server wants another key and echoes the one it got in its 401.
    fake_openai.configure(api_key="sk-the-servers-own-key", echo_key_in_errors=True)
    refused = run("run", "--model", MODEL, "--base-url", fake_openai.url, "--out", out / "refused",
                  "--n", "5", "--json")
    assert refused.exit_code == 1
    assert KEY in fake_openai.sent[0]["body"]  # the server did echo it: the test can fail

    # 2. The right key, with 500s, dropped connections and a 429 on the way.
    fake_openai.configure(api_key=KEY, seed=5, faults=[
        Fault("status", status=429, on={3}, headers={"retry-after-ms": "10"}, message=f"slow down {KEY}"),
        Fault("status", status=500, rate=0.15, headers={"Retry-After": "0"}),
        Fault("drop", rate=0.05),
    ])
    audit = run("run", "--model", MODEL, "--base-url", fake_openai.url, "--out", out / "audit",
                "--n", "40", "--concurrency", "4", "--max-attempts", "2", "--json")
    assert audit.exit_code == 0, audit.stderr
    run_dir = only_run(out / "audit")
    kinds = {k for (k,) in rows(run_dir, "SELECT error_kind FROM failed_attempts")}
    assert {"server_error", "connection", "rate_limit"} <= kinds  # failures went through

    # 3. Every command that reads the run and writes something.
    run("report", run_dir)
    run("report", run_dir, "--json")
    run("export", run_dir, "--clusters", tmp_path / "clusters.csv", "--samples", tmp_path / "samples.csv")
    run("analyze", tmp_path / "samples.csv", "--json")
    run("run", "--resume", run_dir, "--json")
    gate = run("gate", "--base-url", fake_openai.url, "--model", MODEL, "--out", out / "gate",
               "--junit", tmp_path / "junit.xml", "--json", "--max-distinct-logprobs", "5")
    assert gate.exit_code in (0, 1, 3), gate.stderr
    assert (tmp_path / "junit.xml").is_file()

    # 4. A real subprocess, so what it logs on stderr is what a user's terminal shows.
    proc = run_detaudit("run", "--model", MODEL, "--base-url", fake_openai.url,
                        "--out", out / "subprocess", "--n", "10", env=subprocess_env(**env))
    assert proc.returncode == 0, proc.stderr
    printed.extend([proc.stdout, proc.stderr])

    assert any(KEY in r["headers"].get("authorization", "") for r in fake_openai.received)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "samples.sqlite" for p in written) and len(written) >= 10
    leaks = [str(p) for p in written if KEY.encode() in p.read_bytes()]
    assert leaks == []
    assert [text for text in printed if KEY in text] == []
    # Not even a recognisable piece of it.
    assert not any(KEY[10:30].encode() in Path(p).read_bytes() for p in written)
