"""Load on `detaudit serve`: does it answer every request and hold its throughput?

Starts `detaudit serve` as a subprocess on 127.0.0.1 (a free port), then for each
concurrency level sends a fixed number of coin-flip requests (max_tokens 1, top-20
logprobs) from that many concurrent clients. Every answer must be 200, or 429 with
Retry-After once the bounded queue is full; a client that gets 429 waits as told
and sends again, so every request ends in a 200. Printed per level: completed req/s,
429s, latency p50/p99 (of the 200s, including waits after 429), forward passes.

    python bench/bench_serve_load.py                       # default kernels, levels 1,8,32,128
    python bench/bench_serve_load.py --kernels batch-invariant --requests 40 --levels 1,8
    python bench/bench_serve_load.py --max-batch 8 --max-queue 8   # show the 429 path

On CPU the batch-invariant kernels run under the Triton interpreter (about 0.3 s per
forward pass): give them few requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.servers.serve_process import Server  # noqa: E402  (the same helper the tests use)

COIN = {"model": "tiny", "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20,
        "messages": [{"role": "user", "content": "Flip a coin. Return Heads or Tails only."}]}


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    elapsed_s: float
    ok: int = 0
    refused: int = 0  # 429 answers (each followed by a retry)
    retry_after_missing: int = 0  # 429s without a usable Retry-After
    other: dict[int, int] = field(default_factory=dict)  # any other status: a failure
    errors: list[str] = field(default_factory=list)  # transport errors: a failure
    latencies: list[float] = field(default_factory=list)
    steps: int = 0
    retried: bool = True

    @property
    def answered_every_request(self) -> bool:
        """Every request got a 200, or (not retrying) a 429 with Retry-After."""
        return (not self.other and not self.errors and self.retry_after_missing == 0
                and self.ok + (0 if self.retried else self.refused) == self.requests)

    def row(self) -> dict:
        lat = sorted(self.latencies)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
        return {"concurrency": self.concurrency, "requests": self.requests, "ok": self.ok,
                "req_per_s": round(self.ok / self.elapsed_s, 2) if self.elapsed_s else None,
                "status_429": self.refused, "other_status": self.other, "errors": len(self.errors),
                "p50_s": round(pct(0.5), 4), "p99_s": round(pct(0.99), 4),
                "mean_s": round(statistics.fmean(lat), 4) if lat else None,
                "forward_passes": self.steps, "elapsed_s": round(self.elapsed_s, 3)}


async def load(url: str, concurrency: int, requests: int, max_retry_wait_s: float = 5.0,
               request_timeout_s: float = 120.0, retry_429: bool = True) -> LoadResult:
    """``requests`` coin flips from ``concurrency`` clients; 429s are retried after
    their Retry-After (capped at ``max_retry_wait_s``), or with ``retry_429=False``
    counted as answered, so req/s is what the server served while overloaded."""
    result = LoadResult(concurrency, requests, 0.0, retried=retry_429)
    todo = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient) -> None:
        for _ in todo:
            started = time.perf_counter()
            while True:
                try:
                    response = await http.post(url + "/chat/completions", json=COIN)
                except httpx.HTTPError as exc:
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                    break
                if response.status_code == 200:
                    response.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                    result.ok += 1
                    result.latencies.append(time.perf_counter() - started)
                    break
                if response.status_code == 429:
                    result.refused += 1
                    wait = response.headers.get("retry-after", "")
                    if not wait.replace(".", "", 1).isdigit():
                        result.retry_after_missing += 1
                        break
                    if not retry_429:
                        break
                    await asyncio.sleep(min(float(wait), max_retry_wait_s))
                    continue
                result.other[response.status_code] = result.other.get(response.status_code, 0) + 1
                break

    async with httpx.AsyncClient(timeout=request_timeout_s, limits=limits) as http:
        before = (await http.get(url.removesuffix("/v1") + "/health")).json()["steps"]
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        result.elapsed_s = time.perf_counter() - started
        result.steps = (await http.get(url.removesuffix("/v1") + "/health")).json()["steps"] - before
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default="default", choices=["default", "batch-invariant"])
    parser.add_argument("--levels", default="1,8,32,128", help="client concurrency levels")
    parser.add_argument("--requests", type=int, default=256, help="requests per level")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--no-retry", action="store_true",
                        help="count a 429 as answered instead of retrying it (req/s is then "
                             "what the server served while overloaded)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    rows = []
    with Server("--kernels", args.kernels, "--max-batch", str(args.max_batch),
                      "--max-queue", str(args.max_queue)) as server:
        health = server.health()
        asyncio.run(load(server.url, 2, 4))  # warm-up: first passes compile and allocate
        for level in levels:
            result = asyncio.run(load(server.url, level, args.requests,
                                      retry_429=not args.no_retry))
            rows.append({**result.row(), "answered_every_request": result.answered_every_request})
            if not args.json:
                r = rows[-1]
                print(f"concurrency {level:>4}: {r['ok']:>5}/{r['requests']} ok  "
                      f"{r['req_per_s']:>8.2f} req/s  429s {r['status_429']:>5}  "
                      f"p50 {r['p50_s'] * 1000:>8.1f} ms  p99 {r['p99_s'] * 1000:>8.1f} ms  "
                      f"passes {r['forward_passes']:>5}  other {r['other_status'] or '-'}  "
                      f"errors {r['errors']}", flush=True)
        exit_code = server.stop()
    info = {"kernels": args.kernels, "max_batch": args.max_batch, "max_queue": args.max_queue,
            "device": health.get("device"), "sigterm_exit_code": exit_code, "levels": rows}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"server ({args.kernels} kernels, device {health.get('device')}) exited "
              f"{exit_code} on SIGTERM")


if __name__ == "__main__":
    main()
