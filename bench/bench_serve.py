"""Throughput of ``detaudit serve`` on loopback: requests per second and latency at
rising concurrency, and whether every request was answered (200, or 429 with
Retry-After once the bounded queue is full). Prints figures; asserts nothing.

    python bench/bench_serve.py                       # default kernels, 200 requests per level
    python bench/bench_serve.py --kernels batch-invariant --requests 16 --levels 1,4
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.serve.conftest import COIN  # noqa: E402
from tests.servers.serve_process import Server  # noqa: E402


async def level(url: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    body = {"model": "tiny", "messages": COIN, "max_tokens": max_tokens, "temperature": 0,
            "logprobs": True, "top_logprobs": 20, "ignore_eos": True}
    statuses: Counter = Counter()
    latencies: list[float] = []
    todo = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def worker() -> None:
            for _ in todo:
                t0 = time.perf_counter()
                try:
                    response = await http.post(url + "/chat/completions", json=body)
                    status = response.status_code
                    if status == 429 and "retry-after" not in response.headers:
                        status = "429 without Retry-After"
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                latencies.append(time.perf_counter() - t0)
                statuses[status] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"concurrency": concurrency, "requests": requests, "elapsed_s": elapsed,
            "req_s": requests / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "statuses": dict(statuses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default="default", choices=["default", "batch-invariant"])
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-queue", type=int, default=256)
    args = parser.parse_args()

    server = Server("--kernels", args.kernels, "--max-batch", str(args.max_batch),
                    "--max-queue", str(args.max_queue))
    try:
        print(f"detaudit serve --kernels {args.kernels} --max-batch {args.max_batch} "
              f"--max-queue {args.max_queue}; {args.max_tokens} tokens per request")
        print(f"{'concurrency':>11} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  statuses")
        steps_before = server.health()["steps"]
        for concurrency in (int(c) for c in args.levels.split(",")):
            r = asyncio.run(level(server.url, args.requests, concurrency, args.max_tokens))
            print(f"{r['concurrency']:>11} {r['requests']:>8} {r['req_s']:>8.1f} {r['p50_ms']:>8.1f} "
                  f"{r['p99_ms']:>8.1f}  {r['statuses']}")
        steps = server.health()["steps"] - steps_before
        print(f"engine steps: {steps} (one request alone needs {args.max_tokens})")
    finally:
        code = server.stop()
        print(f"server exit code after SIGTERM: {code}")


if __name__ == "__main__":
    main()
