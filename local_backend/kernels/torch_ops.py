"""The ``default`` kernels: torch's own ops (cuBLAS and flash attention on a GPU, the
CPU BLAS and SDPA on a CPU). Fast, and not batch-invariant: their reduction order
depends on the shapes in the batch, which is what detaudit measures.

Attention on a GPU (bf16/fp16) is what vLLM's default does: ONE varlen flash-attention
call per layer over the packed tokens, reading each sequence's keys straight from its
KV-cache slot (``seqused_k``), whatever mix of whole prompts, cached-prefix chunks and
decode tokens the pass holds; no padded batch and no copy of the cache. Elsewhere, a
padded batch through SDPA with a mask (causal SDPA for whole prompts)."""

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
        """Varlen flash attention on a GPU; elsewhere padded-batch SDPA, as a typical
        server does. Either way the kernel's split of the keys follows the batch."""
        T, Hq, D = q.shape
        Hkv = k_cache.shape[2]
        G = Hq // Hkv
        if _flash_varlen_ok(q, k_cache):
            plan = memo.get("default-varlen", (slots, positions),
                            lambda: _varlen_plan(slots, positions, k_cache.shape[1], memo.decode_only))
            if plan is not None:
                return _flash_varlen(q, k_cache, v_cache, plan, scale)
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


# ---- varlen flash attention over the KV cache (GPU) ---------------------------------

@dataclass
class _VarlenPlan:
    """The packed pass as flash-attention's varlen arguments: sequence i's queries are
    rows cu_q[i]:cu_q[i+1]; its keys start at row cu_k[i] of the flattened cache (its
    slot * max_len) and it uses the first seqused_k[i] of them (up to its last position)."""

    cu_q: torch.Tensor      # [B + 1] int32
    cu_k: torch.Tensor      # [B + 1] int32
    seqused_k: torch.Tensor  # [B] int32
    max_q: int
    max_k: int


_FLASH = {"ok": None}  # does this torch build run aten's varlen flash forward? decided once


def _flash_varlen_ok(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    if q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] > 256:
        return False
    if _FLASH["ok"] is None:
        _FLASH["ok"] = hasattr(torch.ops.aten, "_flash_attention_forward") and _flash_self_check(q.device, q.dtype)
    return _FLASH["ok"]


def _varlen_plan(slots: torch.Tensor, positions: torch.Tensor, max_len: int, decode_only: bool):
    """The varlen arguments of a pass, or None when its tokens are not laid out as the
    kernel needs (each sequence's tokens adjacent and at consecutive positions)."""
    T = slots.numel()
    if decode_only:  # one token per sequence: no device -> host copy (CUDA graphs)
        cu_q = torch.arange(T + 1, dtype=torch.int32, device=slots.device)
        cu_k = torch.cat([slots * max_len, slots.new_zeros(1)]).to(torch.int32)
        return _VarlenPlan(cu_q, cu_k, (positions + 1).to(torch.int32), 1, max_len)
    new_seq = torch.ones(T, dtype=torch.bool, device=slots.device)
    new_seq[1:] = (slots[1:] != slots[:-1]) | (positions[1:] != positions[:-1] + 1)
    starts = torch.nonzero(new_seq)[:, 0]
    ends = torch.cat([starts[1:], starts.new_tensor([T])])
    seq_slots = slots[starts]
    counts = ends - starts
    ordered = seq_slots.sort().values
    max_q, distinct = (int(x) for x in torch.stack(
        [counts.max(), (ordered[1:] != ordered[:-1]).all()]).tolist())
    if not distinct:  # one sequence's tokens split apart: not a layout the kernel reads
        return None
    cu_q = torch.cat([starts, starts.new_tensor([T])]).to(torch.int32)
    cu_k = torch.cat([seq_slots * max_len, seq_slots.new_zeros(1)]).to(torch.int32)
    return _VarlenPlan(cu_q, cu_k, (positions[ends - 1] + 1).to(torch.int32), max_q, max_len)


def _flash_varlen(q, k_cache, v_cache, plan: _VarlenPlan, scale):
    """Causal varlen flash attention: each query sees its sequence's keys up to its own
    position (bottom-right aligned: a chunk after a cached prefix, or a decode token)."""
    S, L, Hkv, D = k_cache.shape
    out = torch.ops.aten._flash_attention_forward(
        q, k_cache.view(S * L, Hkv, D), v_cache.view(S * L, Hkv, D), plan.cu_q, plan.cu_k,
        plan.max_q, plan.max_k, 0.0, True, False, scale=scale, seqused_k=plan.seqused_k)[0]
    return out


def _flash_self_check(device: torch.device, dtype: torch.dtype) -> bool:
    """Run the varlen call once on a small cache and compare with masked SDPA: a torch
    build whose flash forward lacks ``seqused_k`` (or reads the cache otherwise) falls
    back to the padded path instead of giving wrong numbers."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        S, L, Hkv, G, D = 3, 64, 2, 2, 64
        k = torch.randn(S, L, Hkv, D, generator=gen).to(device, dtype)
        v = torch.randn(S, L, Hkv, D, generator=gen).to(device, dtype)
        slots = torch.tensor([2, 2, 2, 0, 1, 1], device=device)
        positions = torch.tensor([5, 6, 7, 30, 0, 1], device=device)
        q = torch.randn(6, Hkv * G, D, generator=gen).to(device, dtype)
        got = _flash_varlen(q, k, v, _varlen_plan(slots, positions, L, False), D ** -0.5)
        mask = torch.arange(L, device=device)[None, :] <= positions[:, None]
        want = F.scaled_dot_product_attention(q.view(6, Hkv, G, D), k[slots].transpose(1, 2),
                                              v[slots].transpose(1, 2), attn_mask=mask[:, None, None, :],
                                              scale=D ** -0.5).reshape(6, Hkv * G, D)
        return bool((got.float() - want.float()).abs().max() < 2e-2)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
