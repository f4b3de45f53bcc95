"""Where an eager attention call spends its host time: cProfile over repeated calls of
each kernel (plan reused, as inside the engine's forward pass), top functions by own time.

    PYTHONPATH=. python bench/profile_attention_host.py --kernels gluon,triton

The eager prefill passes of the engine pay this once per layer; bench_attention's "host"
column is the total, this says which part of it to cut.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch

from local_backend.kernels import attention as attn

HQ, HKV, D = 32, 8, 128
CASES = {"prefill 8x512": ("prefill", 8, 512), "decode 1x1000": ("decode", 1, 1000)}


def inputs(kind: str, B: int, N: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(B, N, HKV, D, device="cuda", generator=gen).bfloat16()
    v = torch.randn(B, N, HKV, D, device="cuda", generator=gen).bfloat16()
    if kind == "prefill":
        q = torch.randn(B * N, HQ, D, device="cuda", generator=gen).bfloat16()
        slots = torch.arange(B, device="cuda").repeat_interleave(N)
        positions = torch.arange(N, device="cuda").repeat(B)
    else:
        q = torch.randn(B, HQ, D, device="cuda", generator=gen).bfloat16()
        slots = torch.arange(B, device="cuda")
        positions = torch.full((B,), N - 1, device="cuda")
    return q, k, v, slots, positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default="gluon,triton")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_attention_host needs a CUDA GPU")
    for name, (kind, B, N) in CASES.items():
        q, k, v, slots, positions = inputs(kind, B, N)
        for kernel in args.kernels.split(","):
            def call():
                return attn.attention(q, k, v, slots, positions, D ** -0.5, kernel=kernel)
            with attn.one_plan_per_pass(decode_only=kind == "decode"):
                call()  # compile, plan
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.calls):
                    call()
                issue = (time.perf_counter() - start) / args.calls * 1e6
                torch.cuda.synchronize()
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(args.calls):
                    call()
                profiler.disable()
                torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
            lines = [line for line in text.getvalue().splitlines() if line.strip()]
            print(f"\n== {name}, kernel {kernel}: {issue:.1f} us to issue one call (unprofiled); per call, own time:")
            for line in lines[lines.index(next(x for x in lines if x.lstrip().startswith("ncalls"))):]:
                print("  " + line[:150])


if __name__ == "__main__":
    main()
