"""The real CLI against a real third-party server: ``transformers serve`` with the bundled
tiny model on 127.0.0.1 (continuous batching, CPU). It names the model by its folder
path and returns no logprobs, so this is the text-only audit a user of such a server
runs: ``run --no-logprobs``, probes with ``logprobs = false``, and ``gate``.

The server starts once for the module (about 30-60 s on a small CPU, its first
request included); each test then sends a few short requests.
"""

from __future__ import annotations

import json
import shlex
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("fastapi", reason="transformers serve needs the test extra: pip install -e '.[test]'")

from detaudit.cli import app  # noqa: E402
from tests.servers.transformers_serve import TransformersServe  # noqa: E402

LOGPROB_WORDS = ("logprob value", "distinct logprob", "mean reported P", "Tracked tokens", "Clusters of")


@pytest.fixture(scope="module")
def server():
    serve = TransformersServe()
    yield serve
    serve.stop()


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "160"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def run(server, out: Path, *args):
    return cli("run", "--model", server.model, "--base-url", server.url, "--out", out, "--quiet", *args)


def only_run(out: Path) -> Path:
    (run_dir,) = out.iterdir()
    return run_dir


def stored(run_dir: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(run_dir / "samples.sqlite") as db:
        return db.execute(sql).fetchall()


def test_greedy_divergence_text_only(server, tmp_path):
    result = run(server, tmp_path, "--probe", "greedy-divergence", "--no-logprobs", "--n", "4",
                 "--concurrency", "4", "--max-tokens", "24", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["n"], summary["ok"], summary["logprobs"]) == (4, 4, "not_requested")
    assert summary["tokens"] == [] and summary["divergence"] is None and "insight" not in summary
    texts = [t for (t,) in stored(only_run(tmp_path), "SELECT output FROM samples")]
    assert all(texts) and len(texts) == 4
    a = summary["agreement"]
    top = max(texts.count(t) for t in texts)
    assert (a["n"], a["distinct_outputs"], a["reference_count"]) == (4, len(set(texts)), top)
    assert a["tar_raw"] == top / 4
    # the model's folder is on this machine: divergence counts its tokens, not characters
    fd = a["first_divergence"]
    assert fd["unit"] == "token" and fd["tokenizer"].endswith("tokenizer.json")
    assert 1 <= fd["reference_length"] <= 24 and fd["diverged"] == 4 - top
    raws = [r for (r,) in stored(only_run(tmp_path), "SELECT raw FROM sample_rows")]
    assert all('"logprobs"' not in raw for raw in raws)  # nothing asked, nothing sent back

    report = cli("report", only_run(tmp_path))
    assert report.exit_code == 0, report.stderr
    assert "logprobs were not requested" in report.stdout and "TARr@N" in report.stdout
    assert not any(word in report.stdout for word in LOGPROB_WORDS), report.stdout


def test_coin_flip_with_no_logprobs(server, tmp_path):
    result = run(server, tmp_path, "--no-logprobs", "--n", "6", "--concurrency", "3", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] == 6 and summary["logprobs"] == "not_requested" and summary["tokens"] == []
    heads, tails = summary["outcomes"]
    outputs = dict(summary["outputs"]["top"])
    assert heads["count"] == sum(c for t, c in outputs.items() if t.lstrip().startswith("Heads"))
    assert heads["mean_reported_prob"] is None and tails["mean_reported_prob"] is None
    assert summary["agreement"]["tar_raw"] == max(outputs.values()) / 6
    manifest = json.loads((only_run(tmp_path) / "manifest.json").read_text())
    assert manifest["probe"]["request"]["logprobs"] is False
    assert "top_logprobs" not in manifest["probe"]["request"]
    assert "--no-logprobs" in manifest["command"]


def test_asking_for_logprobs_stops_at_once_and_names_the_flag(server, tmp_path):
    first = tmp_path / "asked"
    result = run(server, first, "--n", "40", "--concurrency", "2", "--json")
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert "returned no logprobs" in result.stderr and "--no-logprobs" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["logprobs"] == "not_returned" and summary["tokens"] == []
    assert summary["n"] <= 2 and summary["errors_by_kind"] == {"no_logprobs": summary["n"]}
    # the command it prints is the one to run: a text-only run of the same probe
    command = result.stderr.strip().splitlines()[-1].strip()
    words = shlex.split(command)
    assert words[:2] == ["detaudit", "run"] and words[-1] == "--no-logprobs"
    words[words.index("--n") + 1] = "4"
    again = cli(*words[1:])
    assert again.exit_code == 0, again.stderr
    assert len(list(first.iterdir())) == 2  # a new run folder beside the stopped one


GATE = """
[endpoint]
base_url = "{url}"
model = "{model}"

[limits]
max_distinct_outputs = 1

[[check]]
name = "coin-text"
probe = "coin-flip"
n = 4
concurrency = 2
logprobs = false

[[check]]
name = "answer"
probe = "answer.toml"
n = 4
concurrency = 4
"""

ANSWER_PROBE = """
name = "answer"
kind = "fixed-seed"
description = "text-only: the coin's answer parsed out"

[request]
messages = [{ role = "user", content = "Flip a coin. Return Heads or Tails only." }]
max_tokens = 4
temperature = 0
logprobs = false

[track]
answer_regex = '(Heads|Tails)'
"""


def test_gate_against_transformers_serve(server, tmp_path):
    (tmp_path / "answer.toml").write_text(ANSWER_PROBE)
    config = tmp_path / "detaudit.toml"
    config.write_text(GATE.format(url=server.url, model=server.model))
    junit = tmp_path / "gate.xml"
    result = cli("gate", "--config", config, "--json", "--junit", junit, "--out", tmp_path / "runs")
    data = json.loads(result.stdout)["gate"]
    checks = {c["name"]: c for c in data["checks"]}
    for check in checks.values():
        m = check["measured"]
        assert check["status"] in ("pass", "fail"), check["message"]
        assert m["logprobs"] == "not_requested" and m["ok"] == 4
        assert m["distinct_logprobs"] is None and m["clusters"] is None and m["prob_range"] is None
        assert check["status"] == ("pass" if m["distinct_outputs"] <= 1 else "fail")
        assert (Path(check["run_dir"]) / "gate.json").is_file()
    assert checks["answer"]["measured"]["tar_answer"] is not None
    expected = 0 if all(c["status"] == "pass" for c in checks.values()) else 3
    assert result.exit_code == data["exit_code"] == expected, result.stderr
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("errors") == "0"


def test_gate_asking_for_logprobs_is_a_failed_run_until_no_logprobs(server, tmp_path):
    args = ("gate", "--model", server.model, "--base-url", server.url, "--json",
            "--out", tmp_path)
    asked = cli(*args)
    assert asked.exit_code == 1, asked.stderr
    check = json.loads(asked.stdout)["gate"]["checks"][0]
    assert check["status"] == "error" and "--no-logprobs" in check["message"]
    text_only = cli(*args, "--no-logprobs")
    check = json.loads(text_only.stdout)["gate"]["checks"][0]
    assert check["status"] in ("pass", "fail") and check["measured"]["logprobs"] == "not_requested"
    assert text_only.exit_code == (0 if check["status"] == "pass" else 3)
