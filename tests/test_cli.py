"""The real CLI against the fake OpenAI server on 127.0.0.1.

Most tests drive the typer app in-process (CliRunner, stdout and stderr kept apart);
the Ctrl-C test runs ``python -m detaudit.cli`` in a subprocess and sends it SIGINT.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from detaudit.cli import app
from detaudit.probes import builtin_names
from tests.reliability.helpers import stored_count
from tests.servers.fake_openai import Fault, State, outcome_states

MODEL = "gpt-4o-mini"
VALUES = [(-0.31326166, 5), (-0.3132617, 3), (-0.3140001, 2)]  # 3 distinct, 2 clusters at 0.01 pp


def cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def remote(fake, out, *args: str):
    return cli("run", "--model", MODEL, "--base-url", fake.url, "--out", out, "--quiet", *args)


def only_run(out: Path) -> Path:
    (run_dir,) = out.iterdir()
    return run_dir


def test_full_run_reports_the_right_counts(fake_openai, tmp_path):
    fake_openai.configure(states=outcome_states("Heads", VALUES, alternatives={"T": -1.3132617}),
                          fingerprints=["fp_a", "fp_b"])
    result = remote(fake_openai, tmp_path, "--n", "100", "--concurrency", "9", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("\n") == 1  # exactly one JSON object, nothing else
    summary = json.loads(result.stdout)
    assert (summary["n"], summary["ok"], summary["errors"]) == (100, 100, 0)
    heads, tails = summary["tokens"]
    assert (heads["token"], heads["distinct_logprobs"], heads["clusters"]) == ("Heads", 3, 2)
    assert (tails["token"], tails["distinct_logprobs"]) == ("T", 1)
    assert summary["fingerprints"] == {"fp_a": 50, "fp_b": 50}
    assert summary["outputs"] == {"distinct": 1, "top": [["Heads", 100]]}
    run = summary["run"]
    assert run["status"] == "complete" and run["n"] == 100 and run["sent"] == 100
    assert Path(run["dir"]) == only_run(tmp_path)
    assert len(fake_openai.received) == 100
    body = fake_openai.received[0]["body"]
    assert (body["model"], body["seed"], body["temperature"], body["top_logprobs"]) == (MODEL, 42, 0, 20)


def test_manifest_records_the_run_and_never_the_key(fake_openai, tmp_path, monkeypatch):
    secret = "sk-test-0123456789SECRET"
    monkeypatch.setenv("DETAUDIT_TEST_KEY", secret)
    fake_openai.configure(api_key=secret)
    result = remote(fake_openai, tmp_path, "--n", "5", "--api-key-env", "DETAUDIT_TEST_KEY",
                    "--seed", "7", "--prompt", "Pick heads or tails.", "--api", "chat")
    assert result.exit_code == 0, result.stderr
    run_dir = only_run(tmp_path)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["n"] == 5
    assert manifest["tracked"] == [{"label": "Heads", "token": "Heads", "position": 0},
                                   {"label": "Tails", "token": "T", "position": 0}]
    assert manifest["probe"]["request"]["seed"] == 7
    assert manifest["probe"]["request"]["messages"] == [{"role": "user", "content": "Pick heads or tails."}]
    assert manifest["backend"]["model"] == MODEL
    assert manifest["backend_config"]["api_key_env"] == "DETAUDIT_TEST_KEY"
    command = manifest["command"]
    assert command[:2] == ["detaudit", "run"]
    assert command[command.index("--seed") + 1] == "7"
    assert command[command.index("--api") + 1] == "chat"
    assert "--api-key-env" in command
    for file in run_dir.iterdir():
        assert secret.encode() not in file.read_bytes(), file.name
    assert secret not in result.stdout + result.stderr


def test_a_wrong_key_fails_with_exit_1_and_is_not_stored(fake_openai, tmp_path, monkeypatch):
    wrong = "sk-wrong-9876543210LEAK"
    monkeypatch.setenv("DETAUDIT_TEST_KEY", wrong)
    fake_openai.configure(api_key="sk-right", echo_key_in_errors=True)
    result = remote(fake_openai, tmp_path, "--n", "50", "--api-key-env", "DETAUDIT_TEST_KEY")
    assert result.exit_code == 1
    assert "auth" in result.stderr and "--resume" in result.stderr
    for file in only_run(tmp_path).iterdir():
        assert wrong.encode() not in file.read_bytes(), file.name
    assert wrong not in result.stdout + result.stderr


def test_report_export_and_analyze_round_trip(fake_openai, tmp_path):
    fake_openai.configure(states=outcome_states("Heads", VALUES, alternatives={"T": -1.3132617}))
    out = tmp_path / "results"
    run = remote(fake_openai, out, "--n", "40", "--json")
    assert run.exit_code == 0, run.stderr
    run_dir = only_run(out)

    report = cli("report", run_dir, "--json")
    assert report.exit_code == 0, report.stderr
    again = json.loads(report.stdout)
    first = json.loads(run.stdout)
    for key in ("n", "ok", "errors", "tokens", "outputs", "fingerprints"):
        assert again[key] == first[key], key
    finer = json.loads(cli("report", run_dir, "--json", "--threshold-pct", "0.0000001").stdout)
    assert finer["tokens"][0]["clusters"] == 3

    text = cli("report", run_dir)
    assert text.exit_code == 0 and "Heads" in text.stdout

    clusters, samples = tmp_path / "clusters.csv", tmp_path / "samples.csv"
    exported = cli("export", run_dir, "--clusters", clusters, "--samples", samples)
    assert exported.exit_code == 0, exported.stderr
    cluster_rows = pd.read_csv(clusters)
    heads = cluster_rows[cluster_rows["token"] == "Heads"]
    assert len(heads) == first["tokens"][0]["clusters"] and heads["count"].sum() == 40
    sample_rows = pd.read_csv(samples)
    assert sorted(sample_rows["index"]) == list(range(40))

    # the Heads logprobs as recorded elsewhere: one row per sample, a logprob column
    table = tmp_path / "heads.csv"
    pd.DataFrame({"logprob": sample_rows["Heads.logprob"], "output": sample_rows["output"]}) \
        .to_csv(table, index=False)
    analyzed = cli("analyze", table, "--json")
    assert analyzed.exit_code == 0, analyzed.stderr
    result = json.loads(analyzed.stdout)
    assert result["n"] == 40
    assert result["tokens"][0]["distinct_logprobs"] == first["tokens"][0]["distinct_logprobs"]
    assert result["tokens"][0]["clusters"] == first["tokens"][0]["clusters"]


def test_429_with_retry_after_is_retried_and_counted_once(fake_openai, tmp_path):
    fake_openai.configure(faults=[Fault("status", status=429, headers={"Retry-After": "0.2"},
                                        on={1, 2})])
    result = remote(fake_openai, tmp_path, "--n", "6", "--concurrency", "1", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["ok"], summary["errors"]) == (6, 0)
    assert len(fake_openai.received) == 8
    conn = sqlite3.connect(only_run(tmp_path) / "samples.sqlite")
    assert conn.execute("SELECT attempts FROM samples WHERE idx = 1").fetchone() == (3,)
    assert conn.execute("SELECT COUNT(*) FROM failed_attempts WHERE error_kind = 'rate_limit'").fetchone() == (2,)


def test_an_error_after_max_attempts_is_in_the_summary(fake_openai, tmp_path):
    fake_openai.configure(faults=[Fault("status", status=500, on={0, 1})])
    result = remote(fake_openai, tmp_path, "--n", "5", "--concurrency", "1",
                    "--max-attempts", "2", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["n"], summary["ok"], summary["errors"]) == (5, 4, 1)
    assert summary["errors_by_kind"] == {"server_error": 1}


def test_ctrl_c_exits_130_and_resume_completes_to_exactly_n(fake_openai, tmp_path):
    n = 300
    fake_openai.configure(delay=0.01, states=outcome_states("Heads", VALUES))
    out = tmp_path / "results"
    proc = subprocess.Popen(
        [sys.executable, "-m", "detaudit.cli", "run", "--model", MODEL, "--base-url", fake_openai.url,
         "--n", str(n), "--concurrency", "4", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if stored_count(out) >= 20:  # 0 until the run folder and its table exist
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    run_dir = only_run(out)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    stored = sqlite3.connect(run_dir / "samples.sqlite").execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    assert 20 <= stored < n

    received_before = len(fake_openai.received)
    resumed = cli("run", "--resume", run_dir, "--quiet", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["n"], summary["ok"], summary["run"]["status"]) == (n, n, "complete")
    assert summary["run"]["sent"] == n - stored
    assert len(fake_openai.received) - received_before == n - stored
    rows = sqlite3.connect(run_dir / "samples.sqlite").execute("SELECT idx FROM samples ORDER BY idx").fetchall()
    assert [i for (i,) in rows] == list(range(n))
    assert json.loads((run_dir / "manifest.json").read_text())["resumed_at"]


def test_probes_lists_the_builtins():
    result = cli("probes", "--json")
    assert result.exit_code == 0
    probes = json.loads(result.stdout)["probes"]
    assert [p["name"] for p in probes] == builtin_names()
    assert all(p["kind"] and p["description"] for p in probes)
    assert "coin-flip" in cli("probes").stdout


@pytest.mark.parametrize("command", ["run", "report", "export", "analyze", "probes", "matrix"])
def test_every_command_has_help_with_an_example(command):
    result = cli(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout and f"detaudit {command}" in result.stdout


def usage_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


@pytest.mark.parametrize("args, needles", [
    (["--n", "0"], ["--n"]),
    (["--concurrency", "many"], ["--concurrency"]),
    (["--api", "soap"], ["--api"]),
    (["--top-logprobs", "21"], ["--top-logprobs"]),
    (["--probe", "no-such-probe"], ["unknown probe", "coin-flip"]),
    (["--probe", "missing.toml"], ["missing.toml", "no such probe file"]),
    (["--batch-sizes", "1,x"], ["--batch-sizes"]),
])
def test_bad_flags_are_usage_errors(tmp_path, args, needles):
    usage_error(cli("run", "--model", MODEL, "--base-url", "http://127.0.0.1:9/v1",
                    "--out", tmp_path, *args), *needles)
    assert not any(tmp_path.iterdir())  # nothing was started


@pytest.mark.parametrize("toml, needles", [
    ('name = "x"\n[request]\nmessages = "hi"\n', ["request.messages"]),
    ('name = "x"\nkind = "coin"\n[request]\nprompt = "p"\n', ["kind", "'coin'"]),
    ('name = "x"\n[request\n', ["not valid TOML"]),
    ('name = "x"\n[request]\nmessages = [{ role = "user", content = "hi" }]\nmax_tokens = 0\n'
     '[track]\noutcomes = ["A"]\n', ["request.max_tokens"]),
])
def test_malformed_probe_files_are_usage_errors(tmp_path, toml, needles):
    probe = tmp_path / "bad.toml"
    probe.write_text(toml)
    usage_error(cli("run", "--model", MODEL, "--base-url", "http://127.0.0.1:9/v1",
                    "--probe", probe, "--out", tmp_path / "results"), str(probe), *needles)


def test_usage_errors_of_the_other_commands(fake_openai, tmp_path):
    usage_error(cli("report", tmp_path / "nope"), "no such run folder")
    usage_error(cli("report", tmp_path), "not a detaudit run folder")
    bad = tmp_path / "bad.csv"
    bad.write_text("prob\n0.5\n")
    usage_error(cli("analyze", bad), "bad.csv", "logprob")
    remote(fake_openai, tmp_path / "results", "--n", "2")
    run_dir = only_run(tmp_path / "results")
    usage_error(cli("export", run_dir), "--clusters")
    usage_error(cli("run", "--resume", run_dir, "--model", "gpt-4o"), "--model")
    usage_error(cli("run", "--model", "gpt-4o", "--kernels", "default"), "--kernels")
    usage_error(cli("run", "--base-url", fake_openai.url), "--model")


def test_a_remote_url_without_a_key_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DETAUDIT_NO_SUCH_KEY", raising=False)
    usage_error(cli("run", "--model", "gpt-4o", "--base-url", "https://api.example.com/v1",
                    "--api-key-env", "DETAUDIT_NO_SUCH_KEY", "--out", tmp_path),
                "DETAUDIT_NO_SUCH_KEY")


def test_completions_api_sends_the_prompt(fake_openai, tmp_path):
    fake_openai.configure(states=[State([{"Heads": -0.2, "T": -1.7}])])
    result = remote(fake_openai, tmp_path, "--n", "3", "--api", "completions", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["tokens"][0]["distinct_logprobs"] == 1
    received = fake_openai.received[0]
    assert received["path"] == "/v1/completions"
    assert received["body"]["prompt"] == "Flip a coin. Return Heads or Tails only."
    assert received["body"]["logprobs"] == 20


def test_without_a_model_the_bundled_engine_runs_and_resumes(tmp_path):
    """Wiring of the local backend: chosen without --model, batch size as the group,
    tracked tokens from its tokenizer, rebuilt from the manifest on --resume."""
    out = tmp_path / "results"
    result = cli("run", "--n", "4", "--kernels", "default", "--batch-sizes", "1,3",
                 "--out", out, "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["run"]["backend"]["type"] == "local"
    assert (summary["n"], summary["ok"]) == (4, 4)
    assert sorted(g["group"] for g in summary["groups"]) == ["1", "3"]
    run_dir = only_run(out)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["backend_config"] == {"backend": "local", "model": "tiny", "kernels": "default",
                                          "kernel_impl": "auto", "batch_sizes": [1, 3]}
    assert [t["label"] for t in manifest["tracked"]] == ["Heads", "Tails"]
    assert all(t["token"] for t in manifest["tracked"])

    # drop two samples, as a crash would, and let --resume rebuild the engine and finish
    conn = sqlite3.connect(run_dir / "samples.sqlite")
    with conn:
        conn.execute("DELETE FROM samples WHERE idx IN (1, 2)")
    conn.close()
    resumed = cli("run", "--resume", run_dir, "--quiet", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    again = json.loads(resumed.stdout)
    assert (again["n"], again["ok"], again["run"]["sent"]) == (4, 4, 2)
    # each index runs in the same batch on resume, so the numbers are the same
    assert again["tokens"] == summary["tokens"]


@pytest.mark.slow
def test_batch_invariant_kernels_give_one_value_where_default_kernels_give_several(tmp_path):
    counts = {}
    for kernels in ("default", "batch-invariant"):
        result = cli("run", "--n", "4", "--kernels", kernels, "--batch-sizes", "1,3",
                     "--out", tmp_path / kernels, "--quiet", "--json")
        assert result.exit_code == 0, result.stderr
        counts[kernels] = json.loads(result.stdout)["tokens"][0]["distinct_logprobs"]
    assert counts["batch-invariant"] == 1
    assert counts["default"] > 1
