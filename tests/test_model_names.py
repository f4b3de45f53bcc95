"""Which backend a --model names: with --base-url (or --backend openai) it is the
server's name, path-like or not; the local-folder rule applies only without them."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from detaudit.cli import app
from tests.servers.fake_openai import outcome_states

TINY = "/srv/models/tiny"  # how vLLM, SGLang and transformers serve name a folder-served model


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_path_named_model_at_a_base_url_is_a_remote_name(fake_openai, tmp_path):
    fake_openai.configure(models=[TINY], states=outcome_states("Heads", [(-0.25, 1)]))
    result = cli("run", "--model", TINY, "--base-url", fake_openai.url, "--n", "3",
                 "--out", tmp_path, "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] == 3 and summary["run"]["backend"]["model"] == TINY
    assert {r["body"]["model"] for r in fake_openai.received} == {TINY}
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.endswith("-tiny")  # the run id takes the path's last part


def test_a_relative_path_at_a_base_url_is_sent_as_is(fake_openai, tmp_path):
    fake_openai.configure(models=["./models/tiny"], states=outcome_states("Heads", [(-0.25, 1)]))
    result = cli("run", "--model", "./models/tiny", "--base-url", fake_openai.url, "--n", "1",
                 "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert fake_openai.received[0]["body"]["model"] == "./models/tiny"


def test_a_missing_folder_without_a_base_url_is_still_refused(tmp_path):
    result = cli("run", "--model", str(tmp_path / "nope"), "--out", tmp_path / "results")
    assert result.exit_code == 2
    assert "no such model folder" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()
