"""A persistent, warp-specialised matmul for Hopper (sm_90), written in Gluon: the products
of ``matmul._linear_tma_kernel``, added in the same order, for the large-M rows of the table.

Why a second kernel: at a few thousand rows the Triton kernel reaches 0.85-0.88 of cuBLAS;
one warpgroup there issues the copies, waits for them and runs the dots in turn, and
Triton 3.6 does not warp-specialise a loop on sm_90. Here
  * one producer warp streams the X and W chunks [rows, BLOCK_K] of each output tile
    through a ring of shared-memory stages (TMA), signalled through mbarriers, while
  * two consumer warpgroups each own 64 rows of a 128 x BLOCK_N tile and run its K loop as
    asynchronous wgmma, one dot in flight while the next chunk is awaited, and store their
    rows through shared memory by a bulk copy;
  * programs are persistent (one per SM), taking tiles in grouped order; the producer
    streams the next tile's chunks while the consumers store the last one.

Why the same bits as the Triton kernel: a 16-bit wgmma adds its products into the fp32
accumulator 16 of K at a time, in K order, whatever the tile (the note above matmul.py's
table); the accumulator starts at zero, the bias is added once after the K loop, and the
result is rounded to the output dtype once, as there; where K is summed in chunks, each
chunk's sum joins the total at the chunk's end, as there (not the partials launch, one
program per chunk: that stays in the Triton kernels).
"""

from __future__ import annotations

import functools

import torch

from local_backend.kernels._triton import INTERPRET, triton  # noqa: F401  (first: it sets the interpreter switch)
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from local_backend.kernels.gluon_api import allocate_mbarrier, cta_barrier, tma_load, tma_multicast_load, tma_store
from local_backend.kernels.tile_plan import sm_count

HALF_M = gl.constexpr(64)  # rows per consumer warpgroup: the wgmma M of one warpgroup
CONSUMER_WARPS = gl.constexpr(4)
PRODUCER_REGS = gl.constexpr(24)
CONSUMER_REGS = gl.constexpr(232)


@gluon.jit
def _tile_coords(t, num_m, num_n, GROUP_M: gl.constexpr):
    """Tile t's (row block, column block) in grouped order (``matmul._grouped_tile``'s):
    GROUP_M row blocks share each column of weight tiles while it sits in L2."""
    per_group = GROUP_M * num_n
    first_m = (t // per_group) * GROUP_M
    group_rows = gl.minimum(num_m - first_m, GROUP_M)
    return first_m + (t % per_group) % group_rows, (t % per_group) // group_rows


@gluon.jit
def _load_partition(x_desc, w_desc, x_smem, w_smem, ready, empty, pair_empty, M, N, K,
                    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                    STAGE_BYTES: gl.constexpr, CLUSTER: gl.constexpr):
    """The producer warp: each tile's X halves and W chunk, K step by K step, into the ring
    stage the consumers released last (both must release it). In a 2-CTA cluster each CTA
    copies its own rows of X, and the first copies the W chunk into both CTAs (multicast):
    it waits until the consumers of both have released the stage."""
    rows = 2 * HALF_M * CLUSTER
    num_m = gl.cdiv(M, rows)
    num_n = gl.cdiv(N, BLOCK_N)
    i = 0
    for t in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coords(t, num_m, num_n, GROUP_M)
        for k0 in range(0, K, BLOCK_K):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            if CLUSTER > 1:
                mbarrier.wait(pair_empty.index(s), ((i // STAGES) & 1) ^ 1)  # the first CTA's only
            mbarrier.expect(ready.index(s), STAGE_BYTES)
            tma_load(x_desc, [pid_m * rows, k0], ready.index(s), x_smem.index(2 * s))
            tma_load(x_desc, [pid_m * rows + HALF_M * CLUSTER, k0], ready.index(s), x_smem.index(2 * s + 1))
            if CLUSTER > 1:
                tma_multicast_load(w_desc, [pid_n * BLOCK_N, k0], ready.index(s), w_smem.index(s))
            else:
                tma_load(w_desc, [pid_n * BLOCK_N, k0], ready.index(s), w_smem.index(s))
            i += 1


@gluon.constexpr_function
def _acc_layout(block_n, cluster):
    """wgmma's accumulator: 64 rows per warpgroup; in a cluster, each CTA's its own 64 of 128."""
    if cluster == 1:
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block_n, 16])
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block_n, 16],
                                     cga_layout=[[1, 0]])


@gluon.jit
def _mma_partition(wg, x_smem, w_smem, ready, empty, pair_empty, out_smem, out_desc, bias_ptr, M, N, K, CHUNK_K,
                   HAS_BIAS: gl.constexpr, CHUNKED: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                   GROUP_M: gl.constexpr, STAGES: gl.constexpr, CLUSTER: gl.constexpr):
    """A consumer warpgroup: rows wg * 64 .. + 64 of every tile this program takes (in a
    cluster, those rows of each CTA's half of the tile). Each K step's dot is issued, then the
    previous one awaited and its stage released, so the tensor cores always have the next dot
    queued. CHUNKED: K is summed in chunks of CHUNK_K, each chunk's sum added to the total at
    its end (``_linear_tma_kernel``'s fold, in its order)."""
    acc_layout: gl.constexpr = _acc_layout(BLOCK_N, CLUSTER)
    rows = 2 * HALF_M * CLUSTER
    num_m = gl.cdiv(M, rows)
    num_n = gl.cdiv(N, BLOCK_N)
    out_buf = out_smem.index(wg)
    i = 0
    for t in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coords(t, num_m, num_n, GROUP_M)
        acc = gl.zeros([HALF_M * CLUSTER, BLOCK_N], gl.float32, acc_layout)
        total = gl.zeros([HALF_M * CLUSTER, BLOCK_N], gl.float32, acc_layout)
        for k0 in range(0, K, BLOCK_K):
            if CHUNKED:
                if (k0 % CHUNK_K == 0) & (k0 > 0):
                    acc = warpgroup_mma_wait(0, deps=(acc, ))
                    total = total + acc
                    acc = gl.zeros([HALF_M * CLUSTER, BLOCK_N], gl.float32, acc_layout)
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            acc = warpgroup_mma(x_smem.index(2 * s + wg), w_smem.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            if k0 > 0:
                mbarrier.arrive(empty.index((i - 1) % STAGES), count=1)
                if CLUSTER > 1:
                    mbarrier.arrive(pair_empty.index((i - 1) % STAGES), count=1)
            i += 1
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index((i - 1) % STAGES), count=1)
        if CLUSTER > 1:
            mbarrier.arrive(pair_empty.index((i - 1) % STAGES), count=1)
        if CHUNKED:
            acc = total + acc
        if HAS_BIAS:
            cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
            acc = acc + gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)[None, :]
        tma.store_wait(0)  # the last tile's bulk store has read out_buf
        cta_barrier()
        out_buf.store(acc.to(out_desc.dtype))
        fence_async_shared()
        cta_barrier()
        tma_store(out_desc, [pid_m * rows + wg * HALF_M * CLUSTER, pid_n * BLOCK_N], out_buf)
    tma.store_wait(0)


@gluon.jit
def hopper_linear_kernel(x_desc, w_desc, out_desc, bias_ptr, M, N, K, CHUNK_K,
                         HAS_BIAS: gl.constexpr, CHUNKED: gl.constexpr, BLOCK_N: gl.constexpr,
                         BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                         STAGE_BYTES: gl.constexpr, CLUSTER: gl.constexpr = 1):
    """out[M, N] = x[M, K] @ w[N, K]^T (+ bias), 128 x BLOCK_N tiles per CTA, persistent
    programs; CLUSTER 2: a program is two CTAs on a 256 x BLOCK_N tile, sharing each W chunk."""
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [2 * STAGES] + x_desc.block_shape, x_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_shape, w_desc.layout)
    out_smem = gl.allocate_shared_memory(out_desc.dtype, [2] + out_desc.block_shape, out_desc.layout)
    if CLUSTER > 1:
        ready = allocate_mbarrier(batch=STAGES)
        empty = allocate_mbarrier(batch=STAGES)
        pair_empty = allocate_mbarrier(batch=STAGES, two_ctas=True)  # lives in the first CTA
    else:
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        pair_empty = empty
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
        if CLUSTER > 1:
            mbarrier.init(pair_empty.index(s), count=2)  # x 2 CTAs: all four consumers
    gl.warp_specialize([(_mma_partition, (0, x_smem, w_smem, ready, empty, pair_empty, out_smem, out_desc, bias_ptr,
                                          M, N, K, CHUNK_K, HAS_BIAS, CHUNKED, BLOCK_N, BLOCK_K, GROUP_M, STAGES,
                                          CLUSTER)),
                        (_mma_partition, (1, x_smem, w_smem, ready, empty, pair_empty, out_smem, out_desc, bias_ptr,
                                          M, N, K, CHUNK_K, HAS_BIAS, CHUNKED, BLOCK_N, BLOCK_K, GROUP_M, STAGES,
                                          CLUSTER)),
                        (_load_partition, (x_desc, w_desc, x_smem, w_smem, ready, empty, pair_empty, M, N, K,
                                           BLOCK_N, BLOCK_K, GROUP_M, STAGES, STAGE_BYTES, CLUSTER))],
                       [CONSUMER_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])


SM_SHARED_BYTES = 227 * 1024  # shared memory one SM gives a program (sm_90)


def shared_bytes(block_n: int, block_k: int, stages: int, elem: int = 2) -> int:
    """Shared memory one program takes: the ring (a 128-row X chunk and a W chunk per stage),
    the output tile staged for its bulk store, the barriers."""
    return stages * (2 * HALF_M.value + block_n) * block_k * elem + 2 * HALF_M.value * block_n * elem + 1024


_gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


# How the CTAs of a 2-CTA cluster hold a block: each its own half of the rows, or each all of it
SPLIT_ROWS = ((1, 0),)
BROADCAST = ((0, 0),)


@functools.lru_cache(maxsize=None)
def _layout(rows: int, cols: int, dtype: torch.dtype, cga: tuple = ()):
    """The shared-memory layout of one [rows, cols] block (cached: every launch asks)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], _gl_dtype[dtype], cga_layout=[list(b) for b in cga] or None)


def descriptor(t: torch.Tensor, block: tuple[int, int], cga: tuple = ()):
    """A bulk-copy descriptor of a 2-D tensor in [block] boxes, in this kernel's layout (``cga``:
    how a cluster's CTAs share each box)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block), _layout(*block, t.dtype, cga))


def shared_descriptor(t: torch.Tensor, block: tuple[int, int]):
    """The weight's descriptor for the 2-CTA launch: both CTAs receive every box."""
    return descriptor(t, block, BROADCAST)


@functools.lru_cache(maxsize=None)
def supported(device: torch.device) -> bool:
    """sm_90 (cached: every launch asks); never under the CPU interpreter."""
    return not INTERPRET and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def linear(x2: torch.Tensor, w_desc, bias: torch.Tensor | None, out: torch.Tensor,
           block_n: int, block_k: int, stages: int, group_m: int, chunk_k: int, cluster: int = 1) -> torch.Tensor:
    """out = x2 @ weight^T (+ bias), x2 [M, K], the weight [N, K] as ``w_desc`` (``descriptor``
    in [block_n, block_k] boxes: made once per weight by the caller), out [M, N]; all 16-bit
    with unit inner strides and 16-byte aligned rows (matmul._tma_ok); K summed in chunks of
    chunk_k (a multiple of block_k), or in one. ``cluster`` 2: programs of two CTAs that
    share each W chunk (``w_desc`` from ``shared_descriptor``; Triton 3.7 on): half the weight
    traffic, the same bits."""
    M, K = x2.shape
    N = out.shape[1]
    rows = HALF_M.value * cluster  # one warpgroup's rows of a program's tile
    split = SPLIT_ROWS if cluster > 1 else ()
    tiles = triton.cdiv(M, 2 * rows) * triton.cdiv(N, block_n)
    cluster_args = dict(CLUSTER=cluster, num_ctas=cluster) if cluster > 1 else {}
    hopper_linear_kernel[(min(tiles, sm_count(x2.device) // cluster),)](
        descriptor(x2, (rows, block_k), split), w_desc, descriptor(out, (rows, block_n), split),
        bias if bias is not None else out, M, N, K, chunk_k,
        HAS_BIAS=bias is not None, CHUNKED=chunk_k < K, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        STAGES=stages, STAGE_BYTES=(2 * HALF_M.value + block_n) * block_k * x2.element_size(),
        num_warps=CONSUMER_WARPS.value, maxnreg=168, **cluster_args,
    )
    return out

