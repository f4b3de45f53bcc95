"""Batch-invariant attention on Hopper (sm_90), written in Gluon: the same arithmetic
as ``attention.py``'s Triton kernel, laid out by hand so the hardware can overlap it.

Why a second kernel: the Triton kernel leaves the tensor cores, the copy engine and the
softmax taking turns in one warpgroup (no K/V load was pipelined, one 64-row tile
per program); here
  * one producer warp streams K/V chunks into a ring of shared-memory stages by bulk
    tensor copies (TMA), signalled through mbarriers, while
  * one or two consumer warpgroups each own 64 query rows (tokens x GQA group) and run
    the chunk steps: S = Q K^T and O += P V as asynchronous wgmma, the online softmax in
    between. Two consumers share every K/V chunk of one sequence (prefill); decode tiles
    (one token each) use one, with the dots transposed (_decode_tile: the token's GQA group
    is the wgmma N, so the tensor cores do no work for padding rows);
  * programs are persistent: each takes work items (tile, KV head, split) in turn, dealt
    out in a snake order that evens out the work per program, and the producer streams
    the next item's chunks while the consumers finish the last one.

Why it is batch-invariant, and the same bits as the Triton kernel's math: every
consumer warpgroup computes its rows with the layouts written below, fixed per model
(64 rows over 4 warps, wgmma instruction shapes [16, BLOCK_N, 16] for S and [16, D, 16]
for O), never per batch. A row's chunk step (scores, running max, exp2 of the scaled
difference, the row sum over the same lanes in the same order, the rescale and the P V
accumulation) and its split folds (``SPLIT`` positions, folded in split order) depend
on that row alone, exactly as the module docstring of ``attention.py`` argues; which
warpgroup, tile, program or launch shape (one pass or split-KV) computes a row only
moves work around. Split-KV states are folded by ``combine_hopper`` (the bits of
``attention._combine_kernel``).

The K/V sweep's last chunk may run past the sequence into cache positions that hold
anything (NaN too): those rows of its V stage are zeroed in place before the P V dot, so
P = 0 meets finite values, as the Triton kernel's masked load does.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass

import torch

from local_backend.kernels._triton import INTERPRET, triton  # noqa: F401  (first: it sets the interpreter switch)
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from local_backend.kernels.gluon_api import cp_async_load, cta_barrier, tma_load, tma_store
from local_backend.kernels.tile_plan import build_tiles, sm_count

ROWS = 64  # query rows per consumer warpgroup: the wgmma M of one warpgroup
# Two consumers take turns at the tensor cores (_sweep_pingpong). Speed only; the switch is
# for benches and for a device whose first run of it hangs (bench/gpu_issue15.sh turns it off).
PINGPONG = os.environ.get("DETAUDIT_ATTENTION_PINGPONG", "1") != "0"
CONSUMER_WARPS = gl.constexpr(4)
PRODUCER_REGS = gl.constexpr(24)  # a warp that only issues copies needs the fewest registers there are
CONSUMER_REGS = gl.constexpr(240)  # the rest of the register file, for the accumulators


@gluon.jit
def _rows(tiles_ptr, tile_pos_ptr, cta, wg, kv_head, kv_len, layout: gl.constexpr,
          GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, TOKENS: gl.constexpr, CONSUMERS: gl.constexpr):
    """This warpgroup's rows (in ``layout``): row r is query head kv_head * GROUP + r % GROUP_PAD
    of the tile's token r // GROUP_PAD. Padding rows copy the tile's first token (so they
    stay finite) and are never stored. Tokens and their positions come in one round trip
    (the plan holds both: a work item's start is a chain of loads). Positions are int32
    (the causal mask's compare: 1-2% of a short prefill, bench/NOTES.md round 10)."""
    r = gl.arange(0, TOKENS * GROUP_PAD, layout=layout)
    g = r % GROUP_PAD
    head = kv_head * GROUP + gl.where(g < GROUP, g, 0)
    row = cta * (CONSUMERS * TOKENS) + wg * TOKENS + r // GROUP_PAD
    tok, row_ok, pos = _planned_rows(gl.load(tiles_ptr + row), gl.load(tile_pos_ptr + row), g, GROUP)
    return tok, head, row_ok, pos


@gluon.jit
def _planned_rows(tok, pos, g, GROUP: gl.constexpr):
    """A prefill plan's row entries as read (from global or shared memory): the token (a
    padding row's entry is -1 - the tile's first token: host_plan), whether the row is real,
    its position as int32."""
    return gl.where(tok >= 0, tok, -1 - tok), (tok >= 0) & (g < GROUP), pos.to(gl.int32)


@gluon.jit
def _copy_meta(meta_smem, buf, tiles_ptr, tile_pos_ptr, cta_len_ptr, w, num_items, wg, HKV, NUM_SPLITS,
               ROWS_: gl.constexpr, GROUP_PAD: gl.constexpr, TOKENS: gl.constexpr, CONSUMERS: gl.constexpr):
    """Start copying what work item w's start needs into buffer ``buf`` of meta_smem
    (cp.async, no wait): this warpgroup's row tokens, their positions, and the tile's length
    (in every row). The item then starts on shared memory instead of a round trip to global
    memory (13% of the kernel at 8 x 512, 7% at 4 x 1024: bench/NOTES.md, round 10).
    Nothing for w past the last."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    r = gl.arange(0, ROWS_, layout=layout)
    cta = (gl.minimum(w, num_items - 1) // (HKV * NUM_SPLITS)).to(gl.int64)
    row = cta * (CONSUMERS * TOKENS) + wg * TOKENS + r // GROUP_PAD
    wanted = (r >= 0) & (w < num_items)
    cp_async_load(meta_smem.index(3 * buf), tiles_ptr + row, mask=wanted)
    cp_async_load(meta_smem.index(3 * buf + 1), tile_pos_ptr + row, mask=wanted)
    cp_async_load(meta_smem.index(3 * buf + 2), cta_len_ptr + cta + r * 0, mask=wanted)


@gluon.jit
def _meta_rows(meta_smem, buf, kv_head, layout: gl.constexpr, GROUP: gl.constexpr, GROUP_PAD: gl.constexpr,
               ROWS_: gl.constexpr):
    """_rows from a _copy_meta copy that has landed."""
    r = gl.arange(0, ROWS_, layout=layout)
    g = r % GROUP_PAD
    head = kv_head * GROUP + gl.where(g < GROUP, g, 0)
    tok, row_ok, pos = _planned_rows(meta_smem.index(3 * buf).load(layout), meta_smem.index(3 * buf + 1).load(layout),
                                     g, GROUP)
    return tok, head, row_ok, pos


@gluon.jit
def _meta_first(meta_smem, index):
    """Row 0 of meta_smem.index(index), a _copy_meta copy that has landed, as a scalar (every
    thread reads the one row, so the reduction to a scalar stays in registers)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    return gl.max(meta_smem.index(index).slice(0, 1).load(layout), axis=0)


@gluon.jit
def _meta_len(meta_smem, buf):
    """The tile length of a _copy_meta copy that has landed (``cta_len``'s low 32 bits)."""
    return _meta_first(meta_smem, 3 * buf + 2).to(gl.int32)


@gluon.jit
def _meta_bulk(meta_smem, buf, wg):
    """Whether warpgroup wg's rows of a _copy_meta copy are one box of the output (host_plan's
    bit 32 + wg of ``cta_len``): its tokens real and consecutive."""
    return ((_meta_first(meta_smem, 3 * buf + 2) >> (32 + wg)) & 1) != 0


@gluon.jit
def _item_index(j, pid, programs):
    """The work item a program takes j-th: items are dealt out in rounds of one per program,
    every other round in reverse (program 0 takes the first item of round 0 and the last
    of round 1). Items come longest first, so a plain round-robin hands program 0 the
    longest item of every round (12% more work than the mean at 1 x 4096); the snake
    evens that out. Speed only: which program computes an item never changes its bits."""
    odd = j % 2
    return j * programs + pid + odd * (programs - 1 - 2 * pid)


@gluon.jit
def _item(w, cta_slot_ptr, cta_len_ptr, HKV, NUM_SPLITS, L, SPLIT: gl.constexpr, PARTIALS: gl.constexpr):
    """Work item w: tile w // (HKV * NUM_SPLITS) (the plan stores tiles in sweep order), its
    KV head and split, the cache row of its sequence's position 0, and the positions
    c_lo .. c_hi its sweep covers (none for a split past the tile's end)."""
    cta = (w // (HKV * NUM_SPLITS)).to(gl.int64)
    kv_len = gl.load(cta_len_ptr + cta).to(gl.int32)
    row0 = gl.load(cta_slot_ptr + cta).to(gl.int32) * L
    cta, kv_head, split, c_lo, c_hi = _item_span(w, kv_len, HKV, NUM_SPLITS, SPLIT, PARTIALS)
    return cta, kv_head, split, kv_len, row0, c_lo, c_hi


@gluon.jit
def _item_span(w, kv_len, HKV, NUM_SPLITS, SPLIT: gl.constexpr, PARTIALS: gl.constexpr):
    """_item's tile, KV head, split and positions c_lo .. c_hi, given the tile's length."""
    cta = (w // (HKV * NUM_SPLITS)).to(gl.int64)
    kv_head = (w // NUM_SPLITS) % HKV
    split = w % NUM_SPLITS
    if PARTIALS:
        c_lo = split * SPLIT
        c_hi = gl.minimum(c_lo + SPLIT, kv_len)
    else:
        c_lo = split * 0
        c_hi = kv_len
    return cta, kv_head, split, c_lo, c_hi


@gluon.jit
def _load_partition(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                    cta_slot_ptr, cta_len_ptr, num_items, HKV, NUM_SPLITS, L,
                    BLOCK_N: gl.constexpr, D: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
                    PARTIALS: gl.constexpr):
    """The producer warp: the K and V chunks of this program's work items, one item after
    the other through one ring, each K (V) stage as soon as every consumer has released it
    (K after its scores, V after its P V). It runs ahead into the next item while the
    consumers finish one, so no item starts waiting for its first copies."""
    i = 0
    programs = gl.num_programs(0)
    for j in range(0, gl.cdiv(num_items, programs)):
        w = _item_index(j, gl.program_id(0), programs)
        if w < num_items:
            _, kv_head, _, _, row0, c_lo, c_hi = _item(w, cta_slot_ptr, cta_len_ptr, HKV, NUM_SPLITS, L, SPLIT,
                                                       PARTIALS)
            for n0 in range(c_lo, c_hi, BLOCK_N):
                s = i % STAGES
                phase = ((i // STAGES) & 1) ^ 1
                mbarrier.wait(k_empty.index(s), phase)
                mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
                tma_load(k_desc, [row0 + n0, kv_head * D], k_ready.index(s), k_smem.index(s))
                mbarrier.wait(v_empty.index(s), phase)
                mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
                tma_load(v_desc, [row0 + n0, kv_head * D], v_ready.index(s), v_smem.index(s))
                i += 1


@gluon.jit
def _causal_mask(scores, n0, pos_s, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """Scores of positions after a row's own position -> -inf."""
    n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    return gl.where(n[None, :] <= pos_s[:, None], scores, float("-inf"))


@gluon.jit
def _online_softmax(scores, m, l, scale_log2e):
    """The online-softmax update of one chunk (``attention._chunk``'s arithmetic): the new
    running max, the new running sum, the probabilities, the rescale factor of the
    accumulator. The max is of the raw scores; the scale comes after. The row sum's order
    is the layout's: a thread's columns in register order, then its lanes (the same in
    ``s_layout`` and ``_decode_tile``'s ``rows``)."""
    new_max = gl.maximum(m, gl.max(scores, axis=1))
    rescale = gl.exp2((m - new_max) * scale_log2e)
    p = gl.exp2((scores - new_max[:, None]) * scale_log2e)
    l = gl.fma(l, rescale, gl.sum(p, axis=1))
    return new_max, l, p, rescale


@gluon.jit
def _softmax(scores, m, l, scale_log2e, dtype: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
    """_online_softmax with the probabilities as the P V operand and the rescale factor in
    the accumulator's rows."""
    new_max, l, p, rescale = _online_softmax(scores, m, l, scale_log2e)
    return new_max, l, gl.convert_layout(p.to(dtype), p_layout), gl.convert_layout(rescale, gl.SliceLayout(1, o_layout))


@gluon.jit
def _fresh_state(ROWS_: gl.constexpr, row_layout: gl.constexpr, ACC_M: gl.constexpr, ACC_N: gl.constexpr,
                 acc_layout: gl.constexpr):
    """An online softmax's state before its first chunk: running max -inf, sum 0, accumulator 0."""
    return (gl.full([ROWS_], float("-inf"), gl.float32, row_layout), gl.zeros([ROWS_], gl.float32, row_layout),
            gl.zeros([ACC_M, ACC_N], gl.float32, acc_layout))


@gluon.jit
def _zero_past_end(v_buf, n0, kv_len, BLOCK_N: gl.constexpr, v_io: gl.constexpr):
    """Zero, in the stage itself, this V chunk's rows at positions >= kv_len before the P V
    dot reads them. With two consumers both write the same zeros: whichever store lands
    last, the values are the same; the stage is reloaded only after both have released it."""
    rows_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, v_io))
    v = v_buf.load(v_io)
    v_buf.store(gl.where((rows_n < kv_len)[:, None], v, gl.zeros_like(v)))
    fence_async_shared()
    cta_barrier()


@gluon.jit
def _chunk_step(i, n0, mid, kv_len, pos_s, q_buf, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, m, l, acc,
                scale_log2e, ROWS_: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                p_layout: gl.constexpr, v_io: gl.constexpr):
    """One online-softmax step over KV positions n0 .. n0 + BLOCK_N (``attention._chunk``'s
    arithmetic, operation for operation). Chunks from ``mid`` on are masked (those before
    are seen in full by every row); the mask is a branch, not a second copy of the step,
    so the sweep is one loop of one body."""
    scores = warpgroup_mma_wait(0, deps=(_issue_scores(i, q_buf, k_smem, k_ready, ROWS_, BLOCK_N, STAGES,
                                                       s_layout), ))
    mbarrier.arrive(k_empty.index(i % STAGES), count=1)
    new_max, l, p_op, acc = _softmax_scaled(i, n0, mid, kv_len, pos_s, scores, v_smem, v_ready, m, l, acc,
                                            scale_log2e, BLOCK_N, STAGES, s_layout, o_layout, p_layout, v_io)
    acc = warpgroup_mma(p_op, v_smem.index(i % STAGES), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    mbarrier.arrive(v_empty.index(i % STAGES), count=1)
    return new_max, l, acc


@gluon.jit
def _sweep_range(base, c_lo, lo, hi, c_hi, mid, kv_len, pos_s, pos_o, q_buf, k_smem, v_smem,
                 k_ready, v_ready, k_empty, v_empty, m, l, acc, m_all, l_all, acc_all, scale_log2e,
                 PARTIALS: gl.constexpr, ROWS_: gl.constexpr, BLOCK_N: gl.constexpr,
                 D: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
                 o_layout: gl.constexpr, p_layout: gl.constexpr, v_io: gl.constexpr):
    """Chunks lo .. hi of the sweep c_lo .. c_hi, one _chunk_step after the other, each split
    folded at its end (single pass). ``base``: the ring position of chunk c_lo."""
    for n0 in range(lo, hi, BLOCK_N):
        m, l, acc = _chunk_step(base + (n0 - c_lo) // BLOCK_N, n0, mid, kv_len, pos_s, q_buf, k_smem, v_smem,
                                k_ready, v_ready, k_empty, v_empty, m, l, acc, scale_log2e, ROWS_, BLOCK_N, D, STAGES,
                                s_layout, o_layout, p_layout, v_io)
        if not PARTIALS:
            m_all, l_all, acc_all, m, l, acc = _fold_at_split_end(n0, c_hi, pos_s, pos_o, m_all, l_all, acc_all,
                                                                  m, l, acc, scale_log2e, BLOCK_N, SPLIT,
                                                                  o_layout)
    return m, l, acc, m_all, l_all, acc_all


@gluon.jit
def _sweep(base, c_lo, c_hi, mid, kv_len, pos_s, pos_o, q_buf, k_smem, v_smem,
           k_ready, v_ready, k_empty, v_empty, m, l, acc, m_all, l_all, acc_all, scale_log2e,
           PARTIALS: gl.constexpr, ROWS_: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
           SPLIT: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
           p_layout: gl.constexpr, v_io: gl.constexpr, wg, turn, turns, PINGPONG: gl.constexpr):
    """Chunks c_lo .. c_hi; those before ``mid`` are seen in full by every row and skip the
    mask. Each chunk step waits for its own dots (the next chunk's scores issued before this
    one's softmax, FA3-style, measured slower in prefill, bench/NOTES.md round 7, and no faster
    in decode, round 11). PINGPONG (two consumers): the warpgroups take turns at the tensor
    cores (_sweep_pingpong)."""
    if PINGPONG:
        m, l, acc, m_all, l_all, acc_all = _sweep_pingpong(
            base, wg, turn, turns, c_lo, c_hi, mid, kv_len, pos_s, pos_o, q_buf, k_smem, v_smem, k_ready, v_ready,
            k_empty, v_empty, m, l, acc, m_all, l_all, acc_all, scale_log2e, PARTIALS, ROWS_, BLOCK_N, D, SPLIT,
            STAGES, s_layout, o_layout, p_layout, v_io)
        return m, l, acc, m_all, l_all, acc_all
    m, l, acc, m_all, l_all, acc_all = _sweep_range(
        base, c_lo, c_lo, c_hi, c_hi, mid, kv_len, pos_s, pos_o, q_buf, k_smem, v_smem, k_ready, v_ready, k_empty,
        v_empty, m, l, acc, m_all, l_all, acc_all, scale_log2e, PARTIALS, ROWS_, BLOCK_N, D, SPLIT, STAGES,
        s_layout, o_layout, p_layout, v_io)
    return m, l, acc, m_all, l_all, acc_all


@gluon.jit
def _issue_scores(i, q_buf, k_smem, k_ready, ROWS_: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  s_layout: gl.constexpr):
    """S = Q K^T of the chunk at ring position i, issued as soon as its K stage lands (not waited for)."""
    mbarrier.wait(k_ready.index(i % STAGES), (i // STAGES) & 1)
    return warpgroup_mma(q_buf, k_smem.index(i % STAGES).permute((1, 0)),
                         gl.zeros([ROWS_, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)


@gluon.jit
def _my_turn(turn, wg, k):
    """Wait until warpgroup wg may issue its k-th block of dots: warpgroup 0 goes first, then
    the two take turns (each passes the turn on right after issuing: _pass_turn)."""
    mbarrier.wait(turn.index(wg), (k & 1) ^ (1 - wg))


@gluon.jit
def _pass_turn(turn, wg):
    mbarrier.arrive(turn.index(1 - wg), count=1)


@gluon.jit
def _softmax_scaled(i, n0, mid, kv_len, pos_s, scores, v_smem, v_ready, m, l, acc, scale_log2e,
                    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                    p_layout: gl.constexpr, v_io: gl.constexpr):
    """A chunk step between its two dots: the chunk's probabilities, the accumulator rescaled,
    its V stage landed (and zeroed past the sweep's end)."""
    if n0 >= mid:
        scores = _causal_mask(scores, n0, pos_s, BLOCK_N, s_layout)
    v_buf = v_smem.index(i % STAGES)
    new_max, l, p_op, rescale_o = _softmax(scores, m, l, scale_log2e, v_buf.dtype, o_layout, p_layout)
    acc = acc * rescale_o[:, None]
    mbarrier.wait(v_ready.index(i % STAGES), (i // STAGES) & 1)
    if n0 + BLOCK_N > kv_len:  # the sweep's last chunk: rows past its end may hold anything
        _zero_past_end(v_buf, n0, kv_len, BLOCK_N, v_io)
    return new_max, l, p_op, acc


@gluon.jit
def _sweep_pingpong(base, wg, turn, turns, c_lo, c_hi, mid, kv_len, pos_s, pos_o, q_buf, k_smem, v_smem,
                    k_ready, v_ready, k_empty, v_empty, m, l, acc, m_all, l_all, acc_all, scale_log2e,
                    PARTIALS: gl.constexpr, ROWS_: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                    SPLIT: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                    p_layout: gl.constexpr, v_io: gl.constexpr):
    """_sweep_range's chunk steps for two consumers that take turns at the tensor cores
    (FA3's ping-pong): a warpgroup issues one block of dots, the last chunk's P V and this
    chunk's scores, passes the turn, and runs this chunk's softmax while the other
    warpgroup's block runs. Both share every K/V chunk, so unpaced they start each chunk
    together, run their dots together and their softmaxes together, and the tensor cores
    idle through the softmaxes. ``turns``: blocks this warpgroup issued before this item.
    Each step's operations on a row are _chunk_step's in the same order (the P V of a chunk
    is only issued later, after the accumulator's rescale as before), so the same bits."""
    _my_turn(turn, wg, turns)
    scores = _issue_scores(base, q_buf, k_smem, k_ready, ROWS_, BLOCK_N, STAGES, s_layout)
    _pass_turn(turn, wg)
    scores = warpgroup_mma_wait(0, deps=(scores, ))
    mbarrier.arrive(k_empty.index(base % STAGES), count=1)
    m, l, p_op, acc = _softmax_scaled(base, c_lo, mid, kv_len, pos_s, scores, v_smem, v_ready, m, l, acc,
                                      scale_log2e, BLOCK_N, STAGES, s_layout, o_layout, p_layout, v_io)
    for n0 in range(c_lo + BLOCK_N, c_hi, BLOCK_N):
        c = (n0 - c_lo) // BLOCK_N
        i = base + c
        _my_turn(turn, wg, turns + c)
        acc = warpgroup_mma(p_op, v_smem.index((i - 1) % STAGES), acc, is_async=True)
        ahead = _issue_scores(i, q_buf, k_smem, k_ready, ROWS_, BLOCK_N, STAGES, s_layout)
        _pass_turn(turn, wg)
        acc, scores = warpgroup_mma_wait(0, deps=(acc, ahead))
        mbarrier.arrive(v_empty.index((i - 1) % STAGES), count=1)
        mbarrier.arrive(k_empty.index(i % STAGES), count=1)
        if not PARTIALS:
            m_all, l_all, acc_all, m, l, acc = _fold_at_split_end(n0 - BLOCK_N, c_hi, pos_s, pos_o, m_all, l_all,
                                                                  acc_all, m, l, acc, scale_log2e, BLOCK_N, SPLIT,
                                                                  o_layout)
        m, l, p_op, acc = _softmax_scaled(i, n0, mid, kv_len, pos_s, scores, v_smem, v_ready, m, l, acc,
                                          scale_log2e, BLOCK_N, STAGES, s_layout, o_layout, p_layout, v_io)
    c = (c_hi - 1 - c_lo) // BLOCK_N  # the last chunk's P V
    _my_turn(turn, wg, turns + c + 1)
    acc = warpgroup_mma(p_op, v_smem.index((base + c) % STAGES), acc, is_async=True)
    _pass_turn(turn, wg)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    mbarrier.arrive(v_empty.index((base + c) % STAGES), count=1)
    if not PARTIALS:
        m_all, l_all, acc_all, m, l, acc = _fold_at_split_end(c_lo + c * BLOCK_N, c_hi, pos_s, pos_o, m_all, l_all,
                                                              acc_all, m, l, acc, scale_log2e, BLOCK_N, SPLIT,
                                                              o_layout)
    return m, l, acc, m_all, l_all, acc_all


@gluon.jit
def _fold_rows(m_all, l_all, m, l, scale_log2e):
    """``attention._fold``'s per-row part: the folded max and sum, and the factors that
    rescale the result so far (a) and the split's state (b)."""
    m_f = gl.maximum(m_all, m)
    a = gl.exp2((m_all - m_f) * scale_log2e)
    b = gl.exp2((m - m_f) * scale_log2e)
    return m_f, a, b, gl.fma(l_all, a, l * b)


@gluon.jit
def _fold(n0, pos_s, pos_o, m_all, l_all, acc_all, m, l, acc, scale_log2e, SPLIT: gl.constexpr,
          o_layout: gl.constexpr):
    """Fold the state of the split holding chunk n0 into the result (``attention._fold``'s
    arithmetic) and start the next split afresh; rows before the split keep theirs."""
    m_f, a, b, l_f = _fold_rows(m_all, l_all, m, l, scale_log2e)
    a_o = gl.convert_layout(a, gl.SliceLayout(1, o_layout))
    b_o = gl.convert_layout(b, gl.SliceLayout(1, o_layout))
    acc_f = gl.fma(acc_all, a_o[:, None], acc * b_o[:, None])
    start = n0 // SPLIT * SPLIT
    m_all = gl.where(pos_s >= start, m_f, m_all)
    l_all = gl.where(pos_s >= start, l_f, l_all)
    acc_all = gl.where((pos_o >= start)[:, None], acc_f, acc_all)
    return m_all, l_all, acc_all, gl.full_like(m, float("-inf")), gl.zeros_like(l), gl.zeros_like(acc)


@gluon.jit
def _fold_at_split_end(n0, c_hi, pos_s, pos_o, m_all, l_all, acc_all, m, l, acc, scale_log2e,
                       BLOCK_N: gl.constexpr, SPLIT: gl.constexpr, o_layout: gl.constexpr):
    """_fold after a split's last chunk."""
    if ((n0 + BLOCK_N) % SPLIT == 0) | (n0 + BLOCK_N >= c_hi):
        m_all, l_all, acc_all, m, l, acc = _fold(n0, pos_s, pos_o, m_all, l_all, acc_all, m, l, acc, scale_log2e,
                                                 SPLIT, o_layout)
    return m_all, l_all, acc_all, m, l, acc


@gluon.jit
def _tile(wg, base, q_buf, meta_smem, meta, out_buf, out_desc, q_ptr, out_ptr, part_m_ptr, part_l_ptr,
          part_acc_ptr, tiles_ptr, tile_pos_ptr, cta, kv_head, kv_len, c_lo, c_hi, split, scale_log2e, HQ, NUM_SPLITS,
          stride_qt, stride_qh, stride_ot, stride_oh,
          k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
          GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, TOKENS: gl.constexpr,
          CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, SPLIT: gl.constexpr,
          STAGES: gl.constexpr, PARTIALS: gl.constexpr, Q_AHEAD: gl.constexpr,
          BULK_OUT: gl.constexpr, turn, turns, PINGPONG: gl.constexpr):
    """One work item of a consumer warpgroup: its 64 rows over chunks c_lo .. c_hi; the
    folded result (single pass) or this split's state (split-KV) to memory. With Q_AHEAD,
    ``q_buf`` and buffer ``meta`` of ``meta_smem`` hold its Q rows and row facts already
    (copied in the background during the last items); else the rows are loaded here.
    BULK_OUT: rows that are one box of the output (_meta_bulk) leave by a bulk copy from
    ``out_buf`` (_store_bulk); others by _store_rows."""
    ROWS_: gl.constexpr = TOKENS * GROUP_PAD
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    io: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [4, 1], [1, 0])  # 16-byte accesses

    d = gl.arange(0, D, layout=gl.SliceLayout(0, io))
    if Q_AHEAD:  # (landed: _compute_partition waited before the item began)
        tok_s, head_s, ok_s, pos_s = _meta_rows(meta_smem, meta, kv_head, gl.SliceLayout(1, s_layout), GROUP, GROUP_PAD,
                                                ROWS_)
        _, _, _, pos_o = _meta_rows(meta_smem, meta, kv_head, gl.SliceLayout(1, o_layout), GROUP, GROUP_PAD, ROWS_)
    else:  # (the last item's dots that read this buffer are done: every chunk step waits for its own)
        tok, head, row_ok, pos = _rows(tiles_ptr, tile_pos_ptr, cta, wg, kv_head, kv_len, gl.SliceLayout(1, io),
                                       GROUP, GROUP_PAD, TOKENS, CONSUMERS)
        q = gl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        q_buf.store(q)
        fence_async_shared()
        cta_barrier()
        tok_s, head_s, ok_s, pos_s = _rows(tiles_ptr, tile_pos_ptr, cta, wg, kv_head, kv_len,
                                           gl.SliceLayout(1, s_layout), GROUP, GROUP_PAD, TOKENS, CONSUMERS)
        _, _, _, pos_o = _rows(tiles_ptr, tile_pos_ptr, cta, wg, kv_head, kv_len, gl.SliceLayout(1, o_layout),
                               GROUP, GROUP_PAD, TOKENS, CONSUMERS)
    full_end = ((gl.min(pos_s, axis=0) + 1) // BLOCK_N * BLOCK_N).to(gl.int32)  # chunks every row sees in full
    mid = gl.minimum(gl.maximum(full_end, c_lo), c_hi)

    m, l, acc = _fresh_state(ROWS_, gl.SliceLayout(1, s_layout), ROWS_, D, o_layout)
    m_all, l_all, acc_all = _fresh_state(ROWS_, gl.SliceLayout(1, s_layout), ROWS_, D, o_layout)
    m, l, acc, m_all, l_all, acc_all = _sweep(
        base, c_lo, c_hi, mid, kv_len, pos_s, pos_o, q_buf, k_smem, v_smem, k_ready, v_ready,
        k_empty, v_empty, m, l, acc, m_all, l_all, acc_all, scale_log2e, PARTIALS, ROWS_, BLOCK_N, D, SPLIT,
        STAGES, s_layout, o_layout, p_layout, io, wg, turn, turns, PINGPONG)

    if Q_AHEAD:  # (read only now: nothing held in registers through the sweep)
        tok, head, row_ok, pos = _meta_rows(meta_smem, meta, kv_head, gl.SliceLayout(1, io), GROUP, GROUP_PAD, ROWS_)
    if PARTIALS:  # this split's state, for attention._combine_kernel
        part_s = (tok_s * HQ + head_s) * NUM_SPLITS + split
        keep_s = ok_s & (pos_s >= c_lo)
        gl.store(part_m_ptr + part_s, m, mask=keep_s)
        gl.store(part_l_ptr + part_s, l, mask=keep_s)
        acc_io = gl.convert_layout(acc, io)
        part = (tok * HQ + head) * NUM_SPLITS + split
        gl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc_io, mask=(row_ok & (pos >= c_lo))[:, None])
    else:
        out = (acc_all / gl.convert_layout(l_all, gl.SliceLayout(1, o_layout))[:, None]).to(out_ptr.dtype.element_ty)
        if BULK_OUT:
            if _meta_bulk(meta_smem, meta, wg):
                _store_bulk(out, out_buf, out_desc, _meta_first(meta_smem, 3 * meta).to(gl.int32), kv_head * GROUP,
                            TOKENS, GROUP, D)
            else:
                _store_rows(out, out_ptr, tok, head, row_ok, stride_ot, stride_oh, D, io)
        else:
            _store_rows(out, out_ptr, tok, head, row_ok, stride_ot, stride_oh, D, io)


@gluon.jit
def _decode_tile(q_buf, p_buf, base, q_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, cta, kv_head, kv_len,
                 c_lo, c_hi, split, scale_log2e, HQ, NUM_SPLITS, stride_qt, stride_qh, stride_ot, stride_oh,
                 k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                 GROUP: gl.constexpr, HEADS: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                 SPLIT: gl.constexpr, STAGES: gl.constexpr, PARTIALS: gl.constexpr):
    """One decode work item (a token's GQA group, one KV head, one split) with the dots
    transposed: S^T = K Q^T and O^T += V^T P^T, the chunk's positions (and head_dim) as the
    wgmma M and the group's HEADS query heads as its N. _tile's dots put the rows in M,
    which is 64 for one warpgroup: a decode group of 4 heads padded to 64 rows kept the
    tensor cores 16 times busier than needed, and each chunk step waited on them.

    The same bits as _tile: every score and output element is the same products added 16
    positions at a time in the same order (the tensor cores' arithmetic does not depend on
    an element's place in the tile or on which operand is which: matmul.py's bitwise check
    covers both), and the softmax runs on the scores in ``rows``, a layout that gives each
    thread a row's columns in _tile's order and reduces across the same lanes, so the max
    and the row sum come out the same."""
    s_t_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEADS, 16])
    rows: gl.constexpr = gl.BlockedLayout([1, 2], [8, 4], [4, 1], [1, 0])  # [HEADS, BLOCK_N]: _tile's row pattern
    io: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [4, 1], [1, 0])  # 16-byte accesses
    r = gl.arange(0, HEADS, layout=gl.SliceLayout(1, io))
    real = r < GROUP
    head = kv_head * GROUP + gl.where(real, r, 0)
    d = gl.arange(0, D, layout=gl.SliceLayout(0, io))
    q = gl.load(q_ptr + cta * stride_qt + head[:, None] * stride_qh + d[None, :], mask=real[:, None], other=0.0)
    q_buf.store(q)
    fence_async_shared()
    cta_barrier()

    pos = kv_len - 1  # every row's position: the token is its sequence's last
    full_end = (pos + 1) // BLOCK_N * BLOCK_N  # chunks seen in full
    mid = gl.minimum(gl.maximum(full_end, c_lo), c_hi)
    m, l, acc = _fresh_state(HEADS, gl.SliceLayout(1, rows), D, HEADS, s_t_layout)  # (acc transposed)
    m_all, l_all, acc_all = _fresh_state(HEADS, gl.SliceLayout(1, rows), D, HEADS, s_t_layout)
    for n0 in range(c_lo, c_hi, BLOCK_N):
        i = base + (n0 - c_lo) // BLOCK_N
        mbarrier.wait(k_ready.index(i % STAGES), (i // STAGES) & 1)
        s_t = warpgroup_mma(k_smem.index(i % STAGES), q_buf.permute((1, 0)),
                            gl.zeros([BLOCK_N, HEADS], gl.float32, s_t_layout), use_acc=False, is_async=True)
        s_t = warpgroup_mma_wait(0, deps=(s_t, ))
        mbarrier.arrive(k_empty.index(i % STAGES), count=1)
        scores = gl.convert_layout(gl.permute(s_t, [1, 0]), rows)
        if n0 >= mid:  # the causal mask (_causal_mask's compare)
            n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, rows))
            scores = gl.where(n[None, :] <= pos, scores, float("-inf"))
        m, l, p, rescale = _online_softmax(scores, m, l, scale_log2e)
        p_buf.store(p.to(p_buf.dtype))
        fence_async_shared()
        cta_barrier()
        acc = acc * gl.convert_layout(rescale, gl.SliceLayout(0, s_t_layout))[None, :]
        v_buf = v_smem.index(i % STAGES)
        mbarrier.wait(v_ready.index(i % STAGES), (i // STAGES) & 1)
        if n0 + BLOCK_N > kv_len:  # the sweep's last chunk: rows past its end may hold anything
            _zero_past_end(v_buf, n0, kv_len, BLOCK_N, io)
        acc = warpgroup_mma(v_buf.permute((1, 0)), p_buf.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(v_empty.index(i % STAGES), count=1)
        if not PARTIALS:
            if ((n0 + BLOCK_N) % SPLIT == 0) | (n0 + BLOCK_N >= c_hi):  # a split's end: _fold's arithmetic
                m_f, a, b, l_all = _fold_rows(m_all, l_all, m, l, scale_log2e)
                a_o = gl.convert_layout(a, gl.SliceLayout(0, s_t_layout))
                b_o = gl.convert_layout(b, gl.SliceLayout(0, s_t_layout))
                acc_all = gl.fma(acc_all, a_o[None, :], acc * b_o[None, :])
                m_all = m_f  # (every row's position is past every split's start)
                m, l, acc = _fresh_state(HEADS, gl.SliceLayout(1, rows), D, HEADS, s_t_layout)

    if PARTIALS:  # this split's state, for the combine kernel
        r_s = gl.arange(0, HEADS, layout=gl.SliceLayout(1, rows))
        part_s = (cta * HQ + kv_head * GROUP + gl.where(r_s < GROUP, r_s, 0)) * NUM_SPLITS + split
        gl.store(part_m_ptr + part_s, m, mask=r_s < GROUP)
        gl.store(part_l_ptr + part_s, l, mask=r_s < GROUP)
        part = (cta * HQ + head) * NUM_SPLITS + split
        gl.store(part_acc_ptr + part[:, None] * D + d[None, :], gl.convert_layout(gl.permute(acc, [1, 0]), io),
                 mask=real[:, None])
    else:
        out = (acc_all / gl.convert_layout(l_all, gl.SliceLayout(0, s_t_layout))[None, :]).to(out_ptr.dtype.element_ty)
        _store_rows(gl.permute(out, [1, 0]), out_ptr, gl.full([HEADS], cta, gl.int64, gl.SliceLayout(1, io)), head,
                    real, stride_ot, stride_oh, D, io)


@gluon.jit
def _store_rows(out, out_ptr, tok, head, row_ok, stride_ot, stride_oh, D: gl.constexpr, io: gl.constexpr):
    """Each real row of a finished item to its (token, head) of the output, 16 bytes a thread."""
    d = gl.arange(0, D, layout=gl.SliceLayout(0, io))
    gl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :], gl.convert_layout(out, io),
             mask=row_ok[:, None])


@gluon.jit
def _store_bulk(out, out_buf, out_desc, tok0, head0, TOKENS: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr):
    """A finished item whose rows are tokens tok0 .. tok0 + TOKENS, heads head0 .. head0 + GROUP
    (one box of the [T, HQ, D] output): staged in shared memory straight from the accumulator's
    layout and sent by one bulk copy, which the warpgroup does not wait for, instead of a
    layout conversion through shared memory and 64 masked row stores (1-2% of the kernel's
    time at 512-4096 tokens: bench/NOTES.md, round 11)."""
    tma.store_wait(0)  # the last item's bulk copy has read out_buf
    cta_barrier()
    out_buf.store(out)
    fence_async_shared()
    cta_barrier()
    tma_store(out_desc, [tok0, head0, 0], out_buf.reshape([TOKENS, GROUP, D]))


@gluon.jit
def _copy_q(q_buf, q_ptr, meta_smem, meta, w, num_items, HKV, NUM_SPLITS, stride_qt, stride_qh,
            GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, ROWS_: gl.constexpr, D: gl.constexpr,
            SPLIT: gl.constexpr, PARTIALS: gl.constexpr, io: gl.constexpr):
    """Start copying work item w's Q rows (this warpgroup's) into q_buf in the background
    (cp.async), its rows read from buffer ``meta`` of meta_smem (landed); nothing, zeros
    only, for an item past the last or with no chunks. Padding rows get zeros, as the
    register path's masked load gives them."""
    _, kv_head, _, c_lo, c_hi = _item_span(gl.minimum(w, num_items - 1), _meta_len(meta_smem, meta), HKV,
                                           NUM_SPLITS, SPLIT, PARTIALS)
    tok, head, row_ok, _ = _meta_rows(meta_smem, meta, kv_head, gl.SliceLayout(1, io), GROUP, GROUP_PAD, ROWS_)
    d = gl.arange(0, D, layout=gl.SliceLayout(0, io))
    wanted = row_ok & (w < num_items) & (c_lo < c_hi)
    row_start = gl.multiple_of(tok * stride_qt + head * stride_qh, 8)  # launch() checks: 16-byte copies
    cp_async_load(q_buf, q_ptr + row_start[:, None] + d[None, :], mask=wanted[:, None])


@gluon.jit
def _compute_partition(wg, q_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, tiles_ptr, tile_pos_ptr,
                       cta_slot_ptr, cta_len_ptr, num_items, HKV, L,
                       scale_log2e, HQ, NUM_SPLITS, stride_qt, stride_qh, stride_ot, stride_oh,
                       q_smem, meta_smem, out_smem, out_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                       GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, TOKENS: gl.constexpr,
                       CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, SPLIT: gl.constexpr,
                       STAGES: gl.constexpr, PARTIALS: gl.constexpr, DECODE: gl.constexpr,
                       Q_AHEAD: gl.constexpr, BULK_OUT: gl.constexpr, turn, PINGPONG: gl.constexpr):
    """A consumer warpgroup: this program's work items (the producer's, in the same order),
    counting ring positions as the producer does. Q_AHEAD (prefill, where an item is a few
    chunks long): nothing at an item's start waits on global memory. Item j + 2's rows and
    tile length (three buffers) and item j + 1's Q (two buffers, its addresses from the rows
    landed) are copied in the background while item j runs. Waiting for its Q at its start
    cost 3-4% up to 4096 tokens (bench/NOTES.md, round 9), for its rows 4-13% up to 2048
    (round 10)."""
    base = 0
    turns = 0  # (two consumers) blocks of dots issued: _sweep_pingpong's turns
    programs = gl.num_programs(0)
    pid = gl.program_id(0)
    io: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [4, 1], [1, 0])
    ROWS_: gl.constexpr = TOKENS * GROUP_PAD
    if Q_AHEAD:
        _copy_meta(meta_smem, 3 * wg, tiles_ptr, tile_pos_ptr, cta_len_ptr, _item_index(0, pid, programs),
                   num_items, wg, HKV, NUM_SPLITS, ROWS_, GROUP_PAD, TOKENS, CONSUMERS)
        _copy_meta(meta_smem, 3 * wg + 1, tiles_ptr, tile_pos_ptr, cta_len_ptr, _item_index(1, pid, programs),
                   num_items, wg, HKV, NUM_SPLITS, ROWS_, GROUP_PAD, TOKENS, CONSUMERS)
        async_copy.commit_group()
        async_copy.wait_group(0)
        cta_barrier()
        _copy_q(q_smem.index(2 * wg), q_ptr, meta_smem, 3 * wg, _item_index(0, pid, programs), num_items,
                HKV, NUM_SPLITS, stride_qt, stride_qh, GROUP, GROUP_PAD, ROWS_, D, SPLIT, PARTIALS, io)
        async_copy.commit_group()
    for j in range(0, gl.cdiv(num_items, programs)):
        w = _item_index(j, pid, programs)
        if Q_AHEAD:
            # item j's Q and item j + 1's rows have landed (this thread's copies; the barrier:
            # everyone's, and every warp is past item j - 1, whose buffers the new copies take)
            async_copy.wait_group(0)
            fence_async_shared()
            cta_barrier()
            _copy_meta(meta_smem, 3 * wg + (j + 2) % 3, tiles_ptr, tile_pos_ptr, cta_len_ptr,
                       _item_index(j + 2, pid, programs), num_items, wg, HKV, NUM_SPLITS, ROWS_, GROUP_PAD, TOKENS,
                       CONSUMERS)
            _copy_q(q_smem.index(2 * wg + (j + 1) % 2), q_ptr, meta_smem, 3 * wg + (j + 1) % 3,
                    _item_index(j + 1, pid, programs), num_items, HKV, NUM_SPLITS, stride_qt, stride_qh,
                    GROUP, GROUP_PAD, ROWS_, D, SPLIT, PARTIALS, io)
            async_copy.commit_group()
            q_buf = q_smem.index(2 * wg + j % 2)
            meta = 3 * wg + j % 3
        else:
            q_buf = q_smem.index(wg)
            meta = 0  # (unused)
        if w < num_items:
            if Q_AHEAD:
                kv_len = _meta_len(meta_smem, meta)
                cta, kv_head, split, c_lo, c_hi = _item_span(w, kv_len, HKV, NUM_SPLITS, SPLIT, PARTIALS)
            else:
                cta, kv_head, split, kv_len, _, c_lo, c_hi = _item(w, cta_slot_ptr, cta_len_ptr, HKV, NUM_SPLITS, L,
                                                                   SPLIT, PARTIALS)
            if c_lo < c_hi:
                if DECODE:
                    _decode_tile(q_buf, out_smem.index(wg), base, q_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
                                 cta, kv_head, kv_len, c_lo, c_hi, split, scale_log2e, HQ, NUM_SPLITS,
                                 stride_qt, stride_qh, stride_ot, stride_oh, k_smem, v_smem, k_ready, v_ready,
                                 k_empty, v_empty, GROUP, _decode_heads(GROUP_PAD), BLOCK_N, D, SPLIT, STAGES,
                                 PARTIALS)
                else:
                    _tile(wg, base, q_buf, meta_smem, meta, out_smem.index(wg), out_desc, q_ptr, out_ptr, part_m_ptr,
                          part_l_ptr, part_acc_ptr, tiles_ptr, tile_pos_ptr, cta, kv_head, kv_len, c_lo, c_hi, split,
                          scale_log2e, HQ, NUM_SPLITS, stride_qt, stride_qh, stride_ot, stride_oh,
                          k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                          GROUP, GROUP_PAD, TOKENS, CONSUMERS, BLOCK_N, D, SPLIT, STAGES, PARTIALS, Q_AHEAD,
                          BULK_OUT, turn, turns, PINGPONG)
            chunks = (gl.maximum(c_hi - c_lo, 0) + BLOCK_N - 1) // BLOCK_N
            base += chunks
            turns += gl.where(chunks > 0, chunks + 1, 0)
    if BULK_OUT:
        tma.store_wait(0)  # the last bulk copy has read out_buf before the program ends


@gluon.constexpr_function
def _decode_heads(group_pad):
    """_decode_tile's wgmma N: the GQA group padded to a power of two, at least 8."""
    return max(8, group_pad)


@gluon.jit
def _launch_dependents():
    """Let the next kernel in the stream start, if launched as a programmatic dependent (PDL)."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def hopper_attention_kernel(
    q_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, k_desc, v_desc, out_desc,
    tiles_ptr, tile_pos_ptr, cta_slot_ptr, cta_len_ptr,
    scale_log2e, L, HQ, HKV, NUM_SPLITS, num_items,
    stride_qt, stride_qh, stride_ot, stride_oh,
    GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, TOKENS: gl.constexpr, CONSUMERS: gl.constexpr,
    BLOCK_N: gl.constexpr, D: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
    PARTIALS: gl.constexpr, DECODE: gl.constexpr, Q_AHEAD: gl.constexpr, BULK_OUT: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    """Work items (CTA tile, KV head, split: one split of all in the single pass) w =
    _item_index(0, program_id, num_programs), _item_index(1, ...), ...: one item per program,
    or persistent programs that each take several and keep their K/V ring streaming between them.
    Split-KV (PARTIALS): the combine kernel that follows may take its places at once
    (combine_hopper: it waits for this kernel's end before it reads a split state)."""
    if PARTIALS:
        _launch_dependents()
    if DECODE:  # _decode_tile's operands: the group's Q and the chunk's probabilities, [heads, .]
        HEADS: gl.constexpr = _decode_heads(GROUP_PAD)
        q_smem = gl.allocate_shared_memory(k_desc.dtype, [1, HEADS, D],
                                           gl.NVMMASharedLayout.get_default_for([HEADS, D], k_desc.dtype))
    else:
        q_smem = gl.allocate_shared_memory(k_desc.dtype, [CONSUMERS * (2 if Q_AHEAD else 1), TOKENS * GROUP_PAD, D],
                                           gl.NVMMASharedLayout.get_default_for([TOKENS * GROUP_PAD, D],
                                                                                k_desc.dtype))
    # Q_AHEAD: three buffers of row facts per consumer (_copy_meta: tokens, positions, length)
    meta_smem = gl.allocate_shared_memory(gl.int64, [CONSUMERS * 3 * 3 if Q_AHEAD else 3, TOKENS * GROUP_PAD],
                                          gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    if BULK_OUT:  # a consumer's output rows staged for their bulk copy (_store_bulk)
        out_smem = gl.allocate_shared_memory(k_desc.dtype, [CONSUMERS, TOKENS * GROUP_PAD, D],
                                             gl.NVMMASharedLayout.get_default_for([TOKENS * GROUP_PAD, D], k_desc.dtype))
    elif DECODE:  # _decode_tile's probabilities
        out_smem = gl.allocate_shared_memory(k_desc.dtype, [1, HEADS, BLOCK_N],
                                             gl.NVMMASharedLayout.get_default_for([HEADS, BLOCK_N], k_desc.dtype))
    else:
        out_smem = q_smem  # (unused)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, D], v_desc.layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # PINGPONG: the consumers' turns
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=CONSUMERS)
        mbarrier.init(v_empty.index(s), count=CONSUMERS)
    load_args = (k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                 cta_slot_ptr, cta_len_ptr, num_items, HKV, NUM_SPLITS, L,
                 BLOCK_N, D, SPLIT, STAGES, PARTIALS)
    # (the consumers' arguments are written out: constexprs would not survive a tuple built
    # here and concatenated)
    if CONSUMERS == 2:
        gl.warp_specialize([(_compute_partition, (0, q_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, tiles_ptr,
                             tile_pos_ptr, cta_slot_ptr, cta_len_ptr, num_items, HKV, L,
                             scale_log2e, HQ, NUM_SPLITS, stride_qt, stride_qh, stride_ot, stride_oh,
                             q_smem, meta_smem, out_smem, out_desc, k_smem, v_smem, k_ready, v_ready, k_empty,
                             v_empty, GROUP, GROUP_PAD, TOKENS, CONSUMERS, BLOCK_N, D, SPLIT, STAGES, PARTIALS,
                             DECODE, Q_AHEAD, BULK_OUT, turn, PINGPONG)),
                            (_compute_partition, (1, q_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, tiles_ptr,
                             tile_pos_ptr, cta_slot_ptr, cta_len_ptr, num_items, HKV, L,
                             scale_log2e, HQ, NUM_SPLITS, stride_qt, stride_qh, stride_ot, stride_oh,
                             q_smem, meta_smem, out_smem, out_desc, k_smem, v_smem, k_ready, v_ready, k_empty,
                             v_empty, GROUP, GROUP_PAD, TOKENS, CONSUMERS, BLOCK_N, D, SPLIT, STAGES, PARTIALS,
                             DECODE, Q_AHEAD, BULK_OUT, turn, PINGPONG)),
                            (_load_partition, load_args)],
                           [CONSUMER_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([(_compute_partition, (0, q_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, tiles_ptr,
                             tile_pos_ptr, cta_slot_ptr, cta_len_ptr, num_items, HKV, L,
                             scale_log2e, HQ, NUM_SPLITS, stride_qt, stride_qh, stride_ot, stride_oh,
                             q_smem, meta_smem, out_smem, out_desc, k_smem, v_smem, k_ready, v_ready, k_empty,
                             v_empty, GROUP, GROUP_PAD, TOKENS, CONSUMERS, BLOCK_N, D, SPLIT, STAGES, PARTIALS,
                             DECODE, Q_AHEAD, BULK_OUT, turn, PINGPONG)),
                            (_load_partition, load_args)],
                           [1], [PRODUCER_REGS])


@dataclass
class Plan:
    """The CTA tiles of one forward pass: each ``consumers`` x TOKENS tokens of one sequence,
    stored in sweep order (longest first: work-item order only, never the bits)."""
    tiles: torch.Tensor     # [num_ctas, consumers * TOKENS] token indices; padding -1 - the tile's first token
    tile_pos: torch.Tensor  # tiles' shape: each token's position (padding: the tile's first token's)
    cta_slot: torch.Tensor  # [num_ctas] the cache slot of each tile's sequence
    cta_len: torch.Tensor   # [num_ctas] positions a tile sweeps: its last position + 1 (the low 32
    #                         bits; host_plan sets bit 32 + wg where warpgroup wg's rows are one box)
    consumers: int
    num_splits: int         # splits of the longest sweep
    decode: bool = False    # decode_plan's: tile t is token t alone (tile_pos is never read)


def tokens_per_warpgroup(group_pad: int) -> int:
    return max(1, ROWS // group_pad)


def host_plan(host_slots: list[int], host_positions: list[int], group_pad: int, split: int, device) -> Plan:
    """Tiles of a mixed pass, planned on the host (``tile_plan.build_tiles``). Two consumer
    warpgroups per tile where sequences are long enough to fill them (prefill); one where
    most sequences have a token or two (decode). Speed only: which tile or warpgroup a token
    lands in never changes its bits."""
    tokens = tokens_per_warpgroup(group_pad)
    lengths = Counter(host_slots).values()
    one = sum(-(-n // tokens) for n in lengths)
    two = sum(-(-n // (2 * tokens)) for n in lengths)
    consumers = 2 if 4 * two <= 3 * one else 1
    rows = build_tiles(host_slots, consumers * tokens).tolist()
    lens = [max(host_positions[t] for t in row if t >= 0) + 1 for row in rows]
    longest_first = sorted(range(len(rows)), key=lambda i: -lens[i])
    rows, cta_len = [rows[i] for i in longest_first], [lens[i] for i in longest_first]
    tile_pos = [[host_positions[t if t >= 0 else row[0]] for t in row] for row in rows]
    cta_len = [n | _bulk_bits(row, tokens, consumers) for n, row in zip(cta_len, rows)]
    rows = [[t if t >= 0 else -1 - row[0] for t in row] for row in rows]  # the kernel needs no third load
    cta_slot = [host_slots[row[0]] for row in rows]
    packed = torch.tensor([rows, tile_pos], dtype=torch.int64).to(device, non_blocking=True)
    per_cta = torch.tensor([cta_slot, cta_len], dtype=torch.int64).to(device, non_blocking=True)
    return Plan(packed[0], packed[1], per_cta[0], per_cta[1], consumers, (max(lens) - 1) // split + 1)


def _bulk_bits(row: list[int], tokens: int, consumers: int) -> int:
    """Bit 32 + wg for each warpgroup wg of a tile whose tokens are real and consecutive
    (t0, t0 + 1, ...): its output rows are one box of the [T, HQ, D] output (_store_bulk)."""
    bits = 0
    for wg in range(consumers):
        own = row[wg * tokens:(wg + 1) * tokens]
        if own[0] >= 0 and own == list(range(own[0], own[0] + tokens)):
            bits |= 1 << (32 + wg)
    return bits


def decode_plan(slots: torch.Tensor, positions: torch.Tensor, group_pad: int, split: int, L: int) -> Plan:
    """A decode pass (each token its sequence's only one), planned on the device with no
    host copy, so a CUDA graph can capture it. The split count covers the whole cache:
    splits past a row's position exit at once."""
    T = slots.shape[0]
    tiles = torch.full((T, tokens_per_warpgroup(group_pad)), -1, dtype=torch.int64, device=slots.device)
    tiles[:, 0] = torch.arange(T, device=slots.device)
    return Plan(tiles, tiles, slots, positions + 1, 1, (L - 1) // split + 1, True)


@functools.lru_cache(maxsize=None)
def _is_hopper(device: torch.device) -> bool:
    """sm_90 (cached: every layer of every pass asks)."""
    return torch.cuda.get_device_capability(device) == (9, 0)


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether these tensors can take the Gluon kernels: a Hopper GPU (sm_90), 16-bit
    values, head_dim 64 or 128, caches whose rows bulk copies can address."""
    if INTERPRET or not q.is_cuda or not _is_hopper(q.device):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return False
    D = q.shape[-1]
    group_pad = triton.next_power_of_2(q.shape[1] // k_cache.shape[2])
    if D not in (64, 128) or group_pad > ROWS or q.stride(-1) != 1:
        return False
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (k_cache, v_cache))


_gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@functools.lru_cache(maxsize=None)
def _box_layout(box: tuple[int, ...], dtype: torch.dtype):
    """The shared-memory layout of one bulk-copy box: a K/V chunk or an output box (cached:
    every launch asks)."""
    return gl.NVMMASharedLayout.get_default_for(list(box), _gl_dtype[dtype])


def _descriptor(cache: torch.Tensor, block_n: int):
    """A bulk-copy descriptor of the cache seen as [slots x positions, KV heads x head_dim]:
    one chunk of one KV head is the box [block_n, head_dim] at (slot * L + n0, kv_head * D)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    S, L, Hkv, D = cache.shape
    return TensorDescriptor(cache, [S * L, Hkv * D], [Hkv * D, 1], [block_n, D],
                            _box_layout((block_n, D), cache.dtype))


def _bulk_ok(out: torch.Tensor) -> bool:
    """Whether bulk copies can address the output [T, HQ, D]: contiguous, 16-byte aligned."""
    return out.is_contiguous() and out.data_ptr() % 16 == 0


def _out_descriptor(out: torch.Tensor, tokens: int, group: int):
    """A bulk-copy descriptor of the output [T, HQ, D] in boxes [tokens, group, D]: one
    warpgroup's rows where its tokens are consecutive (_store_bulk)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    T, Hq, D = out.shape
    box = [tokens, group, D]
    return TensorDescriptor(out, [T, Hq, D], [Hq * D, D, 1], box, _box_layout(tuple(box), out.dtype))


SM_SHARED_BYTES = 227 * 1024  # shared memory one SM gives its programs (sm_90)
SM_REGISTERS = 64 * 1024
SCRATCH_PER_CONSUMER = 9 * 1024  # layout conversions and barriers (8.3-8.5 KB in the compiled kernels)
META_BYTES = 3 * 3 * ROWS * 8  # a consumer's _copy_meta buffers (with Q copied ahead)


@functools.lru_cache(maxsize=None)
def programs_per_sm(consumers: int, stages: int, block_n: int, head_dim: int, elem: int, maxnreg: int,
                    q_buffers: int = 1, bulk_out: bool = False) -> int:
    """Programs that fit on one SM at once: the persistent grid's size per SM. By the
    shared memory (Q buffers per consumer, the output's staging buffer, the K/V ring) and the
    registers (maxnreg per thread)."""
    meta = META_BYTES if q_buffers > 1 else 0
    tiles = q_buffers + (1 if bulk_out else 0)
    shared = (consumers * (tiles * ROWS * head_dim * elem + meta + SCRATCH_PER_CONSUMER) +
              stages * 2 * block_n * head_dim * elem)
    threads = (consumers * CONSUMER_WARPS.value + 1) * 32
    return max(1, min(SM_SHARED_BYTES // (shared + 1024), SM_REGISTERS // (threads * maxnreg)))


def launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: Plan,
           out: torch.Tensor, parts, scale_log2e: float, block_n: int, split: int, stages: int | None = None,
           persistent: bool = True):
    """Run the kernel: the single pass into ``out``, or (``parts`` = (m, l, acc)) every split's
    state into ``parts`` for the combine kernel. ``persistent``: as many programs as fit on
    the GPU at once, each taking work items in turn, or one program per item: the same bits."""
    T, Hq, D = q.shape
    S, L, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    group_pad = triton.next_power_of_2(group)
    splits = plan.num_splits if parts is not None else 1
    items = plan.tiles.shape[0] * Hkv * splits
    part_m, part_l, part_acc = parts if parts is not None else (out, out, out)
    two = plan.consumers == 2
    stages = stages or (3 if two else 2)
    maxnreg = 168 if two else 128
    # the next item's Q copied ahead: prefill, where it fits beside the ring without costing a program per SM
    q_ahead = two and not plan.decode and q.data_ptr() % 16 == 0 and q.stride(0) % 8 == 0 and q.stride(1) % 8 == 0
    # finished items leave by bulk copies (whole boxes of the output; the plan marks which)
    bulk_out = q_ahead and parts is None and group == group_pad and _bulk_ok(out)
    # the two consumers take turns at the tensor cores (ping-pong: 4-9% off from 2048 tokens, even at
    # 1024, 2% on at 512 by kernel time; graph-timed at 512 0.80 with it, 0.78 without, in another
    # run; H100, bench/NOTES.md round 11)
    pingpong = two and PINGPONG
    per_sm = programs_per_sm(plan.consumers, stages, block_n, D, q.element_size(), maxnreg, 2 if q_ahead else 1,
                             bulk_out)
    programs = min(items, sm_count(q.device) * per_sm) if persistent else items
    hopper_attention_kernel[(programs,)](
        q, out, part_m, part_l, part_acc, _descriptor(k_cache, block_n), _descriptor(v_cache, block_n),
        _out_descriptor(out, tokens_per_warpgroup(group_pad), group) if bulk_out else None,
        plan.tiles, plan.tile_pos, plan.cta_slot, plan.cta_len,
        scale_log2e, L, Hq, Hkv, splits, items, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, TOKENS=tokens_per_warpgroup(group_pad), CONSUMERS=plan.consumers,
        BLOCK_N=block_n, D=D, SPLIT=split, STAGES=stages, PARTIALS=parts is not None, DECODE=plan.decode,
        Q_AHEAD=q_ahead, BULK_OUT=bulk_out, PINGPONG=pingpong,
        num_warps=CONSUMER_WARPS.value, maxnreg=maxnreg,
    )
