"""Client-side rate limits (``--rpm``, ``--tpm``) as token buckets.

A hosted API answers too many requests with 429s; retrying them works, but costs
time and fills the failed-attempts log. Staying under the account's limits on our
side is cheaper. Each limit is a bucket that refills continuously at its rate and
holds at most ``BURST_S`` seconds' worth, so a run starts smoothly instead of
firing a minute's quota in its first second. Every attempt (retries included) takes
from the buckets before it is sent.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

# How many seconds of a limit may be spent at once. One second keeps the request
# rate steady while letting ``concurrency`` requests start together at modest rates.
BURST_S = 1.0
# What one request costs against --tpm when no tokenizer counts the prompt:
# OpenAI's rule of thumb of 4 characters per token.
CHARS_PER_TOKEN = 4


class TokenBucket:
    """``rate`` units per second, at most ``capacity`` stored.

    ``take(amount)`` waits until the bucket holds ``min(amount, capacity)`` and then
    removes ``amount``: a request larger than the bucket still goes (the level goes
    negative and later requests wait for it to refill), so no request waits forever.
    Waiters are served in arrival order (one lock), so no worker starves.
    """

    def __init__(self, rate: float, capacity: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep):
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"a rate limit must be a positive number, not {rate!r}")
        self.rate = float(rate)
        self.capacity = max(1.0, float(capacity))
        self._clock = clock
        self._sleep = sleep
        self._level = self.capacity
        self._updated = clock()
        self._lock: asyncio.Lock | None = None  # created inside the running loop

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._updated) * self.rate)
        self._updated = now

    async def take(self, amount: float = 1.0) -> float:
        """Remove ``amount``, waiting as long as needed; returns the seconds waited."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        waited = 0.0
        async with self._lock:
            need = min(amount, self.capacity)
            self._refill()
            if self._level < need:
                waited = (need - self._level) / self.rate
                await self._sleep(waited)
                self._refill()
                # The sleep was exactly long enough; a clock's rounding must not
                # leave the level a hair short (and the loop waiting for ever).
                self._level = max(self._level, need)
            self._level -= amount
        return waited


@dataclass
class RateLimits:
    """The run's limits: requests and tokens per minute, either may be None."""

    rpm: float | None = None
    tpm: float | None = None
    tokens_per_request: int | None = None  # what one request costs against tpm
    token_count: str | None = None  # how tokens_per_request was counted

    def __post_init__(self) -> None:
        self._buckets: list[tuple[TokenBucket, float]] = []
        if self.rpm:
            self._buckets.append((TokenBucket(self.rpm / 60, self.rpm / 60 * BURST_S), 1.0))
        if self.tpm:
            cost = float(self.tokens_per_request or 1)
            self._buckets.append((TokenBucket(self.tpm / 60, self.tpm / 60 * BURST_S), cost))

    @property
    def active(self) -> bool:
        return bool(self._buckets)

    async def acquire(self) -> float:
        """Wait until one more request fits under every limit; the seconds waited."""
        waited = 0.0
        for bucket, cost in self._buckets:
            waited += await bucket.take(cost)
        return waited

    def to_dict(self) -> dict[str, Any]:
        """For the manifest: what limited this run."""
        return {"rpm": self.rpm, "tpm": self.tpm,
                "tokens_per_request": self.tokens_per_request if self.tpm else None,
                "token_count": self.token_count if self.tpm else None}


def tokens_per_request(prompt_tokens: int | None, completion_tokens: int | None,
                       prompt_text: str) -> tuple[int, bool]:
    """What a request counts against --tpm, as providers count it: the prompt plus
    ``max_tokens`` (they reserve the most the reply may use). Returns (tokens,
    estimated?): estimated from the prompt's length when no tokenizer counted it."""
    estimated = prompt_tokens is None
    if prompt_tokens is None:
        prompt_tokens = math.ceil(len(prompt_text) / CHARS_PER_TOKEN)
    return max(1, prompt_tokens + (completion_tokens or 0)), estimated
