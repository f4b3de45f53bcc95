"""The default ops' GPU attention (one varlen flash call over the KV cache) against a
direct per-token softmax, for every pass the engine makes: whole prompts, a chunk
after a cached prefix, decode tokens, and all of them mixed in one pass."""

import pytest
import torch

from local_backend.kernels import get_ops
from local_backend.kernels.pass_memo import one_plan_per_pass

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _reference(q, k_cache, v_cache, slots, positions, scale):
    out = []
    G = q.shape[1] // k_cache.shape[2]
    for t in range(q.shape[0]):
        k = k_cache[slots[t], :positions[t] + 1].float().repeat_interleave(G, dim=1)  # [n, Hq, D]
        v = v_cache[slots[t], :positions[t] + 1].float().repeat_interleave(G, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[t].float(), k) * scale, dim=-1)
        out.append(torch.einsum("hn,nhd->hd", w, v))
    return torch.stack(out)


def _pass(layout):
    """Packed slots/positions from [(slot, first position, tokens)]."""
    slots = [s for s, p, n in layout for _ in range(n)]
    positions = [p + i for s, p, n in layout for i in range(n)]
    return torch.tensor(slots, device="cuda"), torch.tensor(positions, device="cuda")


@pytest.mark.parametrize("layout, decode_only", [
    ([(0, 0, 37), (3, 0, 5)], False),                 # whole prompts
    ([(2, 40, 17)], False),                           # a chunk after a cached prefix
    ([(1, 90, 1), (4, 3, 1), (0, 0, 1)], True),       # decode tokens (graph path)
    ([(4, 0, 33), (1, 120, 1), (2, 16, 9), (0, 7, 1)], False),  # mixed
])
def test_default_attention_matches_direct_softmax(layout, decode_only):
    gen = torch.Generator(device="cpu").manual_seed(1)
    S, L, Hkv, G, D = 6, 256, 8, 4, 64
    k_cache = torch.randn(S, L, Hkv, D, generator=gen).to("cuda", torch.bfloat16)
    v_cache = torch.randn(S, L, Hkv, D, generator=gen).to("cuda", torch.bfloat16)
    slots, positions = _pass(layout)
    q = torch.randn(slots.numel(), Hkv * G, D, generator=gen).to("cuda", torch.bfloat16)
    with one_plan_per_pass(decode_only):
        got = get_ops("default", "cuda").attention(q, k_cache, v_cache, slots, positions, D ** -0.5)
    want = _reference(q, k_cache, v_cache, slots, positions, D ** -0.5)
    assert got.shape == q.shape
    assert (got.float() - want).abs().max().item() < 2e-2
