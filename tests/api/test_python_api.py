"""The Python API (``detaudit.run``, ``detaudit.open_run``, ``Run``), as a user calls it:
the README's own examples run against the bundled tiny model and against the fake
OpenAI server on 127.0.0.1, and the summary checked against what the CLI prints."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import detaudit
from detaudit.cli import app
from tests.servers.fake_openai import outcome_states

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gpt-4o-mini"


def readme_examples() -> list[str]:
    """The ```python blocks of the README's "Python API" section, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def substitute(code: str, old: str, new: str) -> str:
    assert old in code, f"the README example no longer contains {old!r}"
    return code.replace(old, new)


def cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_readme_example_runs_on_the_bundled_engine(tmp_path, monkeypatch, capsys):
    code = substitute(readme_examples()[0], "detaudit.run(n=20)", "detaudit.run(n=4)")
    monkeypatch.chdir(tmp_path)  # out="results": relative to where the user is
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    run = namespace["run"]
    assert run.path.parent == Path("results") and (tmp_path / run.path / "manifest.json").is_file()
    summary = namespace["summary"]
    assert (summary["n"], summary["ok"], summary["errors"]) == (4, 4, 0)
    assert summary["run"]["backend"]["kernels"] == "batch-invariant"
    # batch sizes 1, 3, 8, 32: one logprob for every batch (batch-invariant kernels)
    assert summary["tokens"][0]["distinct_logprobs"] == 1
    df = namespace["df"]
    assert isinstance(df, pd.DataFrame)
    assert len(df) == 4 * len(summary["tokens"])  # one row per sample and tracked token
    assert sorted(df["group"].unique()) == ["1", "3", "32", "8"]
    printed = capsys.readouterr().out
    assert "distinct logprob(s) in 4 samples" in printed


@pytest.fixture
def readme_test(fake_openai):
    """The README's pytest example, pointed at the fake server, as a function to call."""
    code = substitute(readme_examples()[1],
                      'model="my-model", base_url="http://localhost:8000/v1", n=200',
                      f'model="{MODEL}", base_url="{fake_openai.url}", n=30')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace["test_server_gives_the_same_answer_twice"]


def test_readme_pytest_example_passes_on_a_deterministic_server(fake_openai, readme_test, tmp_path):
    fake_openai.configure(states=outcome_states("Heads", [(-0.25, 1)], alternatives={"T": -1.5}))
    readme_test(tmp_path)
    assert len(fake_openai.received) == 30
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "manifest.json").read_text())["backend_config"]["base_url"] == fake_openai.url


def test_readme_pytest_example_fails_on_a_nondeterministic_server(fake_openai, readme_test, tmp_path):
    fake_openai.configure(states=outcome_states("Heads", [(-0.25, 2), (-0.2500001, 1)],
                                                alternatives={"T": -1.5}))
    with pytest.raises(AssertionError, match="Heads: 2 distinct logprobs"):
        readme_test(tmp_path)


def test_summary_is_exactly_what_the_cli_prints(fake_openai, tmp_path):
    fake_openai.configure(states=outcome_states("Heads", [(-0.25, 2), (-0.2500001, 1)],
                                                alternatives={"T": -1.5}))
    run = detaudit.run(model=MODEL, base_url=fake_openai.url, n=12, out=tmp_path / "api",
                       concurrency=3, max_tokens=1)
    report = cli("report", run.path, "--json", "--threshold-pct", "0.001")
    assert report.exit_code == 0, report.stderr
    assert detaudit.open_run(run.path).summary(threshold_pct=0.001) == json.loads(report.stdout)
    # a fresh run's summary is run --json's: the same keys, the session facts included
    printed = cli("run", "--model", MODEL, "--base-url", fake_openai.url, "--n", "12",
                  "--out", tmp_path / "cli", "--quiet", "--json")
    assert printed.exit_code == 0, printed.stderr
    cli_summary, api_summary = json.loads(printed.stdout), run.summary()
    assert api_summary.keys() == cli_summary.keys()
    assert api_summary["run"].keys() == cli_summary["run"].keys()
    assert api_summary["run"]["sent"] == 12 and api_summary["tokens"][0]["distinct_logprobs"] == 2
    # both runs went through one session layer: the same manifest fields
    manifests = [json.loads((p / "manifest.json").read_text())
                 for p in (run.path, next((tmp_path / "cli").iterdir()))]
    assert manifests[0].keys() == manifests[1].keys()
    assert manifests[0]["limits"]["max_attempts"] == 5
    assert manifests[0]["probe"]["request"]["max_tokens"] == 1  # the override was sent
    assert all(r["body"]["max_tokens"] == 1 for r in fake_openai.received)


def test_samples_is_one_row_per_sample_and_tracked_token(fake_openai, tmp_path):
    fake_openai.configure(states=outcome_states("Heads", [(-0.25, 2), (-0.2500001, 1)],
                                                alternatives={"T": -1.5}))
    run = detaudit.run(model=MODEL, base_url=fake_openai.url, n=9, out=tmp_path)
    df = run.samples()
    assert list(df.columns[:5]) == ["index", "slot", "label", "token", "position"]
    assert len(df) == 9 * 2 and set(df["label"]) == {"Heads", "Tails"}
    heads = df[df["label"] == "Heads"]
    assert heads["logprob"].value_counts().to_dict() == {-0.25: 6, -0.2500001: 3}
    # the texts the server sent, as received
    assert set(heads["logprob_text"].astype(float)) == {-0.25, -0.2500001}


def test_bad_input_raises_a_clear_error_and_stores_nothing(tmp_path):
    with pytest.raises(detaudit.ProbeError, match="no-such-probe"):
        detaudit.run(probe="no-such-probe", out=tmp_path)
    with pytest.raises(detaudit.UsageProblem, match="--base-url is for remote models"):
        detaudit.run(backend="local", base_url="http://127.0.0.1:9/v1", out=tmp_path)
    with pytest.raises(TypeError, match="unknown options colour"):
        detaudit.run(colour="red", out=tmp_path)
    with pytest.raises(detaudit.UsageProblem, match="positive whole number"):
        detaudit.run(model=MODEL, base_url="http://127.0.0.1:9/v1", n=0, out=tmp_path)
    with pytest.raises(detaudit.StoreError):
        detaudit.open_run(tmp_path / "missing")
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_fails_raises_with_the_stored_resumable_run(fake_openai, tmp_path):
    fake_openai.configure(api_key="sk-right")  # 401 for any other key: not retried
    with pytest.raises(detaudit.RunFailed, match="--resume") as failed:
        detaudit.run(model=MODEL, base_url=fake_openai.url, n=5, out=tmp_path, max_attempts=1)
    run = failed.value.run
    assert run.path.parent == tmp_path and run.manifest["status"] == "failed"
    assert run.summary()["ok"] == 0


def test_import_detaudit_is_light():
    """``import detaudit`` (and the CLI) load no pandas, scipy, torch, openai or matplotlib."""
    code = ("import sys, detaudit, detaudit.cli; detaudit.run; detaudit.open_run; "
            "heavy = [m for m in ('pandas', 'scipy', 'torch', 'openai', 'matplotlib') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_run_works_inside_a_running_event_loop(fake_openai, tmp_path):
    """A notebook cell runs inside an event loop: ``detaudit.run`` must not need its own."""
    import asyncio

    fake_openai.configure(states=outcome_states("Heads", [(-0.25, 1)], alternatives={"T": -1.5}))

    async def cell():
        return detaudit.run(model=MODEL, base_url=fake_openai.url, n=6, out=tmp_path)

    run = asyncio.run(cell())
    assert run.summary()["ok"] == 6 and len(fake_openai.received) == 6
