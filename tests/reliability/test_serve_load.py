"""Loopback load on the real `detaudit serve` subprocess, bounded in count and time:
every request is answered (200, or 429 with Retry-After when the bounded queue is
full), clients that honour Retry-After all get their answer, and the server is
healthy and stops cleanly afterwards. Throughput figures: bench/bench_serve_load.py."""

from __future__ import annotations

import asyncio

import pytest

from bench.bench_serve_load import load
from tests.servers.serve_process import Server


@pytest.fixture(scope="module")
def small_server():
    """Plain torch kernels (fast on CPU); 4 slots and 2 queued, so a burst overflows."""
    server = Server("--kernels", "default", "--max-batch", "4", "--max-queue", "2")
    yield server
    assert server.stop() == 0


def test_a_burst_beyond_the_queue_gets_200s_and_429s_with_retry_after(small_server):
    result = asyncio.run(asyncio.wait_for(
        load(small_server.url, concurrency=48, requests=96, retry_429=False), 120))
    assert not result.errors and not result.other, (result.errors, result.other)
    assert result.retry_after_missing == 0
    assert result.ok + result.refused == 96 and result.ok >= 6
    assert result.refused > 0  # 48 clients, 6 places: the bounded queue said no
    assert result.answered_every_request


def test_clients_that_honour_retry_after_all_get_answers(small_server):
    result = asyncio.run(asyncio.wait_for(
        load(small_server.url, concurrency=32, requests=64, max_retry_wait_s=1.0), 120))
    assert (result.ok, result.other, result.errors) == (64, {}, [])
    # Batched: far fewer forward passes than requests (each needs one pass alone).
    assert result.steps < 64
    health = small_server.health()
    assert health["status"] == "ok" and health["in_flight"] == 0
