"""Batch-invariant attention vs torch's scaled_dot_product_attention, bf16, GQA 32/8 heads, head_dim 128.

    PYTHONPATH=. python bench/bench_attention.py --json out/attention.json
    PYTHONPATH=. python bench/bench_attention.py --kernels gluon,gluon-grid,triton   # Hopper, side by side
    PYTHONPATH=. python bench/bench_attention.py --tune --json out/attention_tune.json

Prefill: B causal sequences of N tokens. Decode: one new token for each of B
sequences whose KV cache holds L tokens. SDPA gets its favourite layout
([B, H, L, D], GQA through enable_gqa), prepared outside the timing. Bitwise
checks: a sequence alone vs in the batch (prefill and decode), and the decode of
a token vs the prefill row of the same token (prefill runs the single pass,
decode of one sequence the split-KV launch), and for decode the split-KV launch
vs the single pass. Ours is timed with its tile plan already made (the engine
plans once per forward pass and reuses it in every layer); "plan ms" is the
cost of a fresh plan and the call, paid once per pass. Both are also timed as
CUDA-graph replays ("graph" columns: kernel time without Python launch costs,
for ours and SDPA alike), since one small call lasts about as long as launching
it; "host" is the time to issue one eager call. ``--kernels`` times several of ours
in the same run, on the same inputs (on Hopper: the Gluon kernel of
attention_hopper.py, persistent or one program per item, and the Triton kernel),
and says whether their outputs are equal bit for bit; "gluon:4" names the Gluon kernel
with a K/V ring of 4 stages (speed only: the stage count never touches the bits), and
"gluon-serial" the Gluon kernels with the combine launched only after the attention kernel
ends (no programmatic dependent launch: combine_hopper), "gluon-nopp" with the two
consumers unpaced (no ping-pong: attention_hopper); speed only, the same bits.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from gpu_info import gpu_info, header, write_json
from local_backend.kernels import attention as attn, attention_hopper as hopper, combine_hopper

HQ, HKV, D = 32, 8, 128
PREFILL = [(8, 512), (4, 1024), (2, 2048), (1, 4096), (1, 8192)]  # (B, N)
DECODE = [(1, 1000), (1, 8000), (1, 32000), (16, 4000), (64, 1000), (64, 8000), (8, 32000)]  # (B, L)
CANDIDATES = [  # (rows, num_warps, num_stages, BLOCK_N, SPLIT); round 1 and 2 sweeps: 128-row, BLOCK_N=128
    # and 4-warp 128-row tiles were slower everywhere, SPLIT=128 made decode combine-bound
    (64, 4, 2, 64, 256), (64, 4, 3, 64, 256), (128, 8, 3, 64, 256), (64, 4, 2, 64, 512), (64, 4, 3, 64, 512),
]


def median_ms(fn, rep_ms: int) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")


def sdpa(q, k, v, causal):
    """q [B, Hq, Tq, D], k/v [B, Hkv, L, D]."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=D ** -0.5, enable_gqa=True)


def graph_ms(fn, rep_ms: int) -> float:
    """Median time of one call replayed from a CUDA graph (no Python in the loop)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm: compile, allocate
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, rep_ms)


def issue_us(fn, calls: int = 50) -> float:
    """Host time to issue one call (µs), the GPU left to catch up afterwards: what an eager
    pass pays per layer before the kernel's own time counts."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def case(kind: str, B: int, N: int, cand, rep: int, gen, kernels: list[str]) -> dict:
    rows, warps, stages, block_n, split = cand
    attn.BLOCK_N, attn.SPLIT = block_n, split
    k_cache = torch.randn(B, N, HKV, D, device="cuda", generator=gen).bfloat16()
    v_cache = torch.randn(B, N, HKV, D, device="cuda", generator=gen).bfloat16()
    k_t, v_t = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
    scale = D ** -0.5
    if kind == "prefill":
        q = torch.randn(B * N, HQ, D, device="cuda", generator=gen).bfloat16()
        slots = torch.arange(B, device="cuda").repeat_interleave(N)
        positions = torch.arange(N, device="cuda").repeat(B)
        q_t = q.view(B, N, HQ, D).transpose(1, 2).contiguous()
        flops = 4 * B * HQ * D * N * (N + 1) / 2
        ref = lambda: sdpa(q_t, k_t, v_t, True)  # noqa: E731
    else:
        q = torch.randn(B, HQ, D, device="cuda", generator=gen).bfloat16()
        slots = torch.arange(B, device="cuda")
        positions = torch.full((B,), N - 1, device="cuda")
        q_t = q[:, :, None, :].contiguous()
        flops = 4 * B * HQ * D * N
        ref = lambda: sdpa(q_t, k_t, v_t, False)  # noqa: E731
    t_ref = median_ms(ref, rep)
    expected = ref()
    expected = expected.transpose(1, 2).reshape(q.shape) if kind == "prefill" else expected[:, :, 0]
    row = {"kind": kind, "B": B, "N_or_L": N, "cand": cand, "sdpa_ms": t_ref, "sdpa_tflops": flops / t_ref / 1e9,
           "kernels": kernels}
    row["sdpa_graph_ms"] = graph_ms(ref, rep)
    outs = {}
    defaults = combine_hopper.PDL, hopper.PINGPONG  # each variant's ours() sets them; the case ends with them restored
    for kernel in kernels:  # side by side, same inputs, same run
        name, _, ring = kernel.partition(":")
        serial = "-serial" in name  # the Gluon combine launched after the attention kernel ends (no PDL)
        no_pingpong = "-nopp" in name  # the two Gluon consumers unpaced (no ping-pong)
        name = name.replace("-serial", "").replace("-nopp", "")
        gluon_stages = int(ring) if ring else None
        kw = dict(rows=rows, num_warps=warps, num_stages=gluon_stages if name.startswith("gluon") else stages,
                  kernel=name)

        def ours():
            combine_hopper.PDL, hopper.PINGPONG = not serial, not no_pingpong
            return attn.attention(q, k_cache, v_cache, slots, positions, scale, **kw)

        pass_ = lambda: attn.one_plan_per_pass(decode_only=kind == "decode")  # noqa: E731
        try:
            with pass_():
                ours()
        except Exception as exc:  # e.g. a K/V ring deeper than shared memory holds for this case: reported
            row[kernel] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            continue
        with pass_():  # as inside the engine's forward pass: the plan made once is reused (decode: on the device)
            out = outs[kernel] = ours()
            t_ours = median_ms(ours, rep)
            t_issue = issue_us(ours)
        torch.cuda.synchronize()
        start = time.perf_counter()
        attn.attention(q, k_cache, v_cache, slots.clone(), positions.clone(), scale, **kw)  # a fresh plan
        torch.cuda.synchronize()
        fig = {"ms": t_ours, "plan_ms": (time.perf_counter() - start) * 1e3, "tflops": flops / t_ours / 1e9,
               "ratio": t_ref / t_ours, "issue_us": t_issue, "kv_gbps": 2 * B * N * HKV * D * 2 / t_ours / 1e6,
               "rel_err_vs_sdpa": ((out.float() - expected.float()).norm() / expected.float().norm()).item()}
        first = N if kind == "prefill" else 1
        alone = attn.attention(q[:first], k_cache, v_cache, slots[:first], positions[:first], scale, **kw)
        fig["bitwise_alone_vs_batch"] = torch.equal(alone, out[:first])
        with pass_():
            ours()
            fig["graph_ms"] = graph_ms(ours, rep)
        fig["graph_ratio"] = row["sdpa_graph_ms"] / fig["graph_ms"]
        if kind == "decode":
            fig["kv_gbps_graph"] = 2 * B * N * HKV * D * 2 / fig["graph_ms"] / 1e6
            both = [attn.attention(q, k_cache, v_cache, slots, positions, scale, split_kv=s, **kw)
                    for s in (False, True)]
            fig["bitwise_split_vs_one_pass"] = torch.equal(*both)
        else:  # decode the last token of sequence 0 from the same cache
            last = torch.tensor([N - 1], device="cuda")
            dec = attn.attention(q[N - 1:N], k_cache, v_cache, slots[:1], last, scale, **kw)
            fig["bitwise_prefill_vs_decode"] = torch.equal(dec, out[N - 1:N])
        row[kernel] = fig
    combine_hopper.PDL, hopper.PINGPONG = defaults
    if len(outs) > 1:
        first = next(iter(outs.values()))
        row["bitwise_between_kernels"] = all(torch.equal(first, o) for o in outs.values())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", action="store_true", help="time every candidate tile choice (Triton kernel)")
    parser.add_argument("--cases", choices=["all", "decode", "prefill"], default="all")
    parser.add_argument("--kernels", default=None,
                        help="ours to time side by side, e.g. gluon,triton (default: both on Hopper, else triton)")
    parser.add_argument("--split", type=int, default=None,
                        help="KV positions per split instead of the kernels' own (a multiple of 64; changes the bits:"
                             " for trying another device-wide choice)")
    parser.add_argument("--rep", type=int, default=40, help="milliseconds of timed repeats per figure")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA GPU (the CPU interpreter's speed means nothing)")
    on_hopper = torch.cuda.get_device_capability() == (9, 0)
    kernels = (args.kernels or ("gluon,triton" if on_hopper else "triton")).split(",")
    info = gpu_info()
    print(header(info))
    if args.split is not None and (args.split <= 0 or args.split % attn.BLOCK_N):
        sys.exit(f"bench_attention: --split {args.split} is not a positive multiple of BLOCK_N = {attn.BLOCK_N}")
    default = (attn.GPU_ROWS, attn.GPU_WARPS, attn.tile_config(HQ // HKV, D, torch.bfloat16)[2], attn.BLOCK_N,
               args.split or attn.SPLIT)
    cands = CANDIDATES if args.tune else [default]
    gen = torch.Generator(device="cuda").manual_seed(0)
    print("prefill: TFLOP/s eager and ratio to SDPA; decode: KV GB/s eager and ratio; then the CUDA-graph ratio"
          " (kernel time, no host) to SDPA graph-timed.")
    print("checks: alone=batch, prefill=decode (prefill) or split=1pass (decode), and kernels=each other;"
          " host: time to issue one call (plan reused)")
    print(f"{'kind':>7} {'B':>3} {'N|L':>6} | {'SDPA':>7} | " +
          " | ".join(f"{k:>6}: fig ratio graph checks" for k in kernels) + " | same")
    rows = []
    for kind, cases in (("prefill", PREFILL), ("decode", DECODE)):
        if args.cases not in ("all", kind):
            continue
        for B, N in cases:
            for cand in cands:
                try:
                    r = case(kind, B, N, cand, args.rep, gen, kernels)
                except Exception as exc:
                    print(f"{kind:>7} {B:>3} {N:>6} | {cand} failed: {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                rows.append(r)
                ref_fig = r["sdpa_tflops"] if kind == "prefill" else 2 * B * N * HKV * D * 2 / r["sdpa_ms"] / 1e6
                cells = []
                for k in kernels:
                    f = r[k]
                    if "error" in f:
                        cells.append(f"{'failed':>44}")
                        print(f"  {k}: {f['error']}", file=sys.stderr)
                        continue
                    fig = f["tflops"] if kind == "prefill" else f["kv_gbps"]
                    graph = f"{f['graph_ratio']:>5.2f}" if "graph_ratio" in f else "    -"
                    check = f.get("bitwise_prefill_vs_decode", f.get("bitwise_split_vs_one_pass"))
                    cells.append(f"{fig:>7.1f} {f['ratio']:>5.2f} {graph} {int(f['bitwise_alone_vs_batch'])}"
                                 f"{int(check)} err {f['rel_err_vs_sdpa']:.0e} host {f['issue_us']:.0f}us")
                print(f"{kind:>7} {B:>3} {N:>6} | {ref_fig:>7.1f} | " + " | ".join(cells) +
                      f" | {r.get('bitwise_between_kernels', '-')}", flush=True)
                torch.cuda.empty_cache()
    write_json(args.json, {"info": info, "mode": "tune" if args.tune else "table", "rows": rows})
    print(header(gpu_info()))


if __name__ == "__main__":
    main()
