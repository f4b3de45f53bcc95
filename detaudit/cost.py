"""What a run will cost, before it is sent: tokens per request times a price table.

Prompt tokens are counted the way the API bills them: tiktoken for OpenAI models
(offline, through ``detaudit.tokenization``), with the chat format's fixed overhead
(3 tokens per message, 1 per name, 3 that prime the reply); the bundled engine counts
with its own tokenizer and costs nothing. Completion tokens are counted at the
request's ``max_tokens``, so the estimate is an upper bound. A model tiktoken does not
know is counted with o200k_base and marked approximate. A load sweep's filler requests
are counted too, each at the largest filler (``detaudit.load.largest_filler``).

Prices are USD per million tokens (standard tier, as published in 2025); prices
change, so a TOML file can override or add models::

    [models."gpt-4o"]
    input = 2.50     # USD per 1M prompt tokens
    output = 10.00   # USD per 1M completion tokens
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from detaudit import tokenization
from detaudit.probes import Probe

PER_MILLION = 1_000_000
FALLBACK_ENCODING = "o200k_base"
TOKENS_PER_MESSAGE, TOKENS_PER_NAME, REPLY_PRIMING = 3, 1, 3

# model prefix -> (input, output) USD per 1M tokens; the longest matching prefix wins.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-5": (1.25, 10.00), "gpt-5-mini": (0.25, 2.00), "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00), "gpt-4.1-mini": (0.40, 1.60), "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60), "chatgpt-4o-latest": (5.00, 15.00),
    "gpt-4-turbo": (10.00, 30.00), "gpt-4": (30.00, 60.00), "gpt-3.5-turbo": (0.50, 1.50),
    "o1": (15.00, 60.00), "o1-mini": (1.10, 4.40), "o3": (2.00, 8.00), "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
}


class PriceError(ValueError):
    """A price file is malformed or a needed price is missing; the message says how to fix it."""


@dataclass
class Price:
    input: float  # USD per 1M prompt tokens
    output: float  # USD per 1M completion tokens
    source: str  # "built-in", a price file, or "local"


@dataclass
class CostPlan:
    """The estimate for ``requests`` identical requests, plus ``fillers`` filler
    requests at most (a load sweep against an endpoint)."""

    model: str
    requests: int
    prompt_tokens: int | None  # per request; None when no tokenizer can count them
    completion_tokens: int | None  # per request, at most (max_tokens)
    tokenizer: str
    approximate: bool
    price: Price | None
    fillers: int = 0
    filler_prompt_tokens: int | None = None  # per filler, at most
    filler_completion_tokens: int | None = None  # per filler, at most

    @property
    def per_request_usd(self) -> float | None:
        return self._usd(self.prompt_tokens, self.completion_tokens)

    @property
    def per_filler_usd(self) -> float | None:
        return self._usd(self.filler_prompt_tokens, self.filler_completion_tokens) \
            if self.fillers else 0.0

    @property
    def total_requests(self) -> int:
        return self.requests + self.fillers

    @property
    def total_usd(self) -> float | None:
        each, filler = self.per_request_usd, self.per_filler_usd
        if each is None or filler is None:
            return None
        return each * self.requests + filler * self.fillers

    def _usd(self, prompt: int | None, completion: int | None) -> float | None:
        if self.price is None or prompt is None or completion is None:
            return None
        return (prompt * self.price.input + completion * self.price.output) / PER_MILLION

    def affordable(self, budget_usd: float, fillers_each: int = 0) -> int:
        """How many of the requests fit in ``budget_usd`` at their upper-bound cost,
        each bringing ``fillers_each`` filler requests."""
        each, filler = self.per_request_usd, self.per_filler_usd if fillers_each else 0.0
        if each is None or filler is None:
            raise PriceError(f"no price is known for {self.model!r}, so --max-cost cannot be "
                             "enforced; give --prices FILE.toml with "
                             f'[models."{self.model}"] input = ... and output = ... (USD per 1M tokens)')
        each += filler * fillers_each
        if each == 0:
            return self.requests
        return min(self.requests, math.floor(max(0.0, budget_usd) / each * (1 + 1e-12)))

    def with_counts(self, requests: int, fillers: int) -> "CostPlan":
        return replace(self, requests=requests, fillers=fillers)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "requests": self.requests,
                "prompt_tokens_per_request": self.prompt_tokens,
                "completion_tokens_per_request_max": self.completion_tokens,
                "prompt_tokens": None if self.prompt_tokens is None else self.prompt_tokens * self.requests,
                "completion_tokens_max": None if self.completion_tokens is None
                else self.completion_tokens * self.requests,
                "tokenizer": self.tokenizer, "approximate": self.approximate,
                "price_per_million": asdict(self.price) if self.price else None,
                "cost_per_request_usd": self.per_request_usd,
                "filler_requests_max": self.fillers,
                "filler_prompt_tokens_per_request_max": self.filler_prompt_tokens,
                "filler_completion_tokens_per_request_max": self.filler_completion_tokens,
                "cost_per_filler_usd": self.per_filler_usd,
                "requests_total_max": self.total_requests, "cost_usd_max": self.total_usd}


def plan_run(probe: Probe, config: dict[str, Any], requests: int,
             prices_file: Path | None = None, fillers: int = 0) -> CostPlan:
    """The estimate for sending ``probe`` ``requests`` times to the backend of ``config``
    (the CLI's backend config: ``backend``, ``model``), with ``fillers`` filler
    requests of a load sweep beside them."""
    model = str(config["model"])
    completion = _max_completion_tokens(probe)
    if config.get("backend") == "local":
        prompt, tokenizer = count_local_prompt(probe, model)
        return CostPlan(model, requests, prompt, completion, tokenizer, False,
                        Price(0.0, 0.0, "local"))
    prompt, tokenizer, approximate = count_openai_prompt(probe, model)
    plan = CostPlan(model, requests, prompt, completion, tokenizer, approximate,
                    find_price(model, load_prices(prices_file) if prices_file else {}))
    if probe.kind == "load-sweep":
        from detaudit.load import largest_filler

        words = _word_counter(model)
        filler = largest_filler(probe, words)
        plan.fillers = fillers
        plan.filler_prompt_tokens = count_openai_prompt(filler, model)[0]
        plan.filler_completion_tokens = _max_completion_tokens(filler)
    return plan


def _word_counter(model: str):
    """Tokens of one word under ``model``'s encoding (characters when none loads)."""
    encoding = tokenization.load_encoding(tokenization.encoding_name(model) or FALLBACK_ENCODING)
    if encoding is None:
        return len
    return lambda text: len(encoding.encode(text, disallowed_special=()))


def count_openai_prompt(probe: Probe, model: str) -> tuple[int | None, str, bool]:
    """(prompt tokens, encoding name, approximate?) as OpenAI bills the request."""
    name = tokenization.encoding_name(model)
    approximate = name is None
    encoding = tokenization.load_encoding(name or FALLBACK_ENCODING)
    if encoding is None:
        return None, name or FALLBACK_ENCODING, approximate
    count = lambda text: len(encoding.encode(str(text), disallowed_special=()))  # noqa: E731
    if probe.api == "completions":
        return count(probe.request.get("prompt", "")), encoding.name, approximate
    return chat_tokens(probe.request.get("messages", []), count), encoding.name, approximate


def chat_tokens(messages: list[dict[str, Any]], count) -> int:
    """OpenAI's chat accounting: each message costs its fields' tokens plus 3 (plus 1
    for a name); 3 more prime the assistant's reply."""
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            total += count(value)
            if key == "name":
                total += TOKENS_PER_NAME
    return total


def count_local_prompt(probe: Probe, model: str) -> tuple[int | None, str]:
    """Prompt tokens under the bundled engine's own tokenizer (its chat template included)."""
    from local_backend.config import resolve_model_dir
    from local_backend.tokenizer import Tokenizer

    folder = resolve_model_dir(model)
    if not (folder / "tokenizer.json").is_file():
        return None, f"{model} (no tokenizer.json)"
    tokenizer = Tokenizer(folder)
    if probe.api == "chat":
        return len(tokenizer.encode_chat(probe.request.get("messages", []))), f"{model} tokenizer"
    return len(tokenizer.encode(probe.request.get("prompt", ""))), f"{model} tokenizer"


def _max_completion_tokens(probe: Probe) -> int | None:
    value = probe.request.get("max_completion_tokens") or probe.request.get("max_tokens")
    return int(value) if value is not None else None


def find_price(model: str, overrides: dict[str, Price] | None = None) -> Price | None:
    """The price of ``model``: an override wins over the built-in table; within each,
    the exact name, then the longest prefix ("gpt-4o-2024-08-06" -> "gpt-4o")."""
    name = model.strip().rsplit("/", 1)[-1]
    for table in (overrides or {}, {k: Price(*v, "built-in") for k, v in PRICES.items()}):
        if name in table:
            return table[name]
        for prefix in sorted(table, key=len, reverse=True):
            if name.startswith(prefix + "-"):
                return table[prefix]
    return None


def load_prices(path: Path) -> dict[str, Price]:
    """Read a price file (see the module docstring); PriceError says what is wrong where."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PriceError(f"{path}: cannot read the price file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise PriceError(f"{path}: not valid TOML ({exc})") from None
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise PriceError(f'{path}: expected tables like [models."gpt-4o"] with input = 2.5 '
                         "and output = 10.0 (USD per 1M tokens)")
    prices = {}
    for name, entry in models.items():
        where = f'{path}: models."{name}"'
        if not isinstance(entry, dict):
            raise PriceError(f"{where}: must be a table with input and output prices")
        values = []
        for key in ("input", "output"):
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise PriceError(f"{where}.{key}: give a number >= 0 (USD per 1M tokens), "
                                 f"got {value!r}")
            values.append(float(value))
        unknown = set(entry) - {"input", "output"}
        if unknown:
            raise PriceError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                             "only input and output are read")
        prices[str(name)] = Price(values[0], values[1], str(path))
    return prices
