"""The ``default`` kernels: torch's own ops (cuBLAS and SDPA on a GPU, the CPU
BLAS on a CPU). Fast, and not batch-invariant: their reduction order depends on
the shapes in the batch, which is what detaudit measures."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchOps:
    name = "default"

    def linear(self, x, weight, bias=None):
        return F.linear(x, weight, bias)

    def rms_norm(self, x, weight, eps):
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (out * weight.float()).to(x.dtype)

    def silu_mul(self, gate, up):
        return F.silu(gate) * up

    def log_softmax(self, x):
        return torch.log_softmax(x.float(), dim=-1)

    def attention(self, q, k_cache, v_cache, slots, positions, scale):
        """Padded-batch SDPA, as a typical server does: the reduction length is
        the longest sequence in the batch, so it changes with the batch."""
        T, Hq, D = q.shape
        Hkv = k_cache.shape[2]
        slot_ids, inverse = torch.unique(slots, return_inverse=True)
        B = slot_ids.numel()
        kv_len = int(positions.max().item()) + 1
        # Row index of each token inside its sequence's padded query block.
        order = torch.argsort(inverse, stable=True)
        counts = torch.bincount(inverse, minlength=B)
        starts = torch.cumsum(counts, 0) - counts
        row = torch.empty_like(inverse)
        row[order] = torch.arange(T, device=q.device) - starts[inverse[order]]
        Tq = int(counts.max().item())
        qp = q.new_zeros(B, Tq, Hq, D)
        qp[inverse, row] = q
        pos_p = positions.new_full((B, Tq), -1)
        pos_p[inverse, row] = positions
        k = k_cache[slot_ids, :kv_len]  # [B, L, Hkv, D]
        v = v_cache[slot_ids, :kv_len]
        if Hq != Hkv:
            k = k.repeat_interleave(Hq // Hkv, dim=2)
            v = v.repeat_interleave(Hq // Hkv, dim=2)
        key_pos = torch.arange(kv_len, device=q.device)
        mask = key_pos[None, None, :] <= pos_p[:, :, None]  # [B, Tq, L]
        mask[:, :, 0] = True  # padded query rows: keep softmax finite
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask[:, None], scale=scale,
        ).transpose(1, 2)
        return out[inverse, row]
