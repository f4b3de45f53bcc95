"""Text-only audits through the real CLI against the fake OpenAI server: --no-logprobs,
probes with logprobs = false and answer_regex, and a server that returns no logprobs
(the run stops after the first answers and names the flag). The same against a real
third-party server: tests/thirdparty/test_transformers_serve.py."""

from __future__ import annotations

import json
import sqlite3

import pytest
from typer.testing import CliRunner

from detaudit.cli import app
from tests.servers.fake_openai import Fault, State

MODEL = "gpt-4o-mini"
LOGPROB_WORDS = ("logprob value", "distinct logprob", "mean reported P", "Tracked tokens", "Clusters of",
                 "logprob vectors")


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "160"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def remote(fake, out, *args):
    return cli("run", "--model", MODEL, "--base-url", fake.url, "--out", out, "--quiet", *args)


def only_run(out):
    (run_dir,) = out.iterdir()
    return run_dir


def answers(*texts_weights):
    """One-position states whose chosen token is the whole text."""
    return [State([{text: -0.5}], weight=w) for text, w in texts_weights]


ANSWER_PROBE = """
name = "answer"
kind = "fixed-seed"
[request]
messages = [{ role = "user", content = "What is six times seven?" }]
max_tokens = 8
temperature = 0
logprobs = false
[track]
answer_regex = 'answer: (\\d+)'
"""


def test_no_logprobs_asks_for_none_and_reports_no_logprob_figure(fake_openai, tmp_path):
    fake_openai.configure(states=answers(("Heads", 3), ("Heads.", 1)))
    result = remote(fake_openai, tmp_path, "--no-logprobs", "--n", "8", "--concurrency", "2")
    assert result.exit_code == 0, result.stderr
    for request in fake_openai.received:
        assert request["body"].get("logprobs") in (None, False) and "top_logprobs" not in request["body"]
    report = result.stdout
    assert "logprobs were not requested" in report and "TARr@N (same raw text)" in report
    assert "75.0000 %" in report  # 6 of 8 say "Heads"
    assert not any(word in report for word in LOGPROB_WORDS), report
    summary = json.loads(cli("report", only_run(tmp_path), "--json").stdout)
    assert summary["logprobs"] == "not_requested" and summary["tokens"] == []
    assert summary["agreement"]["tar_raw"] == 0.75 and summary["deterministic"] is False
    assert [o["count"] for o in summary["outcomes"]] == [8, 0]  # both texts start with Heads


def test_legacy_completions_with_no_logprobs_send_no_logprobs(fake_openai, tmp_path):
    fake_openai.configure(states=answers(("Heads", 1)))
    result = remote(fake_openai, tmp_path, "--no-logprobs", "--api", "completions", "--n", "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert "logprobs" not in fake_openai.received[0]["body"]
    summary = json.loads(result.stdout)
    assert summary["deterministic"] is True and summary["logprobs"] == "not_requested"


def test_answer_regex_gives_tar_a_and_survives_report(fake_openai, tmp_path):
    fake_openai.configure(states=answers(("The answer: 42.", 3), ("So the answer: 42", 1),
                                         ("The answer: 41.", 1)))
    probe = tmp_path / "answer.toml"
    probe.write_text(ANSWER_PROBE)
    out = tmp_path / "runs"
    result = remote(fake_openai, out, "--probe", probe, "--n", "5", "--concurrency", "1", "--json")
    assert result.exit_code == 0, result.stderr
    a = json.loads(result.stdout)["agreement"]
    assert (a["tar_raw"], a["tar_answer"]) == (0.6, 0.8)
    assert a["answers"] == {"parsed": 5, "unparsed": 0, "distinct": 2, "most_common": "42", "count": 4}
    # first divergence in gpt-4o-mini's tokens (tiktoken): "The" vs "So" at 0, "42" vs "41" later
    fd = a["first_divergence"]
    assert fd["unit"] == "token" and fd["tokenizer"] == "tiktoken o200k_base"
    assert fd["diverged"] == 2 and fd["min"] == 0
    again = json.loads(cli("report", only_run(out), "--json").stdout)["agreement"]
    assert again == a  # the regex travels in the manifest
    text = cli("report", only_run(out)).stdout
    assert "TARa@N (same parsed answer)" in text and "80.0000 %" in text


def test_a_server_without_logprobs_stops_the_run_after_the_first_answers(fake_openai, tmp_path):
    fake_openai.configure(faults=[Fault("no_logprobs", rate=1.0)])
    result = remote(fake_openai, tmp_path, "--n", "50", "--concurrency", "1", "--top-logprobs", "5")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert len(fake_openai.received) == 1  # not 50 requests, nor 5 attempts
    assert "returned no logprobs" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.strip().endswith("--no-logprobs") and "--top-logprobs" not in last
    with sqlite3.connect(only_run(tmp_path) / "samples.sqlite") as db:
        assert db.execute("SELECT status, error_kind FROM samples").fetchall() == [("error", "no_logprobs")]
    summary = json.loads(cli("report", only_run(tmp_path), "--json").stdout)
    assert summary["logprobs"] == "not_returned" and summary["tokens"] == []


@pytest.mark.parametrize("args, needle", [
    (["--no-logprobs", "--top-logprobs", "5"], "--top-logprobs"),
])
def test_conflicting_flags(tmp_path, args, needle):
    result = cli("run", "--model", MODEL, "--base-url", "http://127.0.0.1:9/v1", "--out", tmp_path, *args)
    assert result.exit_code == 2 and needle in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_resume_takes_logprobs_from_the_manifest(fake_openai, tmp_path):
    remote(fake_openai, tmp_path, "--n", "2")
    result = cli("run", "--resume", only_run(tmp_path), "--no-logprobs")
    assert result.exit_code == 2 and "--no-logprobs" in result.stderr


@pytest.mark.parametrize("regex, needle", [
    ("'(unclosed'", "not a valid regular expression"),
    ("'x*'", "matches the empty string"),
    ("3", "non-empty string"),
])
def test_bad_answer_regex_is_a_usage_error(tmp_path, regex, needle):
    probe = tmp_path / "bad.toml"
    probe.write_text(ANSWER_PROBE.replace("'answer: (\\d+)'", regex))
    result = cli("run", "--model", MODEL, "--base-url", "http://127.0.0.1:9/v1", "--probe", probe,
                 "--out", tmp_path / "runs")
    assert result.exit_code == 2, result.stderr
    assert "track.answer_regex" in result.stderr and needle in result.stderr
    assert not (tmp_path / "runs").exists()


def test_gate_config_takes_logprobs_false_per_check():
    from detaudit.gate import GateConfigError, parse_config

    text = '[[check]]\nprobe = "coin-flip"\nlogprobs = false\n[[check]]\nname = "b"\nprobe = "coin-flip"\n'
    first, second = parse_config(text, "g.toml").checks
    assert (first.logprobs, second.logprobs) == (False, True)
    with pytest.raises(GateConfigError, match=r"check\[0\]\.logprobs: must be true or false"):
        parse_config('[[check]]\nprobe = "coin-flip"\nlogprobs = "no"\n', "g.toml")
