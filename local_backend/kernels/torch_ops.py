"""The ``default`` kernels: torch's own ops (cuBLAS and SDPA on a GPU, the CPU
BLAS on a CPU). Fast, and not batch-invariant: their reduction order depends on
the shapes in the batch, which is what detaudit measures."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from local_backend.kernels.pass_memo import memo


@dataclass
class _PaddedGroup:
    """Sequences padded together into one SDPA call: [B, Tq] query blocks over the
    first kv_len cache positions, with the causal mask."""

    tokens: torch.Tensor    # [n] the group's tokens in the packed batch
    seq: torch.Tensor       # [n] each token's sequence in the group
    row: torch.Tensor       # [n] its row inside that sequence's query block
    slot_ids: torch.Tensor  # [B] cache slot of each sequence
    first_slot: int | None  # slots are first_slot .. first_slot + B - 1: read the cache as a view
    B: int
    Tq: int                 # longest query block in the group
    kv_len: int             # longest cache prefix in the group: the reduction length
    mask: torch.Tensor      # [B, 1, Tq * group, kv_len] bool; query rows are (token, head of the GQA group)


def _group(tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, gqa: int,
           device: torch.device) -> _PaddedGroup:
    """On host tensors: pad the sequences of ``tokens``."""
    slot_ids, seq = torch.unique(slots[tokens], return_inverse=True)
    B = slot_ids.numel()
    counts = torch.bincount(seq, minlength=B)
    order = torch.argsort(seq, stable=True)
    row = torch.empty_like(seq)
    row[order] = torch.arange(len(seq)) - (torch.cumsum(counts, 0) - counts)[seq[order]]
    Tq, kv_len = int(counts.max()), int(positions[tokens].max()) + 1
    pos_p = torch.full((B, Tq), -1, dtype=torch.int64)
    pos_p[seq, row] = positions[tokens]
    mask = torch.arange(kv_len)[None, None, :] <= pos_p.repeat_interleave(gqa, dim=1)[:, :, None]
    mask[:, :, 0] = True  # padded query rows: keep softmax finite
    lo, hi = int(slot_ids[0]), int(slot_ids[-1])
    to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return _PaddedGroup(to(tokens), to(seq), to(row), to(slot_ids), lo if hi - lo + 1 == B else None,
                        B, Tq, kv_len, to(mask[:, None]))


def _plan(slots: torch.Tensor, positions: torch.Tensor, gqa: int) -> list[_PaddedGroup]:
    """Decode tokens (one in their sequence) and prefill tokens padded apart, as a
    server schedules them: a decode token never pads to a prompt's length. One
    device -> host copy per forward pass; every layer reuses the plan."""
    host_slots, host_positions = torch.stack([slots, positions]).cpu()
    per_slot = torch.bincount(host_slots)
    single = per_slot[host_slots] == 1
    groups = [single.nonzero()[:, 0], (~single).nonzero()[:, 0]]
    return [_group(t, host_slots, host_positions, gqa, slots.device) for t in groups if t.numel()]


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
        the longest sequence in the padded group, so it changes with the batch."""
        T, Hq, D = q.shape
        Hkv = k_cache.shape[2]
        gqa = Hq // Hkv
        groups = memo.get("default", (slots, positions, gqa), lambda: _plan(slots, positions, gqa))
        out = torch.empty_like(q)
        for g in groups:
            qp = q.new_zeros(g.B, g.Tq, Hkv, gqa, D)
            qp[g.seq, g.row] = q[g.tokens].view(-1, Hkv, gqa, D)
            qp = qp.permute(0, 2, 1, 3, 4).reshape(g.B, Hkv, g.Tq * gqa, D)
            if g.first_slot is not None:  # a view of the cache: nothing copied
                k = k_cache[g.first_slot:g.first_slot + g.B, :g.kv_len]
                v = v_cache[g.first_slot:g.first_slot + g.B, :g.kv_len]
            else:
                k, v = k_cache[g.slot_ids, :g.kv_len], v_cache[g.slot_ids, :g.kv_len]
            o = F.scaled_dot_product_attention(qp, k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=g.mask, scale=scale)
            o = o.view(g.B, Hkv, g.Tq, gqa, D).permute(0, 2, 1, 3, 4)
            out[g.tokens] = o[g.seq, g.row].reshape(-1, Hq, D)
        return out
