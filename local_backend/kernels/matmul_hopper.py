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

from local_backend.kernels.gluon_api import cta_barrier, tma_load, tma_store
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
def _load_partition(x_desc, w_desc, x_smem, w_smem, ready, empty, M, N, K,
                    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr):
    """The producer warp: each tile's X halves and W chunk, K step by K step, into the ring
    stage the consumers released last (both must release it)."""
    num_m = gl.cdiv(M, 2 * HALF_M)
    num_n = gl.cdiv(N, BLOCK_N)
    i = 0
    for t in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coords(t, num_m, num_n, GROUP_M)
        for k0 in range(0, K, BLOCK_K):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), 2 * x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma_load(x_desc, [pid_m * 2 * HALF_M, k0], ready.index(s), x_smem.index(2 * s))
            tma_load(x_desc, [pid_m * 2 * HALF_M + HALF_M, k0], ready.index(s), x_smem.index(2 * s + 1))
            tma_load(w_desc, [pid_n * BLOCK_N, k0], ready.index(s), w_smem.index(s))
            i += 1


@gluon.jit
def _mma_partition(wg, x_smem, w_smem, ready, empty, out_smem, out_desc, bias_ptr, M, N, K, CHUNK_K,
                   HAS_BIAS: gl.constexpr, CHUNKED: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                   GROUP_M: gl.constexpr, STAGES: gl.constexpr):
    """A consumer warpgroup: rows wg * 64 .. + 64 of every tile this program takes. Each K
    step's dot is issued, then the previous one awaited and its stage released, so the
    tensor cores always have the next dot queued. CHUNKED: K is summed in chunks of CHUNK_K,
    each chunk's sum added to the total at its end (``_linear_tma_kernel``'s fold, in its order)."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    num_m = gl.cdiv(M, 2 * HALF_M)
    num_n = gl.cdiv(N, BLOCK_N)
    out_buf = out_smem.index(wg)
    i = 0
    for t in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coords(t, num_m, num_n, GROUP_M)
        acc = gl.zeros([HALF_M, BLOCK_N], gl.float32, acc_layout)
        total = gl.zeros([HALF_M, BLOCK_N], gl.float32, acc_layout)
        for k0 in range(0, K, BLOCK_K):
            if CHUNKED:
                if (k0 % CHUNK_K == 0) & (k0 > 0):
                    acc = warpgroup_mma_wait(0, deps=(acc, ))
                    total = total + acc
                    acc = gl.zeros([HALF_M, BLOCK_N], gl.float32, acc_layout)
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            acc = warpgroup_mma(x_smem.index(2 * s + wg), w_smem.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            if k0 > 0:
                mbarrier.arrive(empty.index((i - 1) % STAGES), count=1)
            i += 1
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index((i - 1) % STAGES), count=1)
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
        tma_store(out_desc, [pid_m * 2 * HALF_M + wg * HALF_M, pid_n * BLOCK_N], out_buf)
    tma.store_wait(0)


@gluon.jit
def hopper_linear_kernel(x_desc, w_desc, out_desc, bias_ptr, M, N, K, CHUNK_K,
                         HAS_BIAS: gl.constexpr, CHUNKED: gl.constexpr, BLOCK_N: gl.constexpr,
                         BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr):
    """out[M, N] = x[M, K] @ w[N, K]^T (+ bias), 128 x BLOCK_N tiles, persistent programs."""
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [2 * STAGES, HALF_M, BLOCK_K], x_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    out_smem = gl.allocate_shared_memory(out_desc.dtype, [2, HALF_M, BLOCK_N], out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    gl.warp_specialize([(_mma_partition, (0, x_smem, w_smem, ready, empty, out_smem, out_desc, bias_ptr, M, N, K,
                                          CHUNK_K, HAS_BIAS, CHUNKED, BLOCK_N, BLOCK_K, GROUP_M, STAGES)),
                        (_mma_partition, (1, x_smem, w_smem, ready, empty, out_smem, out_desc, bias_ptr, M, N, K,
                                          CHUNK_K, HAS_BIAS, CHUNKED, BLOCK_N, BLOCK_K, GROUP_M, STAGES)),
                        (_load_partition, (x_desc, w_desc, x_smem, w_smem, ready, empty, M, N, K,
                                           BLOCK_N, BLOCK_K, GROUP_M, STAGES))],
                       [CONSUMER_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])


SM_SHARED_BYTES = 227 * 1024  # shared memory one SM gives a program (sm_90)


def shared_bytes(block_n: int, block_k: int, stages: int, elem: int = 2) -> int:
    """Shared memory one program takes: the ring (a 128-row X chunk and a W chunk per stage),
    the output tile staged for its bulk store, the barriers."""
    return stages * (2 * HALF_M.value + block_n) * block_k * elem + 2 * HALF_M.value * block_n * elem + 1024


_gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@functools.lru_cache(maxsize=None)
def _layout(rows: int, cols: int, dtype: torch.dtype):
    """The shared-memory layout of one [rows, cols] block (cached: every launch asks)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], _gl_dtype[dtype])


def descriptor(t: torch.Tensor, block: tuple[int, int]):
    """A bulk-copy descriptor of a 2-D tensor in [block] boxes, in this kernel's layout."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block), _layout(*block, t.dtype))


@functools.lru_cache(maxsize=None)
def supported(device: torch.device) -> bool:
    """sm_90 (cached: every launch asks); never under the CPU interpreter."""
    return not INTERPRET and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def linear(x2: torch.Tensor, w_desc, bias: torch.Tensor | None, out: torch.Tensor,
           block_n: int, block_k: int, stages: int, group_m: int, chunk_k: int) -> torch.Tensor:
    """out = x2 @ weight^T (+ bias), x2 [M, K], the weight [N, K] as ``w_desc`` (``descriptor``
    in [block_n, block_k] boxes: made once per weight by the caller), out [M, N]; all 16-bit
    with unit inner strides and 16-byte aligned rows (matmul._tma_ok); K summed in chunks of
    chunk_k (a multiple of block_k), or in one."""
    M, K = x2.shape
    N = out.shape[1]
    half = HALF_M.value
    tiles = triton.cdiv(M, 2 * half) * triton.cdiv(N, block_n)
    hopper_linear_kernel[(min(tiles, sm_count(x2.device)),)](
        descriptor(x2, (half, block_k)), w_desc, descriptor(out, (half, block_n)),
        bias if bias is not None else out, M, N, K, chunk_k,
        HAS_BIAS=bias is not None, CHUNKED=chunk_k < K, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        STAGES=stages, num_warps=CONSUMER_WARPS.value, maxnreg=168,
    )
    return out

