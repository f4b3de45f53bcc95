"""Requests per second: a bare AsyncOpenAI loop vs detaudit's runner, same server, same run.

The fake OpenAI server runs in its own process (so it does not share the event loop
or the GIL with the client being measured) and answers at once. Both sides send the
coin-flip request (top-20 logprobs) at the same concurrency; detaudit also parses
every logprob text and stores every sample in a real run folder (SQLite, WAL).

    python bench/bench_runner.py                 # 10,000 requests each, concurrency 64
    python bench/bench_runner.py --n 2000 --rounds 4

On a busy machine single rounds vary by +-30%: use several rounds and read the best
of each side and the CPU time per request.

Goal: detaudit >= 0.9x the bare loop's req/s, and 10,000 requests in under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from detaudit.backends.openai_backend import OpenAIBackend  # noqa: E402
from detaudit.probes import load_probe  # noqa: E402
from detaudit.runner import run  # noqa: E402
from detaudit.store import RunStore  # noqa: E402

MODEL = "gpt-4o-mini"
SERVER = """
import sys
sys.path.insert(0, {root!r})
from tests.servers.fake_openai import FakeOpenAI

class NoLog(list):  # the test server logs every exchange; a bench must not grow its heap
    def append(self, item):
        pass

with FakeOpenAI() as fake:
    fake.sent, fake.received = NoLog(), NoLog()
    print(fake.url, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
"""


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER.format(root=str(ROOT))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


async def bare_loop(url: str, n: int, concurrency: int) -> tuple[float, float]:
    """What a careful script would do: one client, a fixed pool of workers, no storage."""
    probe = load_probe("coin-flip")
    client = openai.AsyncOpenAI(base_url=url, api_key="not-needed", max_retries=0)
    todo = iter(range(n))

    async def worker():
        for _ in todo:
            await client.chat.completions.create(model=MODEL, **probe.request)

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await client.close()
    return elapsed, cpu


async def detaudit_runner(url: str, n: int, concurrency: int, folder: str) -> tuple[float, float, int]:
    probe = load_probe("coin-flip")
    backend = OpenAIBackend(MODEL, url)
    store = RunStore.create(folder, f"bench-{time.time_ns()}", {"n": n, "status": "running"})
    t0, c0 = time.perf_counter(), time.process_time()
    result = await run(probe, backend, store, n, concurrency)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    stored = store.count()
    store.close()
    await backend.aclose()
    if result.ok != n:
        raise SystemExit(f"detaudit stored {result.ok} ok samples of {n} ({result.errors} errors)")
    return elapsed, cpu, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="requests per side per round")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two sides this many times")
    args = parser.parse_args()

    proc, url = start_server()
    print(f"fake server {url} (own process), n={args.n:,}, concurrency={args.concurrency}, "
          f"{os.cpu_count()} CPUs")
    bare_rates, ours_rates, bare_cpus, ours_cpus = [], [], [], []
    try:
        asyncio.run(bare_loop(url, 200, args.concurrency))  # warm both sides up
        with tempfile.TemporaryDirectory() as folder:
            for round_ in range(1, args.rounds + 1):
                # alternate who goes first, so neither side always meets a warmer server
                if round_ % 2:
                    bare, bare_cpu = asyncio.run(bare_loop(url, args.n, args.concurrency))
                ours, ours_cpu, stored = asyncio.run(
                    detaudit_runner(url, args.n, args.concurrency, folder))
                if not round_ % 2:
                    bare, bare_cpu = asyncio.run(bare_loop(url, args.n, args.concurrency))
                bare_rates.append(args.n / bare)
                ours_rates.append(args.n / ours)
                bare_cpus.append(bare_cpu / args.n * 1e6)
                ours_cpus.append(ours_cpu / args.n * 1e6)
                print(f"round {round_}: bare AsyncOpenAI {args.n / bare:7,.0f} req/s "
                      f"({bare:6.2f} s, {bare_cpus[-1]:5.0f} us CPU/req) | detaudit runner "
                      f"{args.n / ours:7,.0f} req/s ({ours:6.2f} s, {ours_cpus[-1]:5.0f} us CPU/req, "
                      f"{stored:,} stored) | ratio {bare / ours:.2f}")
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    bare_rate, ours_rate = max(bare_rates), max(ours_rates)
    print(f"best wall: bare {bare_rate:,.0f} req/s, detaudit {ours_rate:,.0f} req/s, "
          f"ratio {ours_rate / bare_rate:.2f} (goal >= 0.90); 10,000 requests: "
          f"{10_000 / ours_rate:.1f} s (goal < 60 s)")
    print(f"client CPU per request (steadier on a busy machine): bare {min(bare_cpus):.0f} us, "
          f"detaudit {min(ours_cpus):.0f} us, ratio {min(bare_cpus) / min(ours_cpus):.2f}")

if __name__ == "__main__":
    main()
