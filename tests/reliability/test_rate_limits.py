"""--rpm and --tpm: the token buckets on a simulated clock, then real runs whose pacing is
read from the arrival times the fake server logged."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from detaudit.cost import count_openai_prompt
from detaudit.probes import load_probe
from detaudit.ratelimit import BURST_S, RateLimits, TokenBucket, tokens_per_request
from tests.reliability.helpers import MODEL, cli, manifest, only_run, remote
from tests.servers.fake_openai import Fault


class SimulatedClock:
    """Time that moves only when the bucket sleeps, so the arithmetic is exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_bucket_spends_its_burst_then_paces_at_its_rate():
    clock = SimulatedClock()
    bucket = TokenBucket(rate=2.0, capacity=3, clock=clock, sleep=clock.sleep)
    starts = []

    async def take_ten():
        for _ in range(10):
            await bucket.take()
            starts.append(clock.now)

    asyncio.run(take_ten())
    assert starts[:3] == [0.0, 0.0, 0.0]
    # Then one every 1/rate seconds.
    assert starts[3:] == pytest.approx([0.5 * k for k in range(1, 8)])


def test_a_request_bigger_than_the_bucket_still_goes_and_later_ones_wait_for_the_debt():
    clock = SimulatedClock()
    bucket = TokenBucket(rate=10.0, capacity=10, clock=clock, sleep=clock.sleep)

    async def scenario():
        await bucket.take(25)  # waits for a full bucket (it is full), goes into debt
        at_big = clock.now
        await bucket.take(5)  # level is -15: waits for 20 units at 10/s
        return at_big, clock.now

    assert asyncio.run(scenario()) == (0.0, pytest.approx(2.0))


def test_concurrent_takers_are_served_in_order_and_never_above_the_rate():
    clock = SimulatedClock()
    bucket = TokenBucket(rate=5.0, capacity=1, clock=clock, sleep=clock.sleep)
    served = []

    async def worker(name):
        for _ in range(4):
            await bucket.take()
            served.append((clock.now, name))

    async def main():
        await asyncio.gather(*(worker(i) for i in range(3)))

    asyncio.run(main())
    times = [t for t, _ in served]
    assert len(times) == 12 and times == sorted(times)
    assert all(b - a >= 0.2 - 1e-9 for a, b in zip(times, times[1:]))


@pytest.mark.parametrize("rate", [0, -1, math.inf, math.nan])
def test_a_bucket_refuses_a_rate_that_is_not_positive(rate):
    with pytest.raises(ValueError):
        TokenBucket(rate=rate, capacity=1)


def test_tokens_per_request_is_prompt_plus_max_tokens_or_an_estimate():
    assert tokens_per_request(20, 1, "ignored") == (21, False)
    assert tokens_per_request(None, 10, "x" * 40) == (20, True)
    assert tokens_per_request(None, None, "") == (1, True)


def arrival_offsets(fake) -> list[float]:
    times = [r["at"] for r in fake.received]
    return [t - times[0] for t in times]


def assert_never_faster(offsets: list[float], per_s: float, burst: float, slack: float = 0.2):
    """A token bucket's promise: by time t at most burst + rate * t requests have gone.
    ``slack`` seconds allow for delivery jitter between the client's release and the
    server's clock (new connections, a busy CPU); an unlimited run breaks it by far."""
    for k, t in enumerate(offsets):
        allowed = burst + per_s * t + 1e-9
        assert k + 1 <= allowed + per_s * slack, f"request {k + 1} at {t:.3f} s: over the limit"


def test_rpm_paces_a_real_run_and_is_in_the_manifest(fake_openai, tmp_path):
    rpm = 600  # 10 per second, burst of 10
    result = remote(fake_openai, tmp_path, "--n", "30", "--concurrency", "8",
                    "--rpm", str(rpm), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["ok"] == 30
    offsets = arrival_offsets(fake_openai)
    assert_never_faster(offsets, rpm / 60, rpm / 60 * BURST_S)
    assert offsets[-1] >= (30 - 10) / 10 - 0.1
    limits = manifest(only_run(tmp_path))["limits"]
    assert limits["rpm"] == rpm and limits["tpm"] is None
    assert manifest(only_run(tmp_path))["concurrency"] == 8


def test_retries_count_against_rpm(fake_openai, tmp_path):
    fake_openai.configure(faults=[Fault("status", status=500, headers={"Retry-After": "0"},
                                        on=set(range(0, 20, 2)))])
    # One request in flight, so every sample fails once (even arrival numbers) and then
    # succeeds: exactly 20 requests. With several in flight the count depends on timing.
    result = remote(fake_openai, tmp_path, "--n", "10", "--concurrency", "1", "--rpm", "600")
    assert result.exit_code == 0, result.stderr
    assert len(fake_openai.received) == 20
    assert_never_faster(arrival_offsets(fake_openai), 10, 10)


def test_tpm_counts_tokens_with_the_models_tokenizer(fake_openai, tmp_path):
    probe = load_probe("coin-flip")
    prompt, _, approximate = count_openai_prompt(probe, MODEL)
    assert not approximate
    per_request = prompt + int(probe.request["max_tokens"])
    tpm = per_request * 600  # 10 requests per second
    result = remote(fake_openai, tmp_path, "--n", "25", "--concurrency", "8", "--tpm", str(tpm))
    assert result.exit_code == 0, result.stderr
    limits = manifest(only_run(tmp_path))["limits"]
    assert limits["tpm"] == tpm and limits["tokens_per_request"] == per_request
    assert limits["token_count"].startswith("o200k")
    assert_never_faster(arrival_offsets(fake_openai), 10, 10)
    # Offsets count from the first arrival, which may come late (a new connection) while
    # the burst was already taken: 0.25 s of slack, against ~0.2 s for an unpaced run.
    assert arrival_offsets(fake_openai)[-1] >= (25 - 10) / 10 - 0.25


def test_an_unknown_model_gets_an_estimate_that_says_so(fake_openai, tmp_path):
    fake_openai.configure(models=["my-finetune"])
    result = cli("run", "--model", "my-finetune", "--base-url", fake_openai.url, "--out", tmp_path,
                 "--quiet", "--n", "2", "--tpm", "100000")
    assert result.exit_code == 0, result.stderr
    limits = manifest(only_run(tmp_path))["limits"]
    assert "approximate" in limits["token_count"] or "estimate" in limits["token_count"]


def test_without_limits_nothing_waits(fake_openai):
    limits = RateLimits()
    assert not limits.active
    assert asyncio.run(limits.acquire()) == 0.0
