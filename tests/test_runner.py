"""The runner against the fake OpenAI server: counts, retries, errors kept, resume."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from detaudit.backends.openai_backend import OpenAIBackend
from detaudit.probes import load_probe
from detaudit.runner import RetryPolicy, group_of, resolve_tracked, run
from detaudit.records import Completion
from detaudit.store import RunStore
from tests.servers.fake_openai import Fault, outcome_states

MODEL = "gpt-4o-mini"


def start(tmp_path, n, name="run"):
    probe = load_probe("coin-flip")
    store = RunStore.create(tmp_path, name, {"n": n, "status": "running"})
    return probe, store


async def send(fake, probe, store, n, concurrency=8, **kwargs):
    backend = OpenAIBackend(MODEL, fake.url)
    try:
        return await run(probe, backend, store, n, concurrency, **kwargs)
    finally:
        await backend.aclose()


def test_every_index_is_stored_once_with_what_the_server_sent(fake_openai, tmp_path):
    fake_openai.configure(states=outcome_states("Heads", [(-0.25, 3), (-0.2500001, 2), (-0.3, 1)],
                                                alternatives={"T": -1.5}))
    probe, store = start(tmp_path, 60)
    result = asyncio.run(send(fake_openai, probe, store, 60, concurrency=7))
    assert (result.status, result.ok, result.errors, result.sent) == ("complete", 60, 0, 60)
    assert len(fake_openai.received) == 60  # nothing cached, nothing sent twice
    samples = store.samples()
    assert [s.index for s in samples] == list(range(60))
    sent_texts = [t for entry in fake_openai.sent for t in entry["logprobs"]]
    stored = [s.completion.positions[0].logprob_text for s in samples]
    assert all(text in sent_texts for text in stored)
    values = sorted(float(t) for t in stored)
    assert values.count(-0.25) == 30 and values.count(-0.2500001) == 20 and values.count(-0.3) == 10
    assert all(s.attempts == 1 and s.latency_s > 0 and s.started_at > 0 for s in samples)
    assert store.manifest["status"] == "complete" and store.manifest["ended_at"]
    store.close()


def test_429_is_retried_after_the_servers_retry_after(fake_openai, tmp_path):
    fake_openai.configure(faults=[Fault("status", status=429, headers={"Retry-After": "0.3"},
                                        on={0, 1})])
    probe, store = start(tmp_path, 3)
    t0 = time.perf_counter()
    result = asyncio.run(send(fake_openai, probe, store, 3, concurrency=1))
    elapsed = time.perf_counter() - t0
    assert (result.ok, result.errors) == (3, 0)
    assert elapsed >= 0.6  # two waits of the server's 0.3 s, not the 0.5 s default backoff
    first = store.samples()[0]
    assert first.status == "ok" and first.attempts == 3
    log = store.failed_attempts()
    assert [(e["index"], e["attempt"], e["error_kind"], e["retry_after"]) for e in log] == \
        [(0, 1, "rate_limit", 0.3), (0, 2, "rate_limit", 0.3)]
    store.close()


def test_an_index_that_keeps_failing_is_stored_as_an_error_not_dropped(fake_openai, tmp_path):
    fake_openai.configure(faults=[Fault("status", status=503, on={0, 1, 2})])
    probe, store = start(tmp_path, 4)
    result = asyncio.run(send(fake_openai, probe, store, 4, concurrency=1, max_attempts=3,
                              backoff_base_s=0.01))
    assert (result.status, result.ok, result.errors) == ("complete", 3, 1)
    samples = store.samples()
    assert len(samples) == 4
    assert (samples[0].status, samples[0].error_kind, samples[0].attempts) == ("error", "server_error", 3)
    assert "503" in samples[0].error_message
    assert len(fake_openai.received) == 3 + 3
    store.close()


def test_non_retryable_errors_are_not_retried(fake_openai, tmp_path):
    fake_openai.configure(faults=[Fault("status", status=400, on={0})])
    probe, store = start(tmp_path, 2)
    result = asyncio.run(send(fake_openai, probe, store, 2, concurrency=1))
    assert (result.ok, result.errors) == (1, 1)
    assert store.samples()[0].attempts == 1 and store.samples()[0].error_kind == "bad_request"
    assert len(fake_openai.received) == 2
    store.close()


def test_an_unknown_model_stops_the_run_early(fake_openai, tmp_path):
    probe, store = start(tmp_path, 500)
    backend = OpenAIBackend("no-such-model", fake_openai.url)

    async def go():
        try:
            return await run(probe, backend, store, 500, 4)
        finally:
            await backend.aclose()

    result = asyncio.run(go())
    assert result.status == "failed" and "not_found" in result.reason
    assert len(fake_openai.received) <= 8  # the requests in flight, not 500
    assert store.manifest["status"] == "failed"
    store.close()


def test_a_cancelled_run_is_marked_interrupted_and_resumes_to_exactly_n(fake_openai, tmp_path):
    n = 40
    fake_openai.configure(delay=0.02)
    probe, store = start(tmp_path, n)

    async def interrupted():
        task = asyncio.create_task(send(fake_openai, probe, store, n, concurrency=4))
        while store.count() < 12:
            await asyncio.sleep(0.01)
        task.cancel()  # what asyncio.run does on Ctrl-C
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    store.close()
    reopened = RunStore.open(tmp_path / "run")
    assert reopened.manifest["status"] == "interrupted"
    stored_before = reopened.count()
    assert 12 <= stored_before < n
    sent_before = len(fake_openai.received)

    result = asyncio.run(send(fake_openai, probe, reopened, n, concurrency=4))
    assert result.status == "complete" and result.sent == n - stored_before
    assert len(fake_openai.received) - sent_before == n - stored_before  # only the missing ones
    assert [s.index for s in reopened.samples()] == list(range(n))
    assert reopened.manifest["status"] == "complete"
    reopened.close()


def test_resuming_a_complete_run_sends_nothing(fake_openai, tmp_path):
    probe, store = start(tmp_path, 5)
    asyncio.run(send(fake_openai, probe, store, 5))
    before = len(fake_openai.received)
    result = asyncio.run(send(fake_openai, probe, store, 5))
    assert (result.status, result.sent, result.ok) == ("complete", 0, 5)
    assert len(fake_openai.received) == before
    store.close()


def test_backoff_is_full_jitter_capped_and_honours_retry_after():
    policy = RetryPolicy(max_attempts=5, base_s=0.5, max_s=4.0)
    rng = random.Random(1)
    for attempt in range(1, 8):
        ceiling = min(4.0, 0.5 * 2 ** (attempt - 1))
        delays = [policy.delay(attempt, None, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.8 * ceiling  # it spreads over the whole range
    assert policy.delay(1, 2.5, rng) == 2.5
    assert policy.delay(1, 600.0, rng) == 4.0


def test_group_comes_from_the_backends_extra():
    assert group_of(Completion("x", extra={"batch_size": 8, "batch_position": 2})) == "8"
    assert group_of(Completion("x", extra={"load_level": 16})) == "16"
    assert group_of(Completion("x")) is None


def test_tracked_tokens_come_from_the_backends_tokenizer(fake_openai):
    backend = OpenAIBackend("gpt-4o", fake_openai.url)
    tracked = resolve_tracked(load_probe("coin-flip"), backend)
    asyncio.run(backend.aclose())
    assert tracked == [{"label": "Heads", "token": "Heads", "position": 0},
                       {"label": "Tails", "token": "T", "position": 0}]
    unknown = OpenAIBackend("some-local-llama", fake_openai.url)
    assert [t["token"] for t in resolve_tracked(load_probe("coin-flip"), unknown)] == [None, None]
    asyncio.run(unknown.aclose())
    assert resolve_tracked(load_probe("top-logprobs"), unknown)[0]["position"] == "all"
