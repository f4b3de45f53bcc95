"""One causal prefill of ours and one of SDPA, for ncu to profile (1 x 4096 tokens,
32 query heads over 8 KV heads of 128, bf16): where the prefill gap comes from.

    ncu --kernel-name regex:'attention|flash|fmha' --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats python bench/profile_attention.py
"""

import torch
import torch.nn.functional as F

from local_backend.kernels import attention as attn

N, HQ, HKV, D = 4096, 32, 8, 128
gen = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(N, HQ, D, device="cuda", generator=gen).bfloat16()
k_cache = torch.randn(1, N, HKV, D, device="cuda", generator=gen).bfloat16()
v_cache = torch.randn(1, N, HKV, D, device="cuda", generator=gen).bfloat16()
slots = torch.zeros(N, dtype=torch.long, device="cuda")
positions = torch.arange(N, device="cuda")
q_t = q.view(1, N, HQ, D).transpose(1, 2).contiguous()
k_t, v_t = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()


def ours():
    return attn.attention(q, k_cache, v_cache, slots, positions, D ** -0.5)


def sdpa():
    return F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True, scale=D ** -0.5, enable_gqa=True)


with attn.one_plan_per_pass():
    for _ in range(3):  # warm-up launches (skipped by --launch-skip)
        ours()
        sdpa()
torch.cuda.synchronize()
