"""Where a decode attention call spends its GPU time: each kernel's own time (CUPTI, through
torch.profiler) for ours (the split kernel, the combine) and SDPA, per decode case and per
speed-only variant: which combine folds the split states (Gluon's or the Triton kernel's), its
slices of head_dim, the Triton attention kernel. Every variant's output is checked bit for bit
against the default's.

    PYTHONPATH=. python bench/profile_decode.py --json out/decode_profile.json

bench_attention gives the totals (graph-timed ratio to SDPA); this says which kernel to cut,
and whether a variant cuts it without touching a bit.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

from gpu_info import gpu_info, header, write_json
from local_backend.kernels import attention as attn

HQ, HKV, D = 32, 8, 128
DECODE = [(1, 1000), (1, 8000), (1, 32000), (16, 4000), (64, 1000), (64, 8000), (8, 32000)]  # (B, L)
VARIANTS = {  # name: (kernel, Gluon combine, combine slices); None = the default
    "default": (None, None, None),
    "triton-combine": (None, False, None),
    "combine-slices1": (None, None, 1),
    "triton": ("triton", None, None),
}


def kernel_times(fn, calls: int) -> dict[str, float]:
    """Mean GPU time per call (us) of each kernel ``fn`` launches, by kernel name."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name[:60]] += event.device_time / calls
    return dict(times)


def run_case(B: int, L: int, calls: int, gen) -> dict:
    k_cache = torch.randn(B, L, HKV, D, device="cuda", generator=gen).bfloat16()
    v_cache = torch.randn(B, L, HKV, D, device="cuda", generator=gen).bfloat16()
    q = torch.randn(B, HQ, D, device="cuda", generator=gen).bfloat16()
    slots = torch.arange(B, device="cuda")
    positions = torch.full((B,), L - 1, device="cuda")
    q_t, k_t, v_t = q[:, :, None, :].contiguous(), k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
    row = {"B": B, "L": L, "sdpa": kernel_times(
        lambda: F.scaled_dot_product_attention(q_t, k_t, v_t, scale=D ** -0.5, enable_gqa=True), calls)}
    reference = None
    gluon_combine = attn.GLUON_COMBINE
    for name, (kernel, use_gluon_combine, slices) in VARIANTS.items():
        attn.GLUON_COMBINE = gluon_combine if use_gluon_combine is None else use_gluon_combine
        try:
            def call():
                return attn.attention(q, k_cache, v_cache, slots, positions, D ** -0.5, kernel=kernel,
                                      combine_slices=slices)
            with attn.one_plan_per_pass(decode_only=True):
                out = call()
                row[name] = kernel_times(call, calls)
            reference = out if reference is None else reference
            row[name]["same_bits"] = bool(torch.equal(out, reference))
        except Exception as exc:  # a variant that does not compile here is reported, not fatal
            row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        finally:
            attn.GLUON_COMBINE = gluon_combine
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_decode needs a CUDA GPU")
    info = gpu_info()
    print(header(info))
    print("GPU time per call (us), by kernel; total; ratio SDPA / ours; bits equal to the default variant")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for B, L in DECODE:
        row = run_case(B, L, args.calls, gen)
        rows.append(row)
        sdpa_total = sum(row["sdpa"].values())
        print(f"\n{B} x {L}: SDPA {sdpa_total:.1f} us (" +
              ", ".join(f"{k[:28]} {v:.1f}" for k, v in row["sdpa"].items()) + ")")
        for name in VARIANTS:
            fig = row[name]
            if "error" in fig:
                print(f"  {name:>16}: {fig['error']}")
                continue
            parts = {k: v for k, v in fig.items() if k != "same_bits"}
            total = sum(parts.values())
            print(f"  {name:>16}: {total:6.1f} us  ratio {sdpa_total / total:4.2f}  same {int(fig['same_bits'])}  (" +
                  ", ".join(f"{k[:28]} {v:.1f}" for k, v in parts.items()) + ")")
        torch.cuda.empty_cache()
    write_json(args.json, {"info": info, "rows": rows})


if __name__ == "__main__":
    main()
