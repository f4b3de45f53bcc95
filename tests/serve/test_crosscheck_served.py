"""``detaudit crosscheck`` end to end: completions sampled from a real ``detaudit serve``,
stored by ``detaudit run``, teacher-forced through a reference model.

- batch-invariant server vs the local engine with batch-invariant kernels: every
  token bitwise equal (prefill = decode, through HTTP, JSON and the store);
- default kernels under load (concurrent requests, so batches vary): not all equal,
  max |Δ| small, and ``--max-abs-diff`` gates on it (exit 3);
- transformers as the reference: max |Δ| below 2e-3.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from detaudit.analysis.frame import parse_logprob_text
from detaudit.api import crosscheck as api_crosscheck
from tests.serve.conftest import detaudit, json_out

N = 12
# Sampled at temperature 1 without a seed: each repeat writes its own sentence, so many
# distinct completions (and positions) are checked.
CHAT_PROBE = """\
name = "sea-sampled"
kind = "fixed-seed"
[request]
messages = [{ role = "user", content = "Write one sentence about the sea." }]
max_tokens = 10
temperature = 1.0
logprobs = true
top_logprobs = 2
"""
# The legacy completions API: tokens come back as text only (no bytes).
COMPLETIONS_PROBE = """\
name = "sea-sampled-completions"
kind = "fixed-seed"
api = "completions"
[request]
prompt = "<|user|>Write one sentence about the sea.<|eos|><|assistant|>"
max_tokens = 10
temperature = 1.0
logprobs = true
top_logprobs = 2
"""


def stored_run(url: str, probe_text: str, out: Path, concurrency: int = 6) -> str:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / "probe.toml"
    probe.write_text(probe_text)
    proc = detaudit("run", "--probe", str(probe), "--model", "tiny", "--base-url", url, "--n", str(N),
                    "--concurrency", str(concurrency), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    return json_out(proc)["run"]["dir"]


def crosscheck(run_dir: str, *args: str) -> tuple[int, dict]:
    """The command, as a user runs it: (exit code, its JSON)."""
    proc = detaudit("crosscheck", run_dir, "--reference", "tiny", "--json", *args)
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode, json_out(proc)


def crosscheck_api(run_dir: str, **options) -> dict:
    """The Python API (the command's JSON without its gate), in process: no start-up."""
    return api_crosscheck(run_dir, reference="tiny", **options).to_dict()


def stored_positions(run_dir: str) -> dict[int, list[dict]]:
    with sqlite3.connect(Path(run_dir) / "samples.sqlite") as db:
        rows = db.execute("SELECT idx, positions FROM sample_rows WHERE status = 'ok'").fetchall()
    return {idx: json.loads(positions) for idx, positions in rows}


@pytest.fixture(scope="module")
def invariant_runs(server_invariant, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("crosscheck-invariant")
    return {"chat": stored_run(server_invariant.url, CHAT_PROBE, root / "chat"),
            "completions": stored_run(server_invariant.url, COMPLETIONS_PROBE, root / "completions")}


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_batch_invariant_server_is_bitwise_the_local_engine(invariant_runs, api):
    run_dir = invariant_runs[api]
    if api == "chat":
        code, data = crosscheck(run_dir, "--engine", "local", "--kernels", "batch-invariant",
                                "--max-abs-diff", "0")
        assert code == 0 and data["gate"] == {"max_abs_diff": 0.0, "passed": True, "exit_code": 0}
    else:
        data = crosscheck_api(run_dir, engine="local", kernels="batch-invariant")
    positions = stored_positions(run_dir)
    scored_tokens = sum(len(p) for p in positions.values())
    assert data["tokens"] == scored_tokens >= 10
    assert data["samples"]["total"] == N
    assert data["samples"]["scored"] == sum(1 for p in positions.values() if p)
    assert set(data["samples"]["skipped"]) <= {"empty"}  # answers that ended at once
    assert data["samples"]["distinct_completions"] >= 2
    assert data["bitwise_equal"] == 1.0 and data["bitwise_equal_tokens"] == data["tokens"]
    assert data["max_abs_diff"] == data["mean_abs_diff"] == data["k3_kl"] == 0.0
    assert data["worst"] == []
    assert all(p["bitwise_equal"] == 1.0 for p in data["by_position"])
    assert data["reference"]["engine"] == "local" and data["reference"]["kernels"] == "batch-invariant"


def test_transformers_reference_is_close(invariant_runs):
    run_dir = invariant_runs["chat"]
    data = crosscheck_api(run_dir, engine="transformers")
    assert data["tokens"] == sum(len(p) for p in stored_positions(run_dir).values())
    assert 0 <= data["max_abs_diff"] < 2e-3
    assert data["pearson"] > 0.999
    assert data["reference"]["engine"] == "transformers" and data["reference"]["dtype"] == "float32"


def test_default_kernels_under_load_are_not_bitwise_but_close(server_default, tmp_path):
    run_dir = stored_run(server_default.url, CHAT_PROBE, tmp_path, concurrency=N)
    data = crosscheck_api(run_dir, engine="local", kernels="batch-invariant")
    assert data["tokens"] >= 10
    assert data["bitwise_equal"] < 1.0
    assert 0 < data["max_abs_diff"] < 1e-3
    assert data["k3_kl"] > 0
    # the worst tokens are stored tokens, their |Δ| the difference of the two logprobs
    positions = stored_positions(run_dir)
    worst = data["worst"]
    assert worst and worst[0]["abs_diff"] == data["max_abs_diff"]
    for w in worst:
        stored = positions[w["index"]][w["position"]]
        assert (stored["token"], stored["logprob_text"]) == (w["token"], w["server_logprob_text"])
        assert w["server_logprob"] == parse_logprob_text(stored["logprob_text"])
        assert w["abs_diff"] == abs(w["server_logprob"] - w["reference_logprob"]) > 0

    # the gate: beyond --max-abs-diff exits 3, within it 0
    code, gated = crosscheck(run_dir, "--max-abs-diff", f"{data['max_abs_diff'] / 2!r}")
    assert code == 3 and gated["gate"] == {"max_abs_diff": data["max_abs_diff"] / 2, "passed": False,
                                           "exit_code": 3}
    assert {k: gated[k] for k in ("tokens", "bitwise_equal", "max_abs_diff")} == \
        {k: data[k] for k in ("tokens", "bitwise_equal", "max_abs_diff")}
    proc = detaudit("crosscheck", run_dir, "--reference", "tiny", "--max-abs-diff", f"{data['max_abs_diff']!r}")
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout and "bitwise equal" in proc.stdout and "largest differences" in proc.stdout
