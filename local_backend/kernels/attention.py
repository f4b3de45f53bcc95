"""Batch-invariant causal attention over a KV cache, prefill and decode alike.

Query token t attends to k_cache[slots[t], 0 .. positions[t]] (its own K/V is
already in the cache). The host groups the batch's tokens into tiles of at
most BLOCK_M tokens of one sequence (BLOCK_M fixed per model: tile_config);
one program handles one tile for one KV head, with the whole GQA group of
query heads as extra rows.

The KV sweep is cut into splits of a fixed SPLIT positions (never a fixed
number of splits). Each split runs its own fp32 online softmax from a fresh
state, in chunks of BLOCK_N, and the split states are folded into the row's
result in split order 0, 1, 2, ... with one shared function (``_fold``). Two
launch shapes compute exactly that:
  * single pass: one program sweeps its tile's chunks in one flat loop and folds
    the running split state into the result at the end of every split;
  * split-KV (flash-decoding): one program per (tile, KV head, split) writes its
    split state to memory and a second kernel folds them, in the same order, with
    the same ``_fold``. Few sequences (decode at batch 1) then fill the GPU.
The host picks the shape per batch for speed; the bits do not depend on it.

Why it is batch-invariant:
  * A token sees the same chunks, grouped into the same splits, folded in the
    same order, whether it is decoded alone, prefilled with its prompt, or
    batched with other sequences, and whichever launch shape ran.
  * Every tile has the same fixed shape, and each query row of tl.dot depends
    only on that row, so a token's neighbours in the tile do not matter.
  * A tile sweeps up to its furthest token; for a row whose position lies
    before a chunk, that chunk is all -inf, so the update is an exact no-op:
    the max is unchanged, the rescale factor is exp2(0) = 1 and every
    probability is exp2(-inf) = 0. A split that lies wholly after a row's
    position is never folded into that row.
  * Chunks that every row of a tile sees in full skip the causal mask; the mask
    there would select every score unchanged, so the arithmetic is the same.
    Multiply-adds are written as explicit fma where both orders could occur,
    so the compiler cannot contract them differently in the two kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from local_backend.kernels._triton import (INTERPRET, cast_to, interpreted_dot, interpreted_matmul, tl,
                                             triton)
from local_backend.kernels import attention_hopper as hopper, combine_hopper, gluon_api
from local_backend.kernels.contracts import check_attention, check_attention_indices
from local_backend.kernels.pass_memo import memo, one_plan_per_pass
from local_backend.kernels.tile_plan import build_tiles as _build_tiles, sm_count
from triton.compiler.errors import CompilationError

BLOCK_N = 64   # KV positions per chunk; fixed, never "a fixed number of chunks"
SPLIT = 64 if INTERPRET else 512  # KV positions per split, a multiple of BLOCK_N; fixed per device kind
SHARED_MEMORY_FOR_KV = 128 * 1024  # bytes of K/V chunks in flight on a GPU (H100: 227 KiB in all)
LOG2_E = 1.4426950408889634
GPU_ROWS = 64  # query rows (tokens x GQA group) per tile on a GPU
GPU_WARPS = 4
COMBINE_UNROLL = 1 if INTERPRET else 8  # split states in flight at once in _combine_kernel (speed only)
GLUON_COMBINE = True  # after the Gluon kernel, combine_hopper's combine (the same bits, speed only)
# Which kernel runs when a call names none: "gluon" (attention_hopper.py on Hopper, this file's
# elsewhere) or "triton" (this file's everywhere). The same bits (tests/kernels/
# test_attention_hopper.py; bench_attention's "same" column), the Gluon one faster on Hopper
# (bench/NOTES.md, issue 15 round 7).
DEFAULT_KERNEL = os.environ.get("DETAUDIT_ATTENTION_KERNEL", "gluon")

__all__ = ["attention", "one_plan_per_pass", "tile_config", "BLOCK_N", "SPLIT"]


@triton.jit
def _chunk(q, k_base, v_base, n0, pos, kv_len, d, d_ok, m, l, acc, scale_log2e,
           stride_kl, stride_kd, stride_vl, stride_vd,
           MASKED: tl.constexpr, EVEN_D: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_N: tl.constexpr):
    """One online-softmax step over KV positions n0 .. n0 + BLOCK_N. The state m is
    the running max of the raw scores q.k; the scale is applied after subtracting it."""
    n = n0 + tl.arange(0, BLOCK_N)
    k_ptrs = k_base + n[None, :] * stride_kl + d[:, None] * stride_kd
    v_ptrs = v_base + n[:, None] * stride_vl + d[None, :] * stride_vd
    if MASKED:
        n_ok = n < kv_len
        if EVEN_D:
            k = tl.load(k_ptrs, mask=n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    if INTERPRETED:
        scores = interpreted_matmul(q, k)
    else:
        scores = tl.dot(q, k, input_precision="ieee")
    if MASKED:
        scores = tl.where(n[None, :] <= pos[:, None], scores, float("-inf"))
    new_max = tl.maximum(m, tl.max(scores, axis=1))
    rescale = tl.exp2((m - new_max) * scale_log2e)
    p = tl.exp2((scores - new_max[:, None]) * scale_log2e)
    l = tl.fma(l, rescale, tl.sum(p, axis=1))
    if INTERPRETED:
        acc = interpreted_dot(p, v, acc * rescale[:, None])
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None], input_precision="ieee")
    return new_max, l, acc


@triton.jit
def _split_state(q, k_base, v_base, s0, full_end, pos, kv_len, d, d_ok, scale_log2e,
                 stride_kl, stride_kd, stride_vl, stride_vd,
                 ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, EVEN_D: tl.constexpr,
                 INTERPRETED: tl.constexpr, BLOCK_N: tl.constexpr):
    """(max, sum, acc) of one split, from a fresh state. Chunks before ``full_end``
    are visible to every row of the tile and skip the mask."""
    s_end = tl.minimum(s0 + SPLIT, kv_len)
    mid = tl.maximum(tl.minimum(full_end, s_end), s0)
    m = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    for n0 in range(s0, mid, BLOCK_N):
        m, l, acc = _chunk(q, k_base, v_base, n0, pos, kv_len, d, d_ok, m, l, acc, scale_log2e,
                           stride_kl, stride_kd, stride_vl, stride_vd,
                           False, EVEN_D, INTERPRETED, BLOCK_N)
    for n0 in range(mid, s_end, BLOCK_N):
        m, l, acc = _chunk(q, k_base, v_base, n0, pos, kv_len, d, d_ok, m, l, acc, scale_log2e,
                           stride_kl, stride_kd, stride_vl, stride_vd,
                           True, EVEN_D, INTERPRETED, BLOCK_N)
    return m, l, acc


@triton.jit
def _fold(m, l, acc, m_s, l_s, acc_s, scale_log2e):
    """Fold one split's state into the running result; the only place that does.
    From the empty state (-inf, 0, 0) it returns the split's own state exactly."""
    new_max = tl.maximum(m, m_s)
    a = tl.exp2((m - new_max) * scale_log2e)
    b = tl.exp2((m_s - new_max) * scale_log2e)
    l = tl.fma(l, a, l_s * b)
    acc = tl.fma(acc, a[:, None], acc_s * b[:, None])
    return new_max, l, acc


@triton.jit
def _fold_if_split_ends(n0, kv_len, pos, m_all, l_all, acc_all, m, l, acc, scale_log2e,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """In the flat single-pass sweep: after the last chunk of a split, fold the split's
    state into the result and start the next split afresh. One loop instead of a
    loop per split keeps the loads pipelined across split boundaries."""
    end = n0 + BLOCK_N
    if (end % SPLIT == 0) | (end >= kv_len):
        m_f, l_f, acc_f = _fold(m_all, l_all, acc_all, m, l, acc, scale_log2e)
        seen = pos >= n0 // SPLIT * SPLIT  # rows before this split keep their result (theirs is NaN here)
        m_all = tl.where(seen, m_f, m_all)
        l_all = tl.where(seen, l_f, l_all)
        acc_all = tl.where(seen[:, None], acc_f, acc_all)
        m = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((ROWS,), dtype=tl.float32)
        acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    return m_all, l_all, acc_all, m, l, acc


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    tile_tokens_ptr, slots_ptr, positions_ptr,
    scale_log2e, D, HQ, NUM_SPLITS,
    stride_qt, stride_qh, stride_qd,
    stride_ks, stride_kl, stride_kh, stride_kd,
    stride_vs, stride_vl, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, INTERPRETED: tl.constexpr, PARTIALS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_D: tl.constexpr,
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
    full_end = (tl.min(pos, axis=0) + 1) // BLOCK_N * BLOCK_N  # chunks every row sees in full
    head = kv_head * GROUP + tl.where(group_idx < GROUP, group_idx, 0)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if INTERPRETED:
        q = q.to(tl.float32)
    k_base = k_ptr + slot * stride_ks + kv_head * stride_kh
    v_base = v_ptr + slot * stride_vs + kv_head * stride_vh

    if PARTIALS:  # this program: one split; its state goes to memory for _combine_kernel
        split = tl.program_id(2)
        s0 = split * SPLIT
        if s0 < kv_len:
            m_s, l_s, acc_s = _split_state(q, k_base, v_base, s0, full_end, pos, kv_len, d, d_ok, scale_log2e,
                                           stride_kl, stride_kd, stride_vl, stride_vd,
                                           ROWS, BLOCK_D, SPLIT, EVEN_D, INTERPRETED, BLOCK_N)
            part = (tok * HQ + head) * NUM_SPLITS + split
            keep = row_ok & (pos >= s0)
            tl.store(part_m_ptr + part, m_s, mask=keep)
            tl.store(part_l_ptr + part, l_s, mask=keep)
            tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc_s, mask=keep[:, None] & d_ok[None, :])
    else:  # this program: every split of the tile in one flat sweep, folded at each split's end
        m = tl.full((ROWS,), float("-inf"), dtype=tl.float32)  # the current split's state
        l = tl.zeros((ROWS,), dtype=tl.float32)
        acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        m_all = tl.full((ROWS,), float("-inf"), dtype=tl.float32)  # the splits folded so far
        l_all = tl.zeros((ROWS,), dtype=tl.float32)
        acc_all = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        for n0 in range(0, full_end, BLOCK_N):
            m, l, acc = _chunk(q, k_base, v_base, n0, pos, kv_len, d, d_ok, m, l, acc, scale_log2e,
                               stride_kl, stride_kd, stride_vl, stride_vd,
                               False, EVEN_D, INTERPRETED, BLOCK_N)
            m_all, l_all, acc_all, m, l, acc = _fold_if_split_ends(
                n0, kv_len, pos, m_all, l_all, acc_all, m, l, acc, scale_log2e, ROWS, BLOCK_D, SPLIT, BLOCK_N)
        for n0 in range(full_end, kv_len, BLOCK_N):
            m, l, acc = _chunk(q, k_base, v_base, n0, pos, kv_len, d, d_ok, m, l, acc, scale_log2e,
                               stride_kl, stride_kd, stride_vl, stride_vd,
                               True, EVEN_D, INTERPRETED, BLOCK_N)
            m_all, l_all, acc_all, m, l, acc = _fold_if_split_ends(
                n0, kv_len, pos, m_all, l_all, acc_all, m, l, acc, scale_log2e, ROWS, BLOCK_D, SPLIT, BLOCK_N)
        out = acc_all / l_all[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
                 cast_to(out, out_ptr.dtype.element_ty, INTERPRETED), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, positions_ptr,
    scale_log2e, D, HQ, NUM_SPLITS,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, UNROLL: tl.constexpr, D_SLICES: tl.constexpr,
):
    """One token's GQA group, one slice of head_dim: fold its split states 0, 1, 2, ...
    in order (each output column is folded on its own, so slices change nothing)."""
    BLOCK_DC: tl.constexpr = BLOCK_D // D_SLICES
    tok = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    head = kv_head * GROUP + tl.where(g_ok, g, 0)
    d = tl.program_id(2) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    d_ok = d < D
    pos = tl.load(positions_ptr + tok)
    base = (tok * HQ + head) * NUM_SPLITS
    m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, BLOCK_DC), dtype=tl.float32)
    num_splits = pos // SPLIT + 1
    for s0 in range(0, num_splits, UNROLL):
        # UNROLL splits per step: their loads do not depend on the folds, so they are
        # all in flight at once instead of one memory latency per split.
        for j in tl.static_range(UNROLL):
            ok = (s0 + j + g * 0) < num_splits  # [GROUP_PAD], all equal
            m_s = tl.load(part_m_ptr + base + s0 + j, mask=ok, other=float("-inf"))
            l_s = tl.load(part_l_ptr + base + s0 + j, mask=ok, other=0.0)
            acc_s = tl.load(part_acc_ptr + (base + s0 + j)[:, None] * D + d[None, :],
                            mask=ok[:, None] & d_ok[None, :], other=0.0)
            m_f, l_f, acc_f = _fold(m, l, acc, m_s, l_s, acc_s, scale_log2e)
            m = tl.where(ok, m_f, m)
            l = tl.where(ok, l_f, l)
            acc = tl.where(ok[:, None], acc_f, acc)
    out = acc / l[:, None]
    tl.store(out_ptr + tok * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
             cast_to(out, out_ptr.dtype.element_ty, INTERPRETED), mask=g_ok[:, None] & d_ok[None, :])


def tile_config(group: int, head_dim: int, dtype: torch.dtype, rows: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_M query tokens per tile, BLOCK_D, num_stages) for one model's shapes.

    They depend only on the model (GQA group, head_dim, dtype), never on the
    batch, and BLOCK_N and SPLIT are the same everywhere. num_stages only
    pipelines loads and does not touch the numbers. On a GPU a tile holds about
    ``rows`` query rows (GPU_ROWS; 16 for wide heads), so it fits in shared
    memory; under the interpreter big tiles mean fewer (slow) programs.
    """
    group_pad = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if INTERPRET:
        return 64, block_d, 1
    elem = torch.finfo(dtype).bits // 8
    rows = rows or (GPU_ROWS if block_d * elem <= 256 else 16)
    kv_bytes_per_stage = 2 * BLOCK_N * block_d * elem
    return max(1, rows // group_pad), block_d, max(1, min(3, SHARED_MEMORY_FOR_KV // kv_bytes_per_stage))


@dataclass
class _Plan:
    tiles: torch.Tensor  # [num_tiles, BLOCK_M] on the device
    num_splits: int      # splits of the longest row: max position // SPLIT + 1


def _make_plan(slots: torch.Tensor, positions: torch.Tensor, BLOCK_M: int, S: int, L: int) -> _Plan:
    # The one device -> host copy: tiles are planned on the host, where small
    # index work costs microseconds instead of a chain of synchronising kernels.
    host_slots, host_positions = torch.stack([slots, positions]).cpu()
    check_attention_indices(host_slots, host_positions, S, L)
    tiles = _build_tiles(host_slots.tolist(), BLOCK_M).to(slots.device)
    return _Plan(tiles, int(host_positions.max()) // SPLIT + 1)


def _decode_plan(T: int, device: torch.device, BLOCK_M: int, L: int) -> _Plan:
    """A decode pass (each token the only one of its sequence): tile t is [t, -1, ...],
    built on the device with no host copy, so a CUDA graph can capture it. The same
    tiles as _make_plan's up to their order, which never touches the bits. The split
    count covers the whole cache: splits past a row's position do no work and are
    never folded, so it changes only how many programs exit at once."""
    tiles = torch.full((T, BLOCK_M), -1, dtype=torch.int64, device=device)
    tiles[:, 0] = torch.arange(T, device=device)
    return _Plan(tiles, (L - 1) // SPLIT + 1)


def _wants_split_kv(device: torch.device, programs: int, num_splits: int) -> bool:
    """Split the KV sweep when one program per (tile, KV head) would leave most of
    the GPU idle (decode of few sequences). Speed only: the bits are the same."""
    if INTERPRET or device.type != "cuda" or num_splits < 2:
        return False
    return programs < sm_count(device)


def _slices_to_fill(device: torch.device, programs: int, block_d: int, narrowest: int = 32) -> int:
    """Slices of head_dim (a power of two, each at least ``narrowest`` wide) that bring
    ``programs`` up to two per SM. Speed only."""
    if INTERPRET or device.type != "cuda":
        return 1
    slices = 1
    while programs * slices < 2 * sm_count(device) and block_d // (2 * slices) >= narrowest:
        slices *= 2
    return slices


def _hopper_attention(q, k_cache, v_cache, slots, positions, scale, out, split_kv, stages, combine_slices,
                      persistent=True):
    """The Gluon kernels of attention_hopper.py, planned like this file's; split-KV states
    folded by combine_hopper's kernel (or, GLUON_COMBINE off, this file's)."""
    T, Hq, D = q.shape
    S, L, Hkv, _ = k_cache.shape
    group_pad = triton.next_power_of_2(Hq // Hkv)
    if memo.decode_only:
        plan = memo.get("hopper-decode", (slots, positions, L, SPLIT),
                        lambda: hopper.decode_plan(slots, positions, group_pad, SPLIT, L))
    else:
        def build():
            host_slots, host_positions = torch.stack([slots, positions]).cpu()
            check_attention_indices(host_slots, host_positions, S, L)
            return hopper.host_plan(host_slots.tolist(), host_positions.tolist(), group_pad, SPLIT, q.device)
        plan = memo.get("hopper", (slots, positions, S, L, SPLIT), build)
    if split_kv is None:
        split_kv = _wants_split_kv(q.device, plan.tiles.shape[0] * Hkv, plan.num_splits)
    scale_log2e = float(scale) * LOG2_E
    if not split_kv:
        hopper.launch(q, k_cache, v_cache, plan, out, None, scale_log2e, BLOCK_N, SPLIT, stages, persistent)
        return out
    splits = plan.num_splits
    part_m = torch.empty((T, Hq, splits), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((T, Hq, splits, D), dtype=torch.float32, device=q.device)
    hopper.launch(q, k_cache, v_cache, plan, out, (part_m, part_l, part_acc), scale_log2e, BLOCK_N,
                  SPLIT, stages, persistent)
    _combine(part_m, part_l, part_acc, out, positions, scale_log2e, splits, Hkv, combine_slices, GLUON_COMBINE)
    return out


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slots: torch.Tensor, positions: torch.Tensor, scale: float,
              rows: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None, split_kv: bool | None = None,
              kernel: str | None = None, combine_slices: int | None = None) -> torch.Tensor:
    """Causal attention of q[T, Hq, D] over k/v_cache[S, L, Hkv, D] -> [T, Hq, D].

    ``rows``, ``num_warps`` and ``num_stages`` override the tile choice
    (benchmarks and tuning only; a server keeps one choice per model).
    ``split_kv`` forces the launch shape (None: chosen per batch); it never
    changes the result's bits. ``kernel``: "gluon" (Hopper: attention_hopper.py, persistent
    programs; "gluon-grid" one program per work item), "triton" (this file's kernel), None:
    ``DEFAULT_KERNEL``. ``combine_slices``:
    slices of head_dim per combine program (None: enough to fill the GPU)."""
    check_attention(q, k_cache, v_cache, slots, positions)
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if T == 0 or Hq == 0 or D == 0:
        return out
    assert SPLIT % BLOCK_N == 0, "SPLIT must be a multiple of BLOCK_N"
    slots = slots.to(torch.int64).contiguous()
    positions = positions.to(torch.int64).contiguous()
    group = Hq // Hkv
    chosen = kernel is None and DEFAULT_KERNEL == "gluon" and hopper.supports(q, k_cache, v_cache) \
        and not gluon_api.refused("attention")
    if chosen:
        kernel = "gluon"
    if kernel in ("gluon", "gluon-grid"):
        try:
            return _hopper_attention(q, k_cache, v_cache, slots, positions, scale, out, split_kv, num_stages,
                                     combine_slices, persistent=kernel == "gluon")
        except CompilationError as error:  # this Triton cannot build it: the Triton kernel, the same bits
            if not chosen:
                raise
            gluon_api.refuse("attention", error)
    BLOCK_M, BLOCK_D, stages = tile_config(group, D, q.dtype, rows)
    S, L = k_cache.shape[:2]
    if memo.decode_only:  # planned on the device: capturable in a CUDA graph
        plan = memo.get("batch-invariant-decode", (slots, BLOCK_M, L, SPLIT),
                        lambda: _decode_plan(T, q.device, BLOCK_M, L))
    else:
        plan = memo.get("batch-invariant", (slots, positions, BLOCK_M, S, L, SPLIT),
                        lambda: _make_plan(slots, positions, BLOCK_M, S, L))
    num_tiles = plan.tiles.shape[0]
    if split_kv is None:
        split_kv = _wants_split_kv(q.device, num_tiles * Hkv, plan.num_splits)
    splits = plan.num_splits if split_kv else 1
    if split_kv:
        part_m = torch.empty((T, Hq, splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((T, Hq, splits, D), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # not read: the single pass folds in registers
    common = dict(GROUP=group, GROUP_PAD=triton.next_power_of_2(group), INTERPRETED=INTERPRET,
                  BLOCK_D=BLOCK_D, SPLIT=SPLIT)
    scale_log2e = float(scale) * LOG2_E
    _attention_kernel[(num_tiles, Hkv, splits)](
        q, k_cache, v_cache, out, part_m, part_l, part_acc, plan.tiles, slots, positions,
        scale_log2e, D, Hq, splits,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        PARTIALS=split_kv, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EVEN_D=D == BLOCK_D, **common,
        num_warps=num_warps or GPU_WARPS, num_stages=num_stages or stages,
    )
    if split_kv:
        _combine(part_m, part_l, part_acc, out, positions, scale_log2e, splits, Hkv, combine_slices)
    return out


def _combine(part_m, part_l, part_acc, out, positions, scale_log2e, splits, Hkv, slices, gluon=False):
    """Fold every token's split states in split order (``_combine_kernel``, or with ``gluon``
    combine_hopper's kernel: the same bits), over ``slices`` slices of head_dim per (token,
    KV head): each output column is folded on its own."""
    T, Hq, D = out.shape
    block_d = max(16, triton.next_power_of_2(D))
    if slices is None:  # the Gluon combine: whole rows up to 8 splits (H100, bench/NOTES.md round 8)
        slices = 1 if gluon and splits <= 8 else _slices_to_fill(out.device, T * Hkv, block_d)
    if gluon:
        combine_hopper.combine(part_m, part_l, part_acc, out, positions, scale_log2e, splits, Hkv, slices, SPLIT)
        return
    group = Hq // Hkv
    _combine_kernel[(T, Hkv, slices)](
        part_m, part_l, part_acc, out, positions, scale_log2e, D, Hq, splits, *out.stride(),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), INTERPRETED=INTERPRET, BLOCK_D=block_d, SPLIT=SPLIT,
        UNROLL=COMBINE_UNROLL, D_SLICES=slices, num_warps=1 if INTERPRET else 4,
    )
