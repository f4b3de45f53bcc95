"""linear's host cost on the engine's shapes: eager calls against graph replays, round 4's
table against round 3's and cuBLAS (torch.nn.functional.linear), bf16.

    PYTHONPATH=. python bench/bench_linear_host.py                     # ~60-80 s on an H200 (compiles included)
    PYTHONPATH=. python bench/bench_linear_host.py --json $OUT/host.json --ms 1,16,128

The engine's eager passes (prefill, and prompts mixed with decode rows) pay each call's
Python and launch time; its decode steps replay CUDA graphs and pay the GPU time alone.
At small M the first is longer than the second, so a kernel that wins graph-timed can
lose end to end (bench/NOTES.md, issue 15 round 4). Per (M, projection of
Llama-3.2-1B) this prints microseconds per call:
  issue  host time to queue one call (perf_counter over N calls, before the sync)
  eager  the same N calls up to the sync: max(host, GPU) per call
  graph  one call replayed from a CUDA graph of calls: GPU time alone
for ``ours`` (round 4's table, launch decisions cached), ``cold`` (the same, caches
cleared before every call: the host path without them), ``r3`` (round 3's table, K in
one chunk: other bits at K = 8192) and cuBLAS; then the pass total (16 layers + head)
and the ratios cuBLAS / ours (>= 1: ours faster) and r3 / ours.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# Llama-3.2-1B: hidden 2048, 32 query heads and 8 KV heads of 64, MLP 8192, vocab 128256
# (tied head). (name, N, K, uses per pass): q and o, k and v, gate and up share a shape.
PROJECTIONS = [("q/o", 2048, 2048, 32), ("k/v", 512, 2048, 32), ("gate/up", 8192, 2048, 32),
               ("down", 2048, 8192, 16), ("head", 128256, 2048, 1)]
MS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]
L2_BYTES = 64 * 2**20  # enough weight copies that a call's weight is not in L2 (the engine's layers differ)


def _variants(matmul):
    def cold(x, w):
        matmul.clear_caches()
        return matmul.linear(x, w)
    return {
        "ours": lambda x, w: matmul.linear(x, w, table="round4"),
        "cold": cold,
        "r3": lambda x, w: matmul.linear(x, w, table="round3"),
        "cublas": lambda x, w: F.linear(x, w),
    }


def eager_us(call, x, weights, calls: int) -> tuple[float, float]:
    """(issue, eager) microseconds per call over ``calls`` calls, after two warm calls."""
    for w in weights[:2]:
        call(x, w)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(calls):
        call(x, weights[i % len(weights)])
    issued = time.perf_counter()
    torch.cuda.synchronize()
    end = time.perf_counter()
    return (issued - start) / calls * 1e6, (end - start) / calls * 1e6


def graph_us(call, x, weights, calls: int, replays: int = 5) -> float:
    """Median microseconds per call of a CUDA graph of ``calls`` calls over the weight copies."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for w in weights:
            call(x, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(x, weights[i % len(weights)])
    graph.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    del graph
    return statistics.median(times)


def run(args) -> dict:
    from local_backend.kernels import matmul
    variants = {k: v for k, v in _variants(matmul).items() if k in args.variants}
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, started = [], time.perf_counter()
    weights_of = {}
    for name, N, K, _ in PROJECTIONS:
        copies = max(1, min(4, math.ceil(L2_BYTES / (N * K * 2))))
        weights_of[name] = [(torch.randn(N, K, device="cuda", generator=gen) * K ** -0.5).bfloat16()
                            for _ in range(copies)]
    cols = "  ".join(f"{v:>6}: issue  eager  graph" if v != "cold" else f"{v:>6}: issue  eager"
                     for v in variants)
    print(f"{'M':>5} {'proj':>8}  {cols}   | cuBLAS/ours eager graph | r3/ours eager graph   (us per call)")
    for M in args.ms:
        total = {v: [0.0, 0.0] for v in variants}
        for name, N, K, uses in PROJECTIONS:
            weights = weights_of[name]
            x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
            calls = 200 if M * N < 2**22 else 50 if M * N < 2**27 else 10
            row = {"M": M, "proj": name, "N": N, "K": K}
            for v, call in variants.items():
                issue, eager = eager_us(call, x, weights, calls)
                graph = graph_us(call, x, weights, min(calls, 20)) if v != "cold" else None
                row[v] = {"issue_us": issue, "eager_us": eager, "graph_us": graph}
                total[v][0] += uses * eager
                total[v][1] += uses * (graph or 0.0)
            rows.append(row)
            print(_line(M, name, row, variants), flush=True)
        print(_totals(M, total, variants), flush=True)
        rows.append({"M": M, "proj": "pass", **{v: {"eager_us": t[0], "graph_us": t[1]} for v, t in total.items()}})
    print(f"{time.perf_counter() - started:.0f} s")
    return {"rows": rows, "ms": args.ms, "variants": list(variants)}


def _ratio(row, a, b, key):
    if a not in row or b not in row or not row[b].get(key) or not row[a].get(key):
        return "   -"
    return f"{row[a][key] / row[b][key]:4.2f}"


def _line(M, name, row, variants) -> str:
    parts = []
    for v in variants:
        r = row[v]
        parts.append(f"{r['issue_us']:6.1f} {r['eager_us']:6.1f}" + (f" {r['graph_us']:6.1f}" if r["graph_us"] else ""))
    return (f"{M:>5} {name:>8}  {'   '.join(parts)}   | {_ratio(row, 'cublas', 'ours', 'eager_us')} "
            f"{_ratio(row, 'cublas', 'ours', 'graph_us')} | {_ratio(row, 'r3', 'ours', 'eager_us')} "
            f"{_ratio(row, 'r3', 'ours', 'graph_us')}")


def _totals(M, total, variants) -> str:
    row = {v: {"eager_us": t[0], "graph_us": t[1]} for v, t in total.items()}
    each = "  ".join(f"{v} {t[0] / 1e3:.3f}/{t[1] / 1e3:.3f}" for v, t in total.items())
    return (f"{M:>5}     pass  (ms eager/graph, 16 layers + head) {each}   | cuBLAS/ours "
            f"{_ratio(row, 'cublas', 'ours', 'eager_us')} {_ratio(row, 'cublas', 'ours', 'graph_us')} | r3/ours "
            f"{_ratio(row, 'r3', 'ours', 'eager_us')} {_ratio(row, 'r3', 'ours', 'graph_us')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ms", type=lambda s: [int(m) for m in s.split(",")], default=MS, help="row counts, e.g. 1,16,128")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=["ours", "cold", "r3", "cublas"],
                        help="any of ours,cold,r3,cublas")
    parser.add_argument("--warm-s", type=float, default=3.0, help="seconds of large matmuls first (clocks up)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_linear_host.py needs a CUDA GPU (it times kernel launches); none here.", file=sys.stderr)
        sys.exit(2)
    from bench_matmul import warm_clocks
    from gpu_info import gpu_info, header, write_json
    warm_clocks(args.warm_s)
    print(header(gpu_info()))
    result = run(args)
    write_json(args.json, {"info": gpu_info(), **result})


if __name__ == "__main__":
    main()
