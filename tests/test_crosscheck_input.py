"""``detaudit crosscheck`` on what cannot be scored exactly: how sampled tokens map to
reference ids, and bad input (text-only runs, error rows, unknown tokens, a prompt the
server counted otherwise, bad flags) -> counted samples or one clear line, exit 2,
and the run folder untouched."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from detaudit.cli import app
from detaudit.records import Position
from detaudit.reference import TokenMap
from local_backend.config import TINY_DIR
from local_backend.tokenizer import Tokenizer
from tests.servers.fake_openai import Fault, State

COLOUR = "Name a colour please."  # 12 tokens under tiny's chat template, as the fake server reports


def cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def only_run(out: Path) -> Path:
    (run_dir,) = out.iterdir()
    return run_dir


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert lines[0].startswith("error: ")
    return " ".join(lines)


def position(token: str, data: bytes | None = None) -> Position:
    return Position(token=token, logprob=-1.0, logprob_text="-1.0",
                    bytes=list(data) if data is not None else None)


# ---- token ids ----------------------------------------------------------------------------


def test_every_reference_token_maps_back_to_its_own_id():
    tokenizer = Tokenizer(TINY_DIR)
    tokens = TokenMap.of(tokenizer)
    for i in range(tokenizer.vocab_size):
        text, data = tokenizer.token_text(i), tokenizer.token_bytes(i)
        assert tokens.lookup(position(text, data)) == (i, None)  # chat: bytes
        assert tokens.lookup(position(text)) == (i, None)  # completions: the text alone
        assert tokens.lookup(position(f"token_id:{i}")) == (i, None)


def test_partial_utf8_and_unknown_tokens():
    tokenizer = Tokenizer(TINY_DIR)
    tokens = TokenMap.of(tokenizer)
    first = tokenizer.encode("☃", add_special_tokens=False)[0]  # a byte token: b"\xe2"
    assert tokens.lookup(position("bytes:\\xe2")) == (first, None)
    assert tokens.lookup(position("☃", "☃".encode())) == (None, "unmapped_token")  # three tokens, not one
    assert tokens.lookup(position("no such token")) == (None, "unmapped_token")
    assert tokens.lookup(position(f"token_id:{tokenizer.vocab_size}")) == (None, "unmapped_token")


def test_a_spelling_several_ids_share_is_ambiguous_never_guessed():
    tokens = TokenMap(["a", "b", "a"], [b"a", b"b", b"a"])
    assert tokens.lookup(position("a")) == (None, "ambiguous_token")
    assert tokens.lookup(position("a", b"a")) == (None, "ambiguous_token")
    assert tokens.lookup(position("b", b"b")) == (1, None)


# ---- runs that cannot be scored, or only partly --------------------------------------------


@pytest.fixture(scope="module")
def text_only_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text-only")
    result = cli("run", "--n", "2", "--batch-sizes", "1", "--no-logprobs", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    return only_run(out)


@pytest.fixture(scope="module")
def coin_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coin")
    result = cli("run", "--n", "2", "--batch-sizes", "1", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    return only_run(out)


def test_a_text_only_run_is_refused_before_a_model_loads(text_only_run):
    before = digest(text_only_run)
    message = one_error_line(cli("crosscheck", text_only_run, "--reference", "tiny"))
    assert "text-only run" in message and "--no-logprobs" in message
    assert digest(text_only_run) == before


@pytest.mark.parametrize("args, expected", [
    (["--reference", "/no/such/model"], "not a folder"),
    (["--reference", "tiny", "--engine", "transformers", "--kernels", "default"], "--kernels"),
    (["--reference", "tiny", "--dtype", "float8"], "dtype"),
])
def test_bad_flags_are_one_line(coin_run, args, expected):
    before = digest(coin_run)
    assert expected in one_error_line(cli("crosscheck", coin_run, *args))
    assert digest(coin_run) == before


def test_a_gate_that_is_not_a_number_is_refused(coin_run):
    for value in ("nan", "inf"):
        result = cli("crosscheck", coin_run, "--reference", "tiny", "--max-abs-diff", value)
        assert result.exit_code == 2 and "--max-abs-diff" in result.stderr and "Traceback" not in result.output


def test_not_a_run_folder(tmp_path):
    assert str(tmp_path / "missing") in one_error_line(cli("crosscheck", tmp_path / "missing", "--reference", "tiny"))


def test_the_coin_flip_in_process_is_bitwise_and_untouched(coin_run):
    before = digest(coin_run)
    result = cli("crosscheck", coin_run, "--reference", "tiny", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["tokens"], data["bitwise_equal"], data["max_abs_diff"]) == (2, 1.0, 0.0)
    assert data["pearson"] is None  # one token value on both sides: no correlation to speak of
    assert digest(coin_run) == before


def fake_run(fake, out: Path, prompt: str, n: int = 8) -> Path:
    """A run of the top-logprobs probe against the fake server: its answers are one
    token, "Heads" (in tiny's vocabulary) or a snowman (no single tiny token)."""
    result = cli("run", "--probe", "top-logprobs", "--prompt", prompt, "--model", "tiny",
                 "--base-url", fake.url, "--n", str(n), "--concurrency", "1", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    return only_run(out)


def stored_rows(run_dir: Path) -> list[tuple[str, list]]:
    with sqlite3.connect(run_dir / "samples.sqlite") as db:
        rows = db.execute("SELECT status, positions FROM sample_rows ORDER BY idx").fetchall()
    return [(status, json.loads(positions) if positions else []) for status, positions in rows]


def test_errors_and_unknown_tokens_are_counted_and_skipped(fake_openai, tmp_path):
    fake_openai.configure(models=["tiny"], states=[State([{"Heads": -0.25, "T": -1.5}], weight=3),
                                  State([{"☃": -0.5, "Heads": -1.0}], weight=1)],
                          faults=[Fault("status", status=400, on={5})])
    run_dir = fake_run(fake_openai, tmp_path, COLOUR)
    rows = stored_rows(run_dir)
    errors = sum(status != "ok" for status, _ in rows)
    snowmen = sum(status == "ok" and p[0]["token"] == "☃" for status, p in rows)
    heads = sum(status == "ok" and p[0]["token"] == "Heads" for status, p in rows)
    assert errors == 1 and snowmen >= 1 and heads >= 1 and errors + snowmen + heads == 8
    result = cli("crosscheck", run_dir, "--reference", "tiny", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["samples"]["total"] == 8
    assert data["samples"]["scored"] == heads == data["tokens"]
    assert data["samples"]["skipped"] == {"error": errors, "unmapped_token": snowmen}
    named = {p["why"] for p in data["samples"]["problems"]}
    assert named == {"error", "unmapped_token"}
    assert any(p.get("token") == "☃" and p.get("position") == 0 for p in data["samples"]["problems"])
    # the terminal report says so too
    text = cli("crosscheck", run_dir, "--reference", "tiny")
    assert text.exit_code == 0 and f"skipped: {snowmen} samples, unmapped_token" in text.stdout


def test_a_prompt_the_server_counted_otherwise_is_never_scored(fake_openai, tmp_path):
    """The fake server says 12 prompt tokens; the coin flip is 14 under tiny."""
    fake_openai.configure(models=["tiny"])
    run_dir = fake_run(fake_openai, tmp_path, "Flip a coin. Return Heads or Tails only.", n=3)
    message = one_error_line(cli("crosscheck", run_dir, "--reference", "tiny"))
    assert "no sampled token could be scored" in message
    assert "3 prompt_mismatch" in message and "'server': 12, 'reference': 14" in message
