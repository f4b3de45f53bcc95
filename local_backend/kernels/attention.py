"""Batch-invariant causal attention over a KV cache, prefill and decode in one kernel.

Query token t attends to k_cache[slots[t], 0 .. positions[t]] (its own K/V is
already in the cache). The host groups the batch's tokens into tiles of at
most BLOCK_M tokens of one sequence (BLOCK_M fixed per model: tile_config);
one program handles one tile for one KV head, with the whole GQA group of
query heads as extra rows.

Why it is batch-invariant:
  * KV is swept in chunks of a fixed BLOCK_N, always from position 0 upwards,
    with an fp32 online softmax. A token sees the same chunks in the same order
    whether it is decoded alone, prefilled with its prompt, or batched with
    other sequences.
  * Every tile has the same fixed shape, and each query row of tl.dot depends
    only on that row, so a token's neighbours in the tile do not matter.
  * A tile sweeps up to its furthest token; for a row whose position lies
    before a chunk, that chunk is all -inf, so the update is an exact no-op:
    the max is unchanged, the rescale factor is exp2(0) = 1 and every
    probability is exp2(-inf) = 0.
"""

from __future__ import annotations

import contextlib

import torch

from local_backend.kernels._triton import INTERPRET, cast_to, check_same_device, tl, triton

BLOCK_N = 64   # KV positions per chunk; fixed, never "a fixed number of chunks"
MAX_HEAD_DIM = 256
SHARED_MEMORY_FOR_KV = 128 * 1024  # bytes of K/V chunks in flight on a GPU (H100: 227 KiB in all)
LOG2_E = 1.4426950408889634
GPU_ROWS = 64  # query rows (tokens x GQA group) per tile on a GPU
GPU_WARPS = 4


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    tile_tokens_ptr, slots_ptr, positions_ptr,
    scale_log2e, D,
    stride_qt, stride_qh, stride_qd,
    stride_ks, stride_kl, stride_kh, stride_kd,
    stride_vs, stride_vl, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    ROWS: tl.constexpr = BLOCK_M * GROUP_PAD

    # Row r of the tile is query head (kv_head * GROUP + r % GROUP_PAD) of token r // GROUP_PAD.
    r = tl.arange(0, ROWS)
    group_idx = r % GROUP_PAD
    tok = tl.load(tile_tokens_ptr + tile * BLOCK_M + r // GROUP_PAD)
    first_tok = tl.load(tile_tokens_ptr + tile * BLOCK_M)
    row_ok = (tok >= 0) & (group_idx < GROUP)
    tok = tl.where(tok >= 0, tok, first_tok)  # padding rows copy a real token, so they stay finite
    pos = tl.load(positions_ptr + tok)
    slot = tl.load(slots_ptr + first_tok)
    kv_len = tl.max(pos, axis=0) + 1
    head = kv_head * GROUP + tl.where(group_idx < GROUP, group_idx, 0)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if INTERPRETED:
        q = q.to(tl.float32)
    k_base = k_ptr + slot * stride_ks + kv_head * stride_kh
    v_base = v_ptr + slot * stride_vs + kv_head * stride_vh

    row_max = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, kv_len, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < kv_len
        k = tl.load(k_base + n[None, :] * stride_kl + d[:, None] * stride_kd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vl + d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if INTERPRETED:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, k, input_precision="ieee") * scale_log2e
        scores = tl.where(n[None, :] <= pos[:, None], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.exp2(row_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        row_max = new_max

    out = acc / row_sum[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
             cast_to(out, out_ptr.dtype.element_ty, INTERPRETED), mask=row_ok[:, None] & d_ok[None, :])


def tile_config(group: int, head_dim: int, dtype: torch.dtype, rows: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_M query tokens per tile, BLOCK_D, num_stages) for one model's shapes.

    They depend only on the model (GQA group, head_dim, dtype), never on the
    batch, and BLOCK_N is the same everywhere. num_stages only pipelines loads
    and does not touch the numbers. On a GPU a tile holds about ``rows`` query
    rows (GPU_ROWS; 16 for wide heads), so it fits in shared memory; under the
    interpreter big tiles mean fewer (slow) programs.
    """
    group_pad = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if INTERPRET:
        return 64, block_d, 1
    elem = torch.finfo(dtype).bits // 8
    rows = rows or (GPU_ROWS if block_d * elem <= 256 else 16)
    kv_bytes_per_stage = 2 * BLOCK_N * block_d * elem
    return max(1, rows // group_pad), block_d, max(1, min(3, SHARED_MEMORY_FOR_KV // kv_bytes_per_stage))


def _build_tiles(slots: torch.Tensor, BLOCK_M: int) -> torch.Tensor:
    """[num_tiles, BLOCK_M] token indices, each row from one sequence, -1 as padding
    (on the CPU, from a CPU copy of slots).

    Tokens keep their batch order inside a sequence; which tile or row a token
    lands in does not change its result (see the module docstring).
    """
    T = slots.numel()
    order = torch.argsort(slots, stable=True)
    _, counts = torch.unique_consecutive(slots[order], return_counts=True)
    seq_of = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    seq_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(T) - seq_start[seq_of]
    tiles_per_seq = (counts + BLOCK_M - 1) // BLOCK_M
    first_tile = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq
    num_tiles = int(tiles_per_seq.sum().item())
    tiles = torch.full((num_tiles * BLOCK_M,), -1, dtype=torch.int64)
    tiles[(first_tile[seq_of] + rank // BLOCK_M) * BLOCK_M + rank % BLOCK_M] = order
    return tiles.view(num_tiles, BLOCK_M)


def _check(q, k_cache, v_cache, slots, positions) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"attention: expected q[T, Hq, D] and k_cache = v_cache shape [S, L, Hkv, D], got "
                         f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    T, Hq, D = q.shape
    S, L, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"attention: head_dim of q ({D}) and of the cache ({Dk}) differ")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim {D} is over the supported {MAX_HEAD_DIM}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"attention: q, k_cache and v_cache must share a dtype, got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if slots.shape != (T,) or positions.shape != (T,):
        raise ValueError(f"attention: slots and positions must have shape ({T},), got "
                         f"{tuple(slots.shape)} and {tuple(positions.shape)}")
    check_same_device(q, k_cache, v_cache, slots, positions)


def _check_indices(slots: torch.Tensor, positions: torch.Tensor, S: int, L: int) -> None:
    """On host copies: an index outside the cache would read or write out of bounds."""
    lo_slot, hi_slot, lo_pos, hi_pos = (int(slots.min()), int(slots.max()), int(positions.min()), int(positions.max()))
    if lo_slot < 0 or hi_slot >= S:
        raise ValueError(f"attention: slots must lie in [0, {S}), got {lo_slot}..{hi_slot}")
    if lo_pos < 0 or hi_pos >= L:
        raise ValueError(f"attention: positions must lie in [0, {L}), got {lo_pos}..{hi_pos}")


class _PlanMemo:
    """Inside ``one_plan_per_pass()``, the tile plan of the last (slots, positions) pair.

    The model passes the same two tensors to every layer of one forward pass,
    so planning (and its one device -> host copy) can happen once per pass
    instead of once per layer. Outside the block every call plans afresh: only
    the caller knows that the tensors do not change in between."""

    def __init__(self):
        self.depth = 0
        self.key: tuple | None = None
        self.tiles: torch.Tensor | None = None

    def tiles_for(self, slots: torch.Tensor, positions: torch.Tensor, BLOCK_M: int, S: int, L: int) -> torch.Tensor:
        key = (slots, positions, BLOCK_M, S, L)
        if self.depth and self.key is not None and all(
                a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(self.key, key)):
            return self.tiles
        # The one device -> host copy: tiles are planned on the host, where small
        # index work costs microseconds instead of a chain of synchronising kernels.
        host_slots, host_positions = torch.stack([slots, positions]).cpu()
        _check_indices(host_slots, host_positions, S, L)
        tiles = _build_tiles(host_slots, BLOCK_M).to(slots.device)
        if self.depth:
            self.key, self.tiles = key, tiles
        return tiles


_memo = _PlanMemo()


@contextlib.contextmanager
def one_plan_per_pass():
    """Reuse the tile plan while the same slots/positions tensors come back (one
    forward pass). The caller promises not to change them in place meanwhile."""
    _memo.depth += 1
    try:
        yield
    finally:
        _memo.depth -= 1
        if not _memo.depth:
            _memo.key = _memo.tiles = None


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slots: torch.Tensor, positions: torch.Tensor, scale: float,
              rows: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None) -> torch.Tensor:
    """Causal attention of q[T, Hq, D] over k/v_cache[S, L, Hkv, D] -> [T, Hq, D].

    ``rows``, ``num_warps`` and ``num_stages`` override the tile choice
    (benchmarks and tuning only; a server keeps one choice per model)."""
    _check(q, k_cache, v_cache, slots, positions)
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if T == 0 or Hq == 0 or D == 0:
        return out
    slots = slots.to(torch.int64).contiguous()
    positions = positions.to(torch.int64).contiguous()
    group = Hq // Hkv
    BLOCK_M, BLOCK_D, stages = tile_config(group, D, q.dtype, rows)
    tiles = _memo.tiles_for(slots, positions, BLOCK_M, k_cache.shape[0], k_cache.shape[1])
    _attention_kernel[(tiles.shape[0], Hkv)](
        q, k_cache, v_cache, out, tiles, slots, positions,
        float(scale) * LOG2_E, D,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), INTERPRETED=INTERPRET,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        num_warps=num_warps or GPU_WARPS, num_stages=num_stages or stages,
    )
    return out
