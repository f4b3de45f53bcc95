"""A targeted tile sweep at a few (N, K, M) points, graph-timed against cuBLAS graph-timed.

    PYTHONPATH=. python bench/sweep_matmul_points.py --json $OUT/points.json        # ~2-2.5 min on an H200
    PYTHONPATH=. python bench/sweep_matmul_points.py --points 4096x14336:512 --budget-s 60

The default points are round 4's misses on bench_matmul's shapes (bench/NOTES.md; N is the
weight's rows, K the reduced dim, as in bench_matmul's SHAPES): 4096x4096 at M = 8192,
4096x14336 at M = 512 and 14336x4096 at M = 2048. Per point the candidates are a grid of
Tiles (BLOCK_M 64/128/256, BLOCK_N 64/128/256, BLOCK_K 64/128, 4/8 warps, 3-5 stages, TMA
on/off, GROUP_M 8/16, and the nested chunk loop where K is in chunks), pruned where the
pipeline's shared memory (stages x (BLOCK_M + BLOCK_N) x BLOCK_K x 2 bytes, plus the TMA
store's tile) would pass the H200's 227 KB or the fp32 accumulator would pass 128
registers a thread. Candidates run nearest the table's entry first (fewest fields
changed), and a point's sweep stops after --budget-s seconds (compiles take most of it).
Each candidate is checked bit for bit against the table's 8192-row product (only the K
chunking may set the order of a sum); a candidate that differs is reported, never picked.
Prints the 5 fastest bitwise candidates per point and a table line to try.

``--tiles "Tiles(...);Tiles(...)"`` times exactly these against the table's entry instead of
the grid (e.g. the ``halves`` launch: ``Tiles(128, 256, 64, 8, 3, tma=True, halves=True)``).

``--ws`` tries matmul_hopper's warp-specialised Gluon kernel instead (Tiles(..., ws=True):
128-row tiles, BLOCK_N 128 or 256 (128 where K is in chunks), 3-5 stages, GROUP_M 8 or 16,
as many as fit beside its output staging tile), against the table's entry in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

POINTS = [(4096, 4096, 8192), (4096, 14336, 512), (14336, 4096, 2048)]  # (N, K, M)
SMEM_BYTES = 227 * 1024
FAVOURITES = {(128, 256, 8), (256, 128, 8), (128, 128, 8)}  # (BLOCK_M, BLOCK_N, warps), TMA, BLOCK_K 64
L2_BYTES_TO_BEAT = 3 * 50 * 2**20


def parse_point(text: str) -> tuple[int, int, int]:
    """"NxK:M" -> (N, K, M)."""
    shape, m = text.split(":")
    n, k = shape.lower().split("x")
    return int(n), int(k), int(m)


def fits(t, chunk: int, K: int) -> bool:
    """Shared memory and registers an H200 has; chunks in whole BLOCK_K steps."""
    smem = t.num_stages * (t.BLOCK_M + t.BLOCK_N) * t.BLOCK_K * 2 + (t.BLOCK_M * t.BLOCK_N * 2 if t.tma else 0)
    acc_regs = t.BLOCK_M * t.BLOCK_N // (32 * t.num_warps)
    return smem <= SMEM_BYTES and acc_regs <= 128 and (chunk >= K or chunk % t.BLOCK_K == 0)


def candidates(table, chunked: bool, chunk: int, K: int, M: int) -> list:
    """The pruned grid, nearest the table's entry first."""
    from local_backend.kernels.matmul import Tiles
    grid = []
    for bm, bn, bk, warps, stages, tma, group in itertools.product(
            (64, 128, 256), (64, 128, 256), (64, 128), (4, 8), (3, 4, 5), (True, False), (8, 16)):
        for nested in ((True, False) if chunked else (False,)):
            t = Tiles(bm, bn, bk, warps, stages, GROUP_M=group, tma=tma, nested=nested)
            if fits(t, chunk, K) and t != table:
                grid.append(t)
    fields = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "GROUP_M", "tma", "nested")

    def order(t) -> tuple[int, int]:
        # at M >= 2048 Hopper's usual large tiles first, then the table's neighbours; chunked K without the
        # nested loop last (round 4: 0.66-0.73x at large M, the `if` stops the pipelining)
        favourite = M >= 2048 and (t.BLOCK_M, t.BLOCK_N, t.num_warps) in FAVOURITES and t.tma and t.BLOCK_K == 64
        distance = sum(getattr(t, f) != getattr(table, f) for f in fields)
        return (0 if favourite else 1, distance + (3 if chunked and not t.nested else 0))
    grid.sort(key=order)
    return [table] + grid


def ws_candidates(table, chunked: bool) -> list:
    """matmul_hopper's tiles that fit: stages x (128 + BLOCK_N) x 64 x 2 bytes of ring, plus
    the 128 x BLOCK_N output tile staged for its bulk store; K in chunks, 128 columns only;
    2-CTA programs sharing each weight chunk where this Triton builds them (3.7 on)."""
    from local_backend.kernels import gluon_api, matmul_hopper
    from local_backend.kernels.matmul import Tiles
    grid = [Tiles(128, bn, 64, 4, stages, GROUP_M=group, tma=True, ws=True, cluster=cluster)
            for cluster in ((2, 1) if gluon_api.MULTICAST else (1,))
            for bn in ((128,) if chunked else (256, 128)) for stages in (5, 4, 6, 3) for group in (8, 16)
            if matmul_hopper.shared_bytes(bn, 64, stages) <= matmul_hopper.SM_SHARED_BYTES]
    return [table] + grid


def parse_tiles(text: str) -> list:
    """"Tiles(...);Tiles(...)" -> Tiles objects (the dataclass's own repr reads back)."""
    from local_backend.kernels.matmul import Tiles
    return [eval(part, {"Tiles": Tiles}) for part in text.split(";") if part.strip()]


def sweep_point(N: int, K: int, M: int, budget_s: float, rep_ms: int, gen, ws: bool = False,
                tiles: list | None = None) -> dict:
    from bench_matmul import graph_ms_per_call
    from local_backend.kernels import matmul
    started = time.perf_counter()
    copies = max(1, -(-L2_BYTES_TO_BEAT // (N * K * 2)))
    weights = [(torch.randn(N, K, device="cuda", generator=gen) * K ** -0.5).bfloat16() for _ in range(copies)]
    x_all = torch.randn(8192, K, device="cuda", generator=gen).bfloat16()
    x = x_all[:M]
    big = matmul.linear(x_all, weights[0])  # the table's 8192-row product
    table = matmul.tiles_for(x.dtype, M, N, K)
    chunk = min(matmul.k_chunk(x.dtype, N, K), K)
    cublas_ms = graph_ms_per_call(lambda w: torch.mm(x, w.t()), weights, rep_ms)
    flops = 2 * M * N * K
    results, tried = [], 0
    grid = ([table] + [t for t in tiles if t != table] if tiles else ws_candidates(table, chunk < K) if ws
            else candidates(table, chunk < K, chunk, K, M))
    for t in grid:
        if time.perf_counter() - started > budget_s:
            break
        tried += 1
        try:
            out = matmul.linear(x, weights[0], tiles=t)
            ms = graph_ms_per_call(lambda w: matmul.linear(x, w, tiles=t), weights, rep_ms)
        except Exception as exc:  # out of resources, a compile error: a finding, not a crash
            results.append({"tiles": repr(t), "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            continue
        results.append({"tiles": repr(t), "is_table": t == table, "graph_ms": ms, "tflops": flops / ms / 1e9,
                        "ratio": cublas_ms / ms, "bitwise": torch.equal(out, big[:M])})
    ok = sorted((r for r in results if r.get("bitwise")), key=lambda r: r["graph_ms"])
    table_row = next((r for r in results if r.get("is_table")), None)
    return {"N": N, "K": K, "M": M, "chunk_k": chunk, "cublas_graph_ms": cublas_ms, "table": repr(table),
            "table_result": table_row, "grid_size": len(grid), "tried": tried,
            "not_bitwise": [r["tiles"] for r in results if r.get("bitwise") is False],
            "errors": sum("error" in r for r in results), "top": ok[:5], "seconds": time.perf_counter() - started}


def report(p: dict) -> None:
    print(f"\nN={p['N']} K={p['K']} M={p['M']} (chunk_k {p['chunk_k']}): cuBLAS {p['cublas_graph_ms'] * 1e3:.1f} us "
          f"graph-timed; {p['tried']} of {p['grid_size']} candidates in {p['seconds']:.0f} s, "
          f"{p['errors']} failed, {len(p['not_bitwise'])} not bitwise")
    t = p["table_result"]
    if t and "graph_ms" in t:
        print(f"  table  {t['graph_ms'] * 1e3:8.1f} us {t['ratio']:5.2f}x  bitwise {t['bitwise']}  {p['table']}")
    for r in p["top"]:
        print(f"  top    {r['graph_ms'] * 1e3:8.1f} us {r['ratio']:5.2f}x  bitwise {r['bitwise']}  {r['tiles']}")
    for bad in p["not_bitwise"]:
        print(f"  NOT BITWISE (report it): {bad}")
    if p["top"] and (not t or "graph_ms" not in t or p["top"][0]["graph_ms"] < t["graph_ms"]):
        print(f"  suggested table line for M={p['M']}, N={p['N']}, K={p['K']}:  t = {p['top'][0]['tiles']}")
    else:
        print("  the table's entry is already the fastest tried")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=lambda s: [parse_point(p) for p in s.split(",")], default=POINTS,
                        help="comma-separated NxK:M, e.g. 4096x4096:8192,4096x14336:512")
    parser.add_argument("--budget-s", type=float, default=40.0, help="seconds per point, compiles included")
    parser.add_argument("--rep", type=int, default=15, help="milliseconds of timed replays per figure")
    parser.add_argument("--warm-s", type=float, default=3.0, help="seconds of large matmuls first (clocks up)")
    parser.add_argument("--ws", action="store_true", help="try matmul_hopper's warp-specialised kernel")
    parser.add_argument("--tiles", type=parse_tiles,
                        help='only these, ";"-separated: "Tiles(128, 256, 64, 8, 3, tma=True)"')
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sweep_matmul_points.py needs a CUDA GPU; none here.", file=sys.stderr)
        sys.exit(2)
    from bench_matmul import warm_clocks
    from gpu_info import gpu_info, header, write_json
    warm_clocks(args.warm_s)
    print(header(gpu_info()))
    gen = torch.Generator(device="cuda").manual_seed(0)
    points = []
    for N, K, M in args.points:
        points.append(sweep_point(N, K, M, args.budget_s, args.rep, gen, args.ws, args.tiles))
        report(points[-1])
    print(header(gpu_info()))
    write_json(args.json, {"info": gpu_info(), "points": points})


if __name__ == "__main__":
    main()
