"""The ``default`` kernels: torch's own ops (cuBLAS and SDPA on a GPU, the CPU
BLAS on a CPU). Fast, and not batch-invariant: their reduction order depends on
the shapes in the batch, which is what detaudit measures."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from local_backend.kernels.pass_memo import memo


@dataclass
class _PaddedPlan:
    """Where each packed token sits in a padded [B, Tq] batch, and the causal mask.

    Built once per forward pass (with one device -> host sync for the sizes) and
    reused by every layer, as a server's attention metadata is."""

    inverse: torch.Tensor  # [T] sequence of each token
    row: torch.Tensor      # [T] its row inside the sequence's padded query block
    B: int
    Tq: int                # longest query block in the batch
    kv_len: int            # longest cache prefix in the batch: the reduction length
    first_slot: int | None  # the sequences own slots first_slot .. first_slot + B - 1 (cache view, no copy)
    slot_ids: torch.Tensor
    mask: torch.Tensor | None  # [B, 1, Tq * group, kv_len] bool; None: every sequence is a whole
    #                            prompt from position 0 (token row == position), plain causal attention


def _padded_plan(slots: torch.Tensor, positions: torch.Tensor, group: int) -> _PaddedPlan:
    slot_ids, inverse = torch.unique(slots, return_inverse=True)
    B, T = slot_ids.numel(), slots.numel()
    counts = torch.bincount(inverse, minlength=B)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    row = torch.empty_like(inverse)
    row[order] = torch.arange(T, device=slots.device) - starts[inverse[order]]
    Tq, kv_len, lo, hi, fresh = (int(x) for x in torch.stack(
        [counts.max(), positions.max() + 1, slot_ids.min(), slot_ids.max(), (row == positions).all()]).tolist())
    first_slot = lo if hi - lo + 1 == B else None
    if fresh:  # whole prompts from position 0: plain causal attention, no mask tensor
        return _PaddedPlan(inverse, row, B, Tq, kv_len, first_slot, slot_ids, None)
    pos_p = positions.new_full((B, Tq), -1)
    pos_p[inverse, row] = positions
    # Query rows are (token, head of the GQA group), so that K/V need no repeat.
    key_pos = torch.arange(kv_len, device=slots.device)
    mask = key_pos[None, None, :] <= pos_p.repeat_interleave(group, dim=1)[:, :, None]
    mask[:, :, 0] = True  # padded query rows: keep softmax finite
    return _PaddedPlan(inverse, row, B, Tq, kv_len, first_slot, slot_ids, mask[:, None])


class TorchOps:
    name = "default"
    implementation = "torch"

    def linear(self, x, weight, bias=None):
        return F.linear(x, weight, bias)

    def linears(self, x, layers):
        return [self.linear(x, weight, bias) for weight, bias in layers]

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
        G = Hq // Hkv
        if memo.decode_only:
            return _decode_attention(q, k_cache, v_cache, slots, positions, scale)
        plan = memo.get("default", (slots, positions, G), lambda: _padded_plan(slots, positions, G))
        B, Tq, L = plan.B, plan.Tq, plan.kv_len
        if plan.mask is None:
            return _causal_prefill(q, k_cache, v_cache, plan, scale)
        qp = q.new_zeros(B, Tq, Hkv, G, D)
        qp[plan.inverse, plan.row] = q.view(T, Hkv, G, D)
        qp = qp.permute(0, 2, 1, 3, 4).reshape(B, Hkv, Tq * G, D)
        if plan.first_slot is not None:  # a view of the cache: nothing copied
            k = k_cache[plan.first_slot:plan.first_slot + B, :L]
            v = v_cache[plan.first_slot:plan.first_slot + B, :L]
        else:
            k, v = k_cache[plan.slot_ids, :L], v_cache[plan.slot_ids, :L]
        out = F.scaled_dot_product_attention(qp, k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=plan.mask, scale=scale)
        out = out.view(B, Hkv, Tq, G, D).permute(0, 2, 1, 3, 4)
        return out[plan.inverse, plan.row].reshape(T, Hq, D)


def _decode_attention(q, k_cache, v_cache, slots, positions, scale):
    """One query token per sequence, with no device -> host copy (CUDA graphs): every
    sequence's whole cache row is read and the keys past its position are masked, so
    the reduction length is the cache's, and SDPA picks its kernel for that shape."""
    T, Hq, D = q.shape
    Hkv, L = k_cache.shape[2], k_cache.shape[1]
    k = k_cache[slots].transpose(1, 2)  # [T, Hkv, L, D]
    v = v_cache[slots].transpose(1, 2)
    mask = torch.arange(L, device=q.device)[None, :] <= positions[:, None]  # [T, L]
    out = F.scaled_dot_product_attention(q.view(T, Hkv, Hq // Hkv, D), k, v,
                                         attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(T, Hq, D)


def _causal_prefill(q, k_cache, v_cache, plan: _PaddedPlan, scale):
    """Whole prompts (row == position in every sequence): causal SDPA with GQA, which
    runs the flash kernel on a GPU. Rows past a prompt's end are padding and dropped."""
    T, Hq, D = q.shape
    B, L = plan.B, plan.kv_len
    qp = q.new_zeros(B, L, Hq, D)
    qp[plan.inverse, plan.row] = q
    if plan.first_slot is not None:
        k = k_cache[plan.first_slot:plan.first_slot + B, :L]
        v = v_cache[plan.first_slot:plan.first_slot + B, :L]
    else:
        k, v = k_cache[plan.slot_ids, :L], v_cache[plan.slot_ids, :L]
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)[plan.inverse, plan.row]
