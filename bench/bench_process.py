"""What a user waits for: whole processes, start-up included.

Side by side in one run, against one instant fake OpenAI server in its own process:
  * `detaudit run --model M --base-url URL --n N --concurrency C` as a process, against
    a process that runs a bare AsyncOpenAI loop (import openai, one client, C workers,
    no storage) sending the same request N times;
  * `detaudit --help`, and `python -c "import detaudit.cli"`, as processes.
Each is run --rounds times, alternating; the best of each side is compared.

    python bench/bench_process.py                    # 2,000 requests, concurrency 64
    python bench/bench_process.py --n 2000 --rounds 5

Goals (issue 11): the whole-process run >= 0.9x the bare loop; `detaudit --help` <= 0.3 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
from bench_runner import MODEL, start_server  # noqa: E402

BARE = """
import asyncio, sys, tomllib
import openai
url, n, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
request = tomllib.load(open({probe!r}, "rb"))["request"]

async def main():
    client = openai.AsyncOpenAI(base_url=url, api_key="not-needed", max_retries=0)
    todo = iter(range(n))
    async def worker():
        for _ in todo:
            await client.chat.completions.create(model={model!r}, **request)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()

asyncio.run(main())
"""


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed:\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "OPENAI_API_KEY": "not-needed"}
    bare_script = BARE.format(probe=str(ROOT / "probes" / "coin-flip.toml"), model=MODEL)
    proc, url = start_server()
    print(f"fake server {url} (own process), n={args.n:,}, concurrency={args.concurrency}, "
          f"{os.cpu_count()} CPUs, {args.rounds} rounds")
    bare, ours, helps, imports = [], [], [], []
    try:
        with tempfile.TemporaryDirectory() as folder:
            timed([sys.executable, "-c", bare_script, url, "200", str(args.concurrency)])  # warm-up
            for round_ in range(args.rounds):
                run_ours = lambda: ours.append(timed(  # noqa: E731
                    [sys.executable, "-m", "detaudit", "run", "--model", MODEL, "--base-url", url,
                     "--n", str(args.n), "--concurrency", str(args.concurrency), "--quiet", "--json",
                     "--out", folder], env))
                run_bare = lambda: bare.append(timed(  # noqa: E731
                    [sys.executable, "-c", bare_script, url, str(args.n), str(args.concurrency)]))
                first, second = (run_bare, run_ours) if round_ % 2 == 0 else (run_ours, run_bare)
                first()
                second()
                helps.append(timed([sys.executable, "-m", "detaudit", "--help"]))
                imports.append(timed([sys.executable, "-c", "import detaudit.cli"]))
                print(f"round {round_ + 1}: bare loop {bare[-1]:6.2f} s | detaudit run {ours[-1]:6.2f} s | "
                      f"ratio {bare[-1] / ours[-1]:.2f} | detaudit --help {helps[-1]:.2f} s | "
                      f"import detaudit.cli {imports[-1]:.2f} s", flush=True)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    print(f"best: bare loop {min(bare):.2f} s, detaudit run {min(ours):.2f} s, ratio "
          f"{min(bare) / min(ours):.2f} (goal >= 0.90); detaudit --help {min(helps):.2f} s (goal <= 0.3 s); "
          f"import detaudit.cli {min(imports):.2f} s")


if __name__ == "__main__":
    main()
