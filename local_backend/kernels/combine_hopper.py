"""The split-KV combine on Hopper, in Gluon: every token's split states folded in split
order 0, 1, 2, ... into its attention output, with ``attention._fold``'s arithmetic, so the
same bits as ``attention._combine_kernel``.

Why a second combine: the fold is a chain (each split's fold needs the last one's running
max), and the Triton kernel's compiled code issues each split's loads just before its fold,
so a long sweep pays one memory round trip per split (1 x 32000 tokens, 63 splits: 26 us
of combine against 47 us of attention on an H100; bench/NOTES.md, round 8). Here the
states of ``BLOCK_S`` splits arrive in one load, are parked in shared memory, and the next
block's load is in flight while this block is folded: one round trip per block, overlapped.

Why it starts early: a decode pass of one short sequence is a chain of two short kernels,
and the combine's launch and its positions' load would wait for the attention kernel's end.
It is launched as a programmatic dependent (PDL): its programs take their places while the
attention kernel runs (which signals them at its start: attention_hopper), read what that
kernel does not write, and wait at ``griddepcontrol.wait`` for the split states. Speed only.
"""

from __future__ import annotations

import os

import torch

from local_backend.kernels._triton import triton  # noqa: F401  (first: it sets the interpreter switch)
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from local_backend.kernels.gluon_api import cta_barrier

WARPS = 4
# Launch as a programmatic dependent of the attention kernel (module docstring). Speed only;
# the switch is for benches (side by side) and for a driver or graph capture that refuses it.
PDL = os.environ.get("DETAUDIT_PDL", "1") != "0"


@gluon.jit
def _wait_for_prior_kernel():
    """Block until the kernel before this one in the stream has finished and its writes are
    visible (a no-op unless launched as a programmatic dependent)."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _load_block(part_m_ptr, part_l_ptr, part_acc_ptr, first_part, s0, n, D, d0, NUM_SPLITS,
                GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, BLOCK_DC: gl.constexpr, BLOCK_S: gl.constexpr,
                layout: gl.constexpr):
    """The states of splits s0 .. s0 + BLOCK_S (those < n) of the group's heads, row
    j * GROUP_PAD + g for split s0 + j, head g: m and l [rows, 1], acc [rows, BLOCK_DC],
    in one load each. ``first_part``: the state index of the group's first head, split 0."""
    r = gl.arange(0, BLOCK_S * GROUP_PAD, layout=gl.SliceLayout(1, layout))
    g = r % GROUP_PAD
    s = s0 + r // GROUP_PAD
    part = (first_part + gl.where(g < GROUP, g, 0) * NUM_SPLITS + s)[:, None]  # [rows, 1]
    ok = (s < n)[:, None]
    m = gl.load(part_m_ptr + part, mask=ok, other=float("-inf"))
    l = gl.load(part_l_ptr + part, mask=ok, other=0.0)
    d = d0 + gl.arange(0, BLOCK_DC, layout=gl.SliceLayout(0, layout))
    acc = gl.load(part_acc_ptr + part * D + d[None, :], mask=ok, other=0.0)
    return m, l, acc


@gluon.jit
def combine_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, positions_ptr,
                   scale_log2e, D, HQ, NUM_SPLITS, stride_ot, stride_oh,
                   GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, BLOCK_DC: gl.constexpr,
                   SPLIT: gl.constexpr, BLOCK_S: gl.constexpr):
    """One token's GQA group, one slice of head_dim (program ids: token, KV head, slice)."""
    rows: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [4, 1], [1, 0])  # [head (or split x head), d]
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    tok = gl.program_id(0)
    kv_head = gl.program_id(1)
    d0 = gl.program_id(2) * BLOCK_DC
    first_part = (tok * HQ + kv_head * GROUP) * NUM_SPLITS
    n = (gl.load(positions_ptr + tok) // SPLIT + 1).to(gl.int32)  # splits this token's sweep has
    # (positions were written before the attention kernel began: read while it runs)

    m_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_S * GROUP_PAD, 1], flat)
    l_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_S * GROUP_PAD, 1], flat)
    acc_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_S * GROUP_PAD, BLOCK_DC], flat)
    m = gl.full([GROUP_PAD, 1], float("-inf"), gl.float32, rows)  # one column: broadcast over d
    l = gl.zeros([GROUP_PAD, 1], gl.float32, rows)
    acc = gl.zeros([GROUP_PAD, BLOCK_DC], gl.float32, rows)
    _wait_for_prior_kernel()  # the split states
    m_n, l_n, acc_n = _load_block(part_m_ptr, part_l_ptr, part_acc_ptr, first_part, 0, n, D, d0, NUM_SPLITS,
                                  GROUP, GROUP_PAD, BLOCK_DC, BLOCK_S, rows)
    for s0 in range(0, n, BLOCK_S):
        m_smem.store(m_n)
        l_smem.store(l_n)
        acc_smem.store(acc_n)
        cta_barrier()
        # the next block's states are on their way while this block is folded
        m_n, l_n, acc_n = _load_block(part_m_ptr, part_l_ptr, part_acc_ptr, first_part, s0 + BLOCK_S, n, D, d0,
                                      NUM_SPLITS, GROUP, GROUP_PAD, BLOCK_DC, BLOCK_S, rows)
        for j in gl.static_range(BLOCK_S):
            if s0 + j < n:  # attention._fold, operation for operation
                m_s = m_smem.slice(j * GROUP_PAD, GROUP_PAD).load(rows)
                l_s = l_smem.slice(j * GROUP_PAD, GROUP_PAD).load(rows)
                acc_s = acc_smem.slice(j * GROUP_PAD, GROUP_PAD).load(rows)
                new_max = gl.maximum(m, m_s)
                a = gl.exp2((m - new_max) * scale_log2e)
                b = gl.exp2((m_s - new_max) * scale_log2e)
                l = gl.fma(l, a, l_s * b)
                a_d, acc = gl.broadcast(a, acc)
                b_d, acc_s = gl.broadcast(b, acc_s)
                acc = gl.fma(acc, a_d, acc_s * b_d)
                m = new_max
        cta_barrier()  # every warp is done with the block before the next one lands
    l_d, acc = gl.broadcast(l, acc)
    out = (acc / l_d).to(out_ptr.dtype.element_ty)
    g = gl.arange(0, GROUP_PAD, layout=gl.SliceLayout(1, rows))
    head = kv_head * GROUP + gl.where(g < GROUP, g, 0)
    d = d0 + gl.arange(0, BLOCK_DC, layout=gl.SliceLayout(0, rows))
    gl.store(out_ptr + tok * stride_ot + head[:, None] * stride_oh + d[None, :], out,
             mask=(g < GROUP)[:, None] & (d < D)[None, :])


def splits_per_block(group_pad: int, block_dc: int) -> int:
    """Split states per load: 16 for a narrow slice, fewer as a slice widens, so a block
    (and the one in flight) stays near 8 KB of registers and shared memory. Speed only."""
    return max(2, min(16, 2048 // (group_pad * block_dc)))


def combine(part_m: torch.Tensor, part_l: torch.Tensor, part_acc: torch.Tensor, out: torch.Tensor,
            positions: torch.Tensor, scale_log2e: float, splits: int, Hkv: int, slices: int, split: int) -> None:
    """Fold part_m/l/acc [T, Hq, splits(, D)] into out [T, Hq, D] (contiguous rows of D),
    over ``slices`` slices of head_dim per (token, KV head)."""
    T, Hq, D = out.shape
    group = Hq // Hkv
    group_pad = triton.next_power_of_2(group)
    block_dc = triton.next_power_of_2(D) // slices
    combine_kernel[(T, Hkv, slices)](
        part_m, part_l, part_acc, out, positions, scale_log2e, D, Hq, splits, out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_DC=block_dc, SPLIT=split,
        BLOCK_S=splits_per_block(group_pad, block_dc), num_warps=WARPS, launch_pdl=PDL,
    )
