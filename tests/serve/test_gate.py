"""``detaudit gate`` as CI runs it: a subprocess against the fake OpenAI server
(scripted to vary or not: fast and certain) and against ``detaudit serve``."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from detaudit.gate import GateConfigError, load_config, parse_config
from tests.serve.conftest import detaudit, json_out
from tests.servers.fake_openai import Fault, outcome_states, same_text_states

STEADY = outcome_states("Heads", [(-0.3132617, 1)], alternatives={"T": -1.3132617})
VARYING = outcome_states("Heads", [(-0.3132617, 3), (-0.31326166, 1)], alternatives={"T": -1.3132617})


def write(tmp_path: Path, text: str, name: str = "detaudit.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def gate(config: Path | None, *args: str) -> tuple:
    extra = ["--config", str(config)] if config else []
    proc = detaudit("gate", *extra, *args)
    return proc, (json_out(proc) if "--json" in args and proc.stdout.strip() else None)


COIN_CHECK = """
[endpoint]
base_url = "{url}"
model = "gpt-4o-mini"

[[check]]
name = "coin"
probe = "coin-flip"
n = 8
concurrency = 4
"""


def test_steady_endpoint_passes(fake_openai, tmp_path):
    fake_openai.configure(states=STEADY)
    config = write(tmp_path, COIN_CHECK.format(url=fake_openai.url))
    junit = tmp_path / "reports" / "gate.xml"
    proc, data = gate(config, "--json", "--junit", str(junit), "--out", str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr
    assert data["gate"]["status"] == "pass" and data["gate"]["passed"] == 1
    check = data["gate"]["checks"][0]
    assert check["measured"]["distinct_logprobs"] == 1 and check["measured"]["n"] == 8
    assert check["limits"]["max_distinct_logprobs"] == 1 and check["exceeded"] == []
    assert len(fake_openai.received) == 8
    saved = json.loads((Path(check["run_dir"]) / "gate.json").read_text())
    assert saved == data
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "1" and suite.get("failures") == "0" and suite.get("errors") == "0"
    assert suite.find("testcase").get("name") == "coin"


def test_varying_endpoint_fails_with_exit_3_and_junit_failure(fake_openai, tmp_path):
    fake_openai.configure(states=VARYING)
    config = write(tmp_path, COIN_CHECK.format(url=fake_openai.url))
    junit = tmp_path / "gate.xml"
    proc, data = gate(config, "--json", "--junit", str(junit), "--out", str(tmp_path / "runs"))
    assert proc.returncode == 3, proc.stderr
    check = data["gate"]["checks"][0]
    assert check["status"] == "fail" and data["gate"]["exit_code"] == 3
    exceeded = {e["limit"]: e for e in check["exceeded"]}
    assert exceeded["max_distinct_logprobs"]["measured"] == 2
    assert exceeded["max_distinct_logprobs"]["over"] == 1
    spread = abs(math.exp(-0.3132617) - math.exp(-0.31326166))
    assert exceeded["max_prob_range"]["measured"] == pytest.approx(spread, rel=1e-6)
    case = ET.parse(junit).getroot().find("testsuite/testcase")
    failure = case.find("failure")
    assert failure is not None and "max_distinct_logprobs 1 exceeded" in failure.get("message")
    assert "over by 1" in failure.text and check["run_dir"] in failure.text


def test_limit_flags_override_the_config(fake_openai, tmp_path):
    fake_openai.configure(states=VARYING)
    config = write(tmp_path, COIN_CHECK.format(url=fake_openai.url))
    proc, data = gate(config, "--json", "--max-distinct-logprobs", "2", "--max-prob-range", "0.001",
                      "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert data["gate"]["checks"][0]["limits"]["max_distinct_logprobs"] == 2


def test_errors_over_budget_and_endpoint_down_exit_1(fake_openai, tmp_path):
    fake_openai.configure(states=STEADY, faults=[Fault("status", status=500, on={0, 1})])
    config = write(tmp_path, COIN_CHECK.format(url=fake_openai.url))
    proc, data = gate(config, "--json", "--max-attempts", "1", "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    check = data["gate"]["checks"][0]
    assert check["status"] == "error" and "errors over budget" in check["message"]
    assert check["measured"]["errors"] == 2
    tolerant, _ = gate(config, "--json", "--max-attempts", "1", "--max-error-rate", "0.5",
                       "--out", str(tmp_path))
    assert tolerant.returncode == 0, tolerant.stderr

    down, data = gate(None, "--json", "--model", "m", "--base-url", "http://127.0.0.1:9/v1",
                      "--junit", str(tmp_path / "down.xml"), "--out", str(tmp_path))
    assert down.returncode == 1
    assert "endpoint down" in data["gate"]["checks"][0]["message"]
    assert ET.parse(tmp_path / "down.xml").getroot().find("testsuite/testcase/error") is not None


GREEDY_CHECK = """
[endpoint]
base_url = "{url}"
model = "gpt-4o-mini"

[limits]
max_distinct_logprobs = 1

[[check]]
name = "greedy"
probe = "greedy-divergence"
n = 14
concurrency = 4
"""
STORY = ["Once", " upon", " a", " time", ",", " a", " keeper"]


def test_same_text_with_varying_logprobs_is_not_deterministic_and_fails_the_gate(fake_openai, tmp_path):
    # The text never varies; the logprob at position 3 takes 7 values (a last-bits change).
    fake_openai.configure(states=same_text_states(STORY, vectors=7, at=3))
    run = detaudit("run", "--probe", "greedy-divergence", "--model", "gpt-4o-mini", "--base-url",
                   fake_openai.url, "--n", "14", "--out", str(tmp_path / "run"), "--json", "--quiet")
    assert run.returncode == 0, run.stderr
    summary = json_out(run)
    assert summary["outputs"]["distinct"] == 1
    assert summary["deterministic"] is False
    d = summary["divergence"]
    assert (d["distinct_token_sequences"], d["distinct_logprob_vectors"], d["first_difference"]) == (1, 7, 3)
    texts = {json.loads(sent["body"])["choices"][0]["message"]["content"] for sent in fake_openai.sent}
    assert texts == {"".join(STORY)}  # the server's text really was one and the same

    config = write(tmp_path, GREEDY_CHECK.format(url=fake_openai.url))
    junit = tmp_path / "gate.xml"
    proc, data = gate(config, "--json", "--junit", str(junit), "--out", str(tmp_path / "gate"))
    assert proc.returncode == 3, proc.stderr
    check = data["gate"]["checks"][0]
    assert check["status"] == "fail"
    assert check["limits"]["max_distinct_logprob_vectors"] == 1  # from max_distinct_logprobs
    assert check["measured"]["distinct_outputs"] == 1
    assert check["measured"]["distinct_logprob_vectors"] == 7
    assert check["measured"]["first_difference"] == 3
    (exceeded,) = check["exceeded"]
    assert exceeded["limit"] == "max_distinct_logprob_vectors" and exceeded["where"] == "position 3"
    failure = ET.parse(junit).getroot().find("testsuite/testcase/failure")
    assert "max_distinct_logprob_vectors 1 exceeded (position 3): 7 measured" in failure.get("message")

    # The vector limit follows max_distinct_logprobs unless it is set itself.
    proc, data = gate(config, "--json", "--max-distinct-logprobs", "7", "--out", str(tmp_path / "gate"))
    assert proc.returncode == 0, proc.stderr
    assert data["gate"]["checks"][0]["limits"]["max_distinct_logprob_vectors"] == 7


def test_a_steady_server_passes_the_greedy_check(fake_openai, tmp_path):
    fake_openai.configure(states=same_text_states(STORY, vectors=1))
    config = write(tmp_path, GREEDY_CHECK.format(url=fake_openai.url))
    proc, data = gate(config, "--json", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    measured = data["gate"]["checks"][0]["measured"]
    assert (measured["distinct_logprob_vectors"], measured["first_difference"]) == (1, None)
    assert measured["deterministic"] is True


def test_the_vector_limit_set_itself_wins_over_max_distinct_logprobs(tmp_path):
    config = write(tmp_path, "[limits]\nmax_distinct_logprobs = 2\n[[check]]\nprobe = 'greedy-divergence'\n"
                   "[[check]]\nname = 'own'\nprobe = 'greedy-divergence'\n[check.limits]\n"
                   "max_distinct_logprob_vectors = 5\n")
    first, own = load_config(config, {}).checks
    assert first.limits["max_distinct_logprob_vectors"] == 2
    assert first.limits["max_distinct_token_sequences"] == 1  # from max_distinct_outputs
    assert own.limits["max_distinct_logprob_vectors"] == 5
    flagged = load_config(config, {"max_distinct_logprobs": 3}).checks
    assert [c.limits["max_distinct_logprob_vectors"] for c in flagged] == [3, 5]


BAD_CONFIGS = [
    ("not toml = [", "not valid TOML"),
    ("[[check]]\nprobe = 'coin-flip'\nn = 0\n", "check[0].n"),
    ("[[check]]\nn = 5\n", "check[0].probe"),
    ("[[check]]\nprobe = 'no-such-probe'\n", "check[0]"),
    ("[limits]\nmax_cluster = 1\n[[check]]\nprobe = 'coin-flip'\n", "limits.max_cluster"),
    ("[limits]\nmax_prob_range = 2\n[[check]]\nprobe = 'coin-flip'\n", "limits.max_prob_range"),
    ("[limits]\nmax_distinct_logprob_vectors = 0\n[[check]]\nprobe = 'coin-flip'\n",
     "limits.max_distinct_logprob_vectors"),
    ("[[check]]\nprobe = 'coin-flip'\n[check.limits]\nmax_clusters = 0\n", "check[0].limits.max_clusters"),
    ("[[check]]\nprobe = 'coin-flip'\nlevels = [-1]\n", "check[0].levels"),
    ("[endpoint]\nurl = 'x'\n[[check]]\nprobe = 'coin-flip'\n", "endpoint.url"),
    ("surprise = 1\n[[check]]\nprobe = 'coin-flip'\n", "surprise"),
    ("[endpoint]\nmodel = 'x'\n", "no [[check]]"),
    ("[[check]]\nprobe = 'coin-flip'\n[[check]]\nprobe = 'coin-flip'\n", "names must differ"),
]


@pytest.mark.parametrize("text, where", BAD_CONFIGS, ids=[w for _, w in BAD_CONFIGS])
def test_bad_config_names_file_and_key(tmp_path, text, where):
    config = write(tmp_path, text, "ci.toml")
    if where != "check[0]":  # parse-level errors, checked without a subprocess
        with pytest.raises(GateConfigError, match=r"ci\.toml: .*" if where else ""):
            parse_config(text, str(config))
    proc, _ = gate(config, "--out", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert "ci.toml" in proc.stderr and where in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file_is_a_usage_error(tmp_path):
    proc, _ = gate(tmp_path / "nope.toml")
    assert proc.returncode == 2 and "nope.toml" in proc.stderr and "no such config file" in proc.stderr


SERVE_CHECKS = """
[[check]]
name = "coin"
probe = "coin-flip"
n = 4
concurrency = 4

[[check]]
name = "under-load"
probe = "{probe}"
n = 2
levels = [0, 3]
"""


@pytest.mark.slow
def test_gate_passes_on_batch_invariant_serve(server_invariant, small_load_probe, tmp_path):
    config = write(tmp_path, SERVE_CHECKS.format(probe=small_load_probe))
    proc, data = gate(config, "--json", "--model", "tiny", "--base-url", server_invariant.url,
                      "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert [c["status"] for c in data["gate"]["checks"]] == ["pass", "pass"]
    load = data["gate"]["checks"][1]
    assert [g["group"] for g in load["groups"]] == ["load=0", "load=3"]


def test_gate_fails_on_default_kernels_under_load(server_default, small_load_probe, tmp_path):
    # Whether fillers share the target's forward pass is up to timing over HTTP; 16 in
    # flight and 12 targets make it near certain (6 missed once on a loaded machine), and
    # the sizes they bring vary the CPU BLAS path.
    config = write(tmp_path, SERVE_CHECKS.format(probe=small_load_probe).replace("n = 2", "n = 12")
                   .replace("[0, 3]", "[0, 16]"))
    junit = tmp_path / "gate.xml"
    proc, data = gate(config, "--json", "--model", "tiny", "--base-url", server_default.url,
                      "--junit", str(junit), "--out", str(tmp_path))
    assert proc.returncode == 3, proc.stderr + proc.stdout
    load = data["gate"]["checks"][1]
    assert load["status"] == "fail" and "load=16" in load["message"]
    assert "load=0" not in load["message"]  # alone, the target is steady
    assert ET.parse(junit).getroot().find("testsuite").get("failures") in ("1", "2")
