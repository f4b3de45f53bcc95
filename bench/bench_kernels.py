"""Speed of the batch-invariant kernels against torch's own, with a bitwise check.

    python bench/bench_kernels.py            # CUDA: TFLOP/s tables; CPU: a tiny smoke run

The "bitwise" column says whether one row computed alone is the same bits as
that row inside the full batch (batch invariance), for ours and for torch's.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from local_backend.kernels import attention as attention_kernel
from local_backend.kernels import matmul

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def timed_ms(fn) -> float:
    if CUDA:
        from triton.testing import do_bench
        return do_bench(fn, warmup=10, rep=50)
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench_matmul(shapes, dtype) -> None:
    print(f"\nlinear, {dtype}: x[M,K] @ w[N,K]^T")
    print(f"{'M':>6} {'N':>6} {'K':>6} | {'ours TFLOP/s':>12} {'torch TFLOP/s':>13} | {'bitwise ours':>12} {'bitwise torch':>13}")
    for M, N, K in shapes:
        x = torch.randn(M, K, device=DEVICE).to(dtype)
        w = torch.randn(N, K, device=DEVICE).to(dtype)
        flops = 2 * M * N * K
        ours = timed_ms(lambda: matmul.linear(x, w))
        ref = timed_ms(lambda: F.linear(x, w))
        same_ours = torch.equal(matmul.linear(x[:1], w)[0], matmul.linear(x, w)[0])
        same_torch = torch.equal(F.linear(x[:1], w)[0], F.linear(x, w)[0])
        print(f"{M:>6} {N:>6} {K:>6} | {flops / ours / 1e9:>12.2f} {flops / ref / 1e9:>13.2f} | "
              f"{str(same_ours):>12} {str(same_torch):>13}")


def bench_attention(configs, dtype) -> None:
    print(f"\ncausal prefill attention, {dtype}: B sequences of N tokens, Hq/Hkv heads, head_dim D")
    print(f"{'B':>4} {'N':>6} {'Hq':>4} {'Hkv':>4} {'D':>4} | {'ours TFLOP/s':>12} {'SDPA TFLOP/s':>12} | "
          f"{'bitwise ours':>12} {'max |diff|':>10}")
    for B, N, Hq, Hkv, D in configs:
        q = torch.randn(B, N, Hq, D, device=DEVICE).to(dtype)
        k_cache = torch.randn(B, N, Hkv, D, device=DEVICE).to(dtype)
        v_cache = torch.randn(B, N, Hkv, D, device=DEVICE).to(dtype)
        slots = torch.arange(B, device=DEVICE).repeat_interleave(N)
        positions = torch.arange(N, device=DEVICE).repeat(B)
        q_flat = q.reshape(B * N, Hq, D)
        scale = D ** -0.5

        def ours():
            return attention_kernel.attention(q_flat, k_cache, v_cache, slots, positions, scale)

        kt = k_cache.transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
        vt = v_cache.transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)

        def sdpa():
            return F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, is_causal=True, scale=scale)

        flops = 4 * B * Hq * D * N * (N + 1) / 2  # causal: half the score matrix
        t_ours, t_sdpa = timed_ms(ours), timed_ms(sdpa)
        out = ours()
        alone = attention_kernel.attention(q_flat[:N], k_cache, v_cache, slots[:N], positions[:N], scale)
        diff = (out.reshape(B, N, Hq, D).float() - sdpa().transpose(1, 2).float()).abs().max().item()
        print(f"{B:>4} {N:>6} {Hq:>4} {Hkv:>4} {D:>4} | {flops / t_ours / 1e9:>12.2f} {flops / t_sdpa / 1e9:>12.2f} | "
              f"{str(torch.equal(alone, out[:N])):>12} {diff:>10.2e}")


def main() -> None:
    if CUDA:
        print(f"device: {torch.cuda.get_device_name()}")
        shapes = [(1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096), (1024, 4096, 4096), (4096, 4096, 4096),
                  (256, 32000, 4096)]
        for dtype in (torch.bfloat16, torch.float32):
            bench_matmul(shapes, dtype)
        bench_attention([(1, 1024, 32, 8, 128), (4, 2048, 32, 8, 128), (8, 512, 16, 16, 64)], torch.bfloat16)
    else:
        print("No CUDA device: the kernels run under Triton's interpreter (numpy), so the speed figures "
              "mean nothing. Tiny smoke run only.")
        bench_matmul([(1, 128, 128), (64, 256, 128)], torch.float32)
        bench_attention([(2, 40, 4, 2, 32)], torch.float32)


if __name__ == "__main__":
    main()
