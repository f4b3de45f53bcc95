"""Batch-invariant ``linear``: out[M, N] = x[M, K] @ weight[N, K]^T + bias.

Why it is batch-invariant: K is cut into chunks of CHUNK_K (``k_chunk``: a
function of the dtype and K, never of M). Each chunk's partial sum is one fp32
accumulator filled by a single loop over the chunk, in K order; the chunk
partials are then added in chunk order, 0 + p0 + p1 + ..., and the bias last.
So a row's sums are added in the same order whether the batch holds 1 row or
1,000. Three launch shapes compute exactly that sum:
  * one program per output tile sweeps every chunk, adding each chunk's
    accumulator into a running total at the chunk's end (a plain loop, or
    ``nested``: a chunk loop the compiler flattens and pipelines);
  * ``partials``: one program per (output tile, chunk) writes its fp32 partial
    to memory and a second kernel adds them in the same order (small M, where
    one program per tile would leave most SMs idle);
  * ``halves``: two programs per output tile (K in 2 to 4 chunks). The first
    sums the first chunks, 0 + p0 (+ p1), and publishes that running total; the
    second keeps its one or two chunk sums apart (the first parked in memory),
    waits for the total, and adds them to it in order. Opt-in: meant for large
    tiles at mid-size M, it measured slower than one program per tile on an
    H100 (bench/NOTES.md, "Issue 15, round 14").
What changes with M is only the launch shape and the tiles (BLOCK_M x BLOCK_N,
BLOCK_K, warps, pipeline depth, program order): a tensor-core dot computes each
output element from its own row and column alone, adding products into the
accumulator 16 of K at a time in K order whatever BLOCK_K is (on Hopper; see
the table's comment), so the tiles move work between programs without touching
any element's arithmetic. bench/bench_matmul.py checks that claim bit for bit
on the GPU, for every entry of the tile table, on every run. Under the
interpreter the tiles are fixed (there BLOCK_K does set the order). fp32 inputs
use IEEE products (``input_precision="ieee"``), never TF32, and one fixed tile.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from local_backend.kernels._triton import INTERPRET, cast_to, interpreted_dot, tl, triton
from local_backend.kernels import gluon_api, matmul_hopper
from local_backend.kernels.contracts import check_linear
from triton.compiler.errors import CompilationError


@dataclass(frozen=True)
class Tiles:
    """How one launch splits the output; BLOCK_K is the only field that touches the numbers."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 4
    num_stages: int = 3
    GROUP_M: int = 8  # programs sweep GROUP_M row-blocks per column-block, so weight tiles stay in L2
    tma: bool = False  # Hopper's bulk tensor copies instead of pointer loads (same dot, same numbers)
    partials: bool = False  # one program per (tile, K chunk) + a summing kernel (same sum, same numbers)
    nested: bool = False  # fused chunks as a loop nest the compiler flattens (same sum, same numbers)
    halves: bool = False  # two programs per tile, K's first and last chunks (same sum, same numbers)
    # matmul_hopper's persistent warp-specialised kernel (BLOCK_M 128), where the launch
    # would take TMA on sm_90, without partials, and (K in chunks) BLOCK_N <= 128 (a running
    # total beside the accumulator); else this entry's Triton kernel (same numbers)
    ws: bool = False
    # ws only: programs of 2 CTAs on 256-row tiles, each weight chunk copied once for both
    # (TMA multicast, Triton 3.7 on; else 1 CTA per program); the same numbers
    cluster: int = 1


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile, in grouped order: consecutive programs share a
    column of weight tiles (better L2 reuse). Which tile a program takes never
    touches the numbers: each tile runs the same K loop."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _k_range(K, CHUNK_K, PARTIALS: tl.constexpr):
    """The K this program sweeps: its own chunk (partials) or all of K."""
    if PARTIALS:
        k_start = tl.program_id(1) * CHUNK_K
        return k_start, tl.minimum(k_start + CHUNK_K, K)
    else:
        return 0, K


@triton.jit
def _publish_first_half(flags_ptr):
    """Raise this tile's flag once every thread's stores of its total are done (release)."""
    tl.debug_barrier()
    tl.atomic_xchg(flags_ptr + tl.program_id(0), 1, sem="release", scope="gpu")


@triton.jit
def _split_columns(tile, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] -> its left and right halves (registers only: each thread keeps its values)."""
    return tile.reshape(BLOCK_M, 2, BLOCK_N // 2).permute(0, 2, 1).split()


@triton.jit
def _join_columns(left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return tl.join(left, right).permute(0, 2, 1).reshape(BLOCK_M, BLOCK_N)


@triton.jit
def _stage(part_desc, row, col, tile, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """An fp32 tile to the scratch, in two bulk copies of half its columns (half the staging),
    landed in global memory when this returns."""
    left, right = _split_columns(tile, BLOCK_M, BLOCK_N)
    part_desc.store([row, col], left)
    part_desc.store([row, col + BLOCK_N // 2], right)
    _bulk_stores_landed()


# Under the interpreter the bulk-copy kernel's dots and stores take its exact paths
# (``interpreted_dot``, ``cast_to``: its own tl.dot multiplies bf16 operands' bit patterns,
# Triton issue #11584), and the proxy fences are left out: it runs programs one by one with
# every copy done when it returns, and has no inline PTX.
_INTERPRETED = tl.constexpr(INTERPRET)


@triton.jit
def _tma_step(x_desc, w_desc, off_m, off_n, k0, acc):
    """acc + x[off_m tile, k0 block] @ w[off_n tile, k0 block]^T, read by bulk copies."""
    if _INTERPRETED:
        return interpreted_dot(x_desc.load([off_m, k0]), w_desc.load([off_n, k0]).T, acc)
    else:
        return tl.dot(x_desc.load([off_m, k0]), w_desc.load([off_n, k0]).T, acc)


@triton.jit
def _bulk_stores_landed():
    """Wait until this thread's bulk (TMA) stores are written to global memory, not only read
    from shared memory as Triton's own wait does, and order them before this thread's later
    accesses of any proxy; a barrier then extends that to the whole program."""
    if not _INTERPRETED:
        tl.inline_asm_elementwise("cp.async.bulk.wait_group 0;\n\tfence.proxy.async.global;\n\tmov.u32 $0, 0;",
                                  "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()


@triton.jit
def _async_reads_after_acquire():
    """Order this thread's earlier generic-proxy accesses (the flag's acquire) before its later
    bulk (TMA) reads."""
    if not _INTERPRETED:
        tl.inline_asm_elementwise("fence.proxy.async.global;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _unstage(part_desc, row, col, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return _join_columns(part_desc.load([row, col]), part_desc.load([row, col + BLOCK_N // 2]), BLOCK_M, BLOCK_N)


@triton.jit
def _wait_for_first_half(flags_ptr):
    """Wait for this tile's first half to publish and take its flag down for the next launch.
    The first halves are the grid's first row of programs, dispatched before any second
    half, so the one waited for is running or done."""
    tile = tl.program_id(0)
    while tl.atomic_cas(flags_ptr + tile, 1, 0, sem="acquire", scope="gpu") != 1:
        pass
    tl.debug_barrier()


@triton.jit
def _pointer_step(x_ptr, w_ptr, rows, cols, ks, row_ok, col_ok, k0, K,
                  stride_xm, stride_xk, stride_wn, stride_wk, acc, INTERPRETED: tl.constexpr):
    """acc + x[rows, k0:k0+BLOCK_K] @ w[cols, k0:k0+BLOCK_K]^T (zeros past K)."""
    k = k0 + ks
    k_ok = k < K
    a = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    b = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None] * stride_wk,
                mask=col_ok[None, :] & k_ok[:, None], other=0.0)
    if INTERPRETED:
        return interpreted_dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _pointer_chunks(x_ptr, w_ptr, rows, cols, ks, row_ok, col_ok, k_end, K, CHUNK_K,
                    stride_xm, stride_xk, stride_wn, stride_wk, INTERPRETED: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """0 + p0 + p1 + ... over the chunks before k_end, chunk by chunk: a loop nest the compiler
    flattens and pipelines. Past K the loads are zeros, which leave a sum's bits as they are."""
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in tl.range(0, k_end, CHUNK_K, flatten=True):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, CHUNK_K, BLOCK_K):
            acc = _pointer_step(x_ptr, w_ptr, rows, cols, ks, row_ok, col_ok, c0 + kk, K,
                                stride_xm, stride_xk, stride_wn, stride_wk, acc, INTERPRETED)
        total += acc
    return total


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, flags_ptr,
    M, N, K, CHUNK_K, K_MID,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr, CHUNKED: tl.constexpr, PARTIALS: tl.constexpr,
    NESTED: tl.constexpr, HALVES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N

    k_start, k_end = _k_range(K, CHUNK_K, PARTIALS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HALVES:
        # The first half sums its chunks (0 + p0 (+ p1)) and publishes that total in the fp32
        # scratch's rows [0, M). The second sums its first chunk, parks it in rows [M, 2M)
        # where it has a second (two accumulators would not fit the registers beside the
        # pipeline at 128 x 256), sums that one, waits for the first half's total and adds
        # in the fused loop's order: (total + its first chunk) + its second.
        part = part_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
        in_tile = row_ok[:, None] & col_ok[None, :]
        if tl.program_id(1) == 0:
            total = _pointer_chunks(x_ptr, w_ptr, rows, cols, ks, row_ok, col_ok, K_MID, K, CHUNK_K,
                                    stride_xm, stride_xk, stride_wn, stride_wk, INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_K)
            tl.store(part, total, mask=in_tile)
            _publish_first_half(flags_ptr)
        else:
            k_b = tl.minimum(K_MID + CHUNK_K, K)
            for k0 in range(K_MID, k_b, BLOCK_K):
                acc = _pointer_step(x_ptr, w_ptr, rows, cols, ks, row_ok, col_ok, k0, K,
                                    stride_xm, stride_xk, stride_wn, stride_wk, acc, INTERPRETED)
            two_chunks = k_b < K
            if two_chunks:
                tl.store(part + M * N, acc, mask=in_tile)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(k_b, K, BLOCK_K):
                    acc = _pointer_step(x_ptr, w_ptr, rows, cols, ks, row_ok, col_ok, k0, K,
                                        stride_xm, stride_xk, stride_wn, stride_wk, acc, INTERPRETED)
            _wait_for_first_half(flags_ptr)
            first = tl.load(part, mask=in_tile, other=0.0, cache_modifier=".cg")
            if two_chunks:
                acc = (first + tl.load(part + M * N, mask=in_tile, other=0.0, cache_modifier=".cg")) + acc
            else:
                acc = first + acc
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                     cast_to(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=in_tile)
        return
    if NESTED and CHUNKED and not PARTIALS:
        total = _pointer_chunks(x_ptr, w_ptr, rows, cols, ks, row_ok, col_ok, K, K, CHUNK_K,
                                stride_xm, stride_xk, stride_wn, stride_wk, INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        for k0 in range(k_start, k_end, BLOCK_K):
            if CHUNKED and not PARTIALS:
                if (k0 % CHUNK_K == 0) & (k0 > 0):  # a chunk ends: add its sum, start the next from 0
                    total += acc
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc = _pointer_step(x_ptr, w_ptr, rows, cols, ks, row_ok, col_ok, k0, K,
                                stride_xm, stride_xk, stride_wn, stride_wk, acc, INTERPRETED)

    if PARTIALS:
        part = part_ptr + (tl.program_id(1) * M + rows[:, None]).to(tl.int64) * N + cols[None, :]
        tl.store(part, acc, mask=row_ok[:, None] & col_ok[None, :])
    else:
        if CHUNKED:
            acc = total + acc
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                 cast_to(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_partials_kernel(
    part_ptr, bias_ptr, out_ptr, M, N, CHUNKS, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = 0 + p0 + p1 + ... + bias, chunk by chunk in order: the fused loop's sum."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < M * N
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    part = part_ptr + idx
    for _ in range(0, CHUNKS):
        total += tl.load(part, mask=ok, other=0.0)
        part += M * N  # the host keeps CHUNKS * M * N below 2^31
    row = idx // N
    col = idx % N
    if HAS_BIAS:
        total += tl.load(bias_ptr + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + col * stride_on, cast_to(total, out_ptr.dtype.element_ty, INTERPRETED),
             mask=ok)


@triton.jit
def _tma_chunks(x_desc, w_desc, off_m, off_n, k_end, CHUNK_K,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """_pointer_chunks fed by tensor descriptors (TMA zero-fills past the edges)."""
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in tl.range(0, k_end, CHUNK_K, flatten=True):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, CHUNK_K, BLOCK_K):
            acc = _tma_step(x_desc, w_desc, off_m, off_n, c0 + kk, acc)
        total += acc
    return total


@triton.jit
def _linear_tma_kernel(
    x_desc, w_desc, out_desc, bias_ptr, part_ptr, part_desc, flags_ptr,
    M, N, K, CHUNK_K, K_MID,
    HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr, CHUNKED: tl.constexpr, PARTIALS: tl.constexpr,
    NESTED: tl.constexpr, HALVES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The same loop as _linear_kernel, fed by tensor descriptors (TMA zero-fills past the edges)."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    k_start, k_end = _k_range(K, CHUNK_K, PARTIALS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HALVES:  # as in _linear_kernel, the scratch read and written by bulk copies
        # whole tiles: a tile's rows past M land in its own rows of the scratch, so the parked
        # chunks start at M rounded up to whole tiles
        parked = tl.cdiv(M, BLOCK_M) * BLOCK_M
        if tl.program_id(1) == 0:
            _stage(part_desc, off_m, off_n, _tma_chunks(x_desc, w_desc, off_m, off_n, K_MID, CHUNK_K,
                                                        BLOCK_M, BLOCK_N, BLOCK_K), BLOCK_M, BLOCK_N)
            _publish_first_half(flags_ptr)
        else:
            k_b = tl.minimum(K_MID + CHUNK_K, K)
            for k0 in range(K_MID, k_b, BLOCK_K):
                acc = _tma_step(x_desc, w_desc, off_m, off_n, k0, acc)
            two_chunks = k_b < K
            if two_chunks:
                _stage(part_desc, parked + off_m, off_n, acc, BLOCK_M, BLOCK_N)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(k_b, K, BLOCK_K):
                    acc = _tma_step(x_desc, w_desc, off_m, off_n, k0, acc)
            _wait_for_first_half(flags_ptr)
            _async_reads_after_acquire()
            first = _unstage(part_desc, off_m, off_n, BLOCK_M, BLOCK_N)
            if two_chunks:
                acc = (first + _unstage(part_desc, parked + off_m, off_n, BLOCK_M, BLOCK_N)) + acc
            else:
                acc = first + acc
            if HAS_BIAS:
                cols = off_n + tl.arange(0, BLOCK_N)
                acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            out_desc.store([off_m, off_n], cast_to(acc, OUT_DTYPE, _INTERPRETED))
        return
    if NESTED and CHUNKED and not PARTIALS:
        total = _tma_chunks(x_desc, w_desc, off_m, off_n, K, CHUNK_K, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        for k0 in range(k_start, k_end, BLOCK_K):
            if CHUNKED and not PARTIALS:
                if (k0 % CHUNK_K == 0) & (k0 > 0):
                    total += acc
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc = _tma_step(x_desc, w_desc, off_m, off_n, k0, acc)
    if PARTIALS:
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        part = part_ptr + (tl.program_id(1) * M + rows[:, None]).to(tl.int64) * N + cols[None, :]
        tl.store(part, acc, mask=(rows < M)[:, None] & (cols < N)[None, :])
    else:
        if CHUNKED:
            acc = total + acc
        if HAS_BIAS:
            cols = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        out_desc.store([off_m, off_n], cast_to(acc, OUT_DTYPE, _INTERPRETED))


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    """Hopper or newer (cached: the capability query costs a few microseconds per call)."""
    return not INTERPRET and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_ok(dtype: torch.dtype, device: torch.device, N: int, elem: int,
            x_stride: tuple[int, ...], w_stride: tuple[int, ...], aligned: bool) -> bool:
    """Tensor descriptors need Hopper or newer, unit inner strides and 16-byte aligned rows
    (x, weight and out; ``aligned``: x's and the weight's base pointers)."""
    if dtype not in (torch.bfloat16, torch.float16) or not aligned or not _has_tma(device):
        return False
    return all(s[1] == 1 and (s[0] * elem) % 16 == 0 for s in (x_stride, w_stride)) and (N * elem) % 16 == 0


# 16-bit dtypes on a GPU, from the H200 sweeps of round 4 (bench/sweep_matmul_chunks.py,
# CUDA-graph timed; figures in bench/NOTES.md). On Hopper a bf16/fp16 tl.dot adds its
# products into the fp32 accumulator 16 of K at a time, in K order, whatever the tile:
# BLOCK_K (64, 128 or 256), BLOCK_M (16 to 256), TMA or pointer loads and the launch
# shape changed no bit in ~900 candidates checked against the 8192-row product at two row
# offsets. So only the chunking (k_chunk) touches the numbers; bench_matmul checks every
# table entry bit for bit on each run.
SM_COUNT_GUESS = 132  # H100/H200 SXM; only tips the choice between two tile widths

# A/B benches only (bench/bench_linear_host.py, bench_e2e in two processes): "round3" is
# round 3's table with K unchunked (other bits for K >= 6144), "round4" this one. linear's
# ``table`` argument picks one per call; this is the default.
TABLES = ("round4", "round3")
TABLE = os.environ.get("DETAUDIT_MATMUL_TABLE", "round4")

# The partials launch (one program per tile and chunk, then a summing kernel) costs a
# second launch and an fp32 round trip through memory. It is used only where it clearly
# pays: 16 < M <= 128 and at least this many chunks. Graph-timed on the H200 (round 4,
# bench/results/h200_s6_sweep_mm_call2_graph.json): with 4 chunks (K = 14336) partials
# were 0.97 / 0.95x cuBLAS at M = 32 / 128 against 0.83 / 0.67 for one program per tile;
# with 2 chunks only 0.99 / 0.81 against 0.96 / 0.77, and on the engine's down projection
# (K = 8192, 2 chunks) no faster than one chunk. An eager pass pays the second launch on
# the host (~10-20 us), which outweighs a few percent of a 20 us kernel, so 2 chunks keep
# one kernel. Larger M never uses partials: chunked weights get the nested loop (one
# kernel, as lean on the host as round 3's launch).
PARTIALS_MIN_CHUNKS = 3

# Whether the table picks the halves launch (same numbers either way; explicit Tiles with
# halves=True always get it where it fits). Off: on an H100 it gave 0.72x cuBLAS where the
# 128 x 128 entry gives 0.87x (bench/NOTES.md, "Issue 15, round 14"); DETAUDIT_MATMUL_HALVES=1
# turns it on for A/B runs.
TABLE_HALVES = os.environ.get("DETAUDIT_MATMUL_HALVES", "0") != "0"


def round3_tiles_16bit(M: int, N: int) -> Tiles:
    """Round 3's table (BLOCK_K = 64, one chunk), kept for A/B benches."""
    if M <= 64:
        return Tiles(64, 16, 64, 4, 8) if N <= 8192 else Tiles(64, 64, 64, 4, 5)
    if M <= 128:
        return Tiles(64, 32, 64, 4, 6) if N <= 8192 else Tiles(128, 128, 64, 4, 5, tma=True)
    if M <= 1024:
        if triton.cdiv(M, 128) * triton.cdiv(N, 128) < SM_COUNT_GUESS:
            return Tiles(64, 128, 64, 4, 4, tma=True)
        return Tiles(128, 128, 64, 4, 3, tma=True)
    return Tiles(128, 128, 64, 4, 5, tma=True)


def _fit_block_k(t: Tiles, K: int, chunk: int) -> Tiles:
    """A chunked sum needs chunks that are whole BLOCK_K steps; else BLOCK_K = 64."""
    if chunk < K and chunk % t.BLOCK_K:
        return Tiles(**{**t.__dict__, "BLOCK_K": 64})
    return t


def _gpu_tiles_16bit(M: int, N: int, K: int, chunk: int, sm_count: int = SM_COUNT_GUESS) -> Tiles:
    chunked = chunk < K
    many_chunks = triton.cdiv(K, chunk) >= PARTIALS_MIN_CHUNKS  # partials pay (see PARTIALS_MIN_CHUNKS)
    wide = N > 8192
    # Small M is weight-bound: narrow tiles, long K steps, deep pipelines; with K in
    # many chunks, one program per (tile, chunk) so that narrow weights still fill the SMs.
    if M <= 16:
        t = Tiles(16, 64, 128, 4, 4) if wide else Tiles(16, 32, 256, 4, 4)
    elif M <= 64:
        # wide weights: 16-row tiles up to 32 rows; more row blocks would read the weight
        # that many times (the LM head at 64 rows: 254 us against 140 with 64-row tiles)
        t = Tiles(64, 64, 64, 4, 6, partials=True) if many_chunks else \
            (Tiles(16, 64, 64, 4, 6) if M <= 32 else Tiles(64, 64, 64, 4, 5)) if wide else Tiles(64, 32, 128, 4, 5)
    elif M <= 128:
        # narrow weights: 5 stages, TMA loads, GROUP_M 16 (H100 sweep, round 10, bench/results/
        # h100_s11_call1_points128.log: 4096^2 at M = 128 0.85 -> 0.96x cuBLAS against 4 stages of pointer loads;
        # bench_matmul with it, call 2: 0.99)
        t = Tiles(64, 128, 64, 4, 4, tma=True, partials=True) if many_chunks else \
            Tiles(128, 128, 64, 4, 5, tma=True) if wide else Tiles(64, 64, 128, 4, 5, GROUP_M=16, tma=True)
    elif M <= 1024:
        tiles_128 = triton.cdiv(M, 128) * triton.cdiv(N, 128)
        halves_256 = 2 * triton.cdiv(M, 128) * triton.cdiv(N, 256)
        fills_one_wave = 4 * halves_256 >= 3 * sm_count and halves_256 <= sm_count  # resident at once
        if TABLE_HALVES and 3 <= triton.cdiv(K, chunk) <= 4 and fills_one_wave:
            # K in 3-4 chunks (4096x14336 at M = 512): 128 x 256 tiles, two programs each, in one
            # wave (a third less L2 traffic than the 128 x 128 tiles below, yet slower: TABLE_HALVES)
            t = Tiles(128, 256, 64, 8, 3, tma=True, halves=True)
        elif 4 * tiles_128 >= 3 * SM_COUNT_GUESS and tiles_128 <= SM_COUNT_GUESS:
            # one nearly full wave of 128-row tiles, deep pipelines (H100 sweep, round 7: 128 tiles,
            # 4096^2 at M = 512 0.86 -> 0.96x cuBLAS, 4096x14336 0.76 -> 0.87x against 64-row tiles)
            t = Tiles(128, 128, 64, 4, 5, tma=True, nested=chunked)
        elif tiles_128 < SM_COUNT_GUESS:  # 128-row tiles would leave SMs idle
            t = Tiles(64, 128, 64, 4, 4, tma=True, nested=chunked)
        else:
            t = Tiles(128, 128, 64, 4, 3, tma=True, nested=chunked)
    elif chunked:
        t = Tiles(128, 256, 64, 8, 3, tma=True, nested=True)
    # From 2048 rows, K in one chunk: matmul_hopper's warp-specialised kernel (H100 sweep, round 9,
    # bench/results/h100_s10_call3_points.log: 4096^2 at M = 2048 / 8192 0.87 / 0.86 -> 0.99 / 1.03x
    # cuBLAS, 14336x4096 0.82 / 0.85 -> 0.91 / 1.00x). Where its 128 x 256 tiles leave the last
    # round of programs mostly idle (4096 columns at 2100 rows: 272 tiles on 132 SMs) the Triton
    # kernel's smaller tiles idle less but each runs slower: about even. Off sm_90 the Triton
    # kernel runs these tiles (8 warps).
    elif M >= 2048:
        t = Tiles(128, 256, 64, 8, 3, GROUP_M=16, tma=True, ws=True)
    # Rounds 5 and 7's sweeps, each change against the old entry in the same run (bench/results/
    # h200_s7_call3_points.log, h100_s8_call2_points.log): below 4096 rows 3 stages (H200:
    # 14336x4096 at M = 2048 0.86 -> 0.92x cuBLAS; H100: 4096^2 at M = 2048 0.86 -> 0.92x);
    # narrow weights from 4096 rows GROUP_M 16, more programs sharing a weight column in L2
    # (H200: 4096^2 at M = 8192 0.82 -> 0.90x; on the H100 the best tried, at 0.86x).
    elif M < 4096:
        t = Tiles(128, 128, 64, 4, 3, tma=True)
    elif not wide:
        t = Tiles(128, 128, 64, 4, 5, GROUP_M=16, tma=True)
    else:
        t = Tiles(128, 128, 64, 4, 5, tma=True)
    return _fit_block_k(t, K, chunk)


def tiles_for(dtype: torch.dtype, M: int, N: int, K: int, table: str | None = None,
              sm_count: int = SM_COUNT_GUESS) -> Tiles:
    """The tiles for one launch (speed only: the sum's order is k_chunk's).

    Under the interpreter one fixed shape is used (big, because each interpreted
    program costs about 2 ms), and the dot is ``interpreted_dot``, not numpy's BLAS;
    there BLOCK_K does set the order (numpy sums each block), so it never changes.
    ``sm_count``: the device's SMs (the halves launch needs all its programs resident at once).
    """
    if INTERPRET:
        return Tiles(128, 128, 32, num_warps=4, num_stages=1, GROUP_M=1)
    if dtype == torch.float32:
        return Tiles(64, 64, 32, num_warps=4, num_stages=3)
    if (table or TABLE) == "round3":
        return round3_tiles_16bit(M, N)
    return _gpu_tiles_16bit(M, N, K, min(k_chunk(dtype, N, K, table), K), sm_count)


# K is cut into about K / 4096 chunks (H200 sweep, round 4: bench/NOTES.md); 0: one chunk
TARGET_CHUNK_K = int(os.environ.get("DETAUDIT_MATMUL_CHUNK_K", "4096"))


def k_chunk(dtype: torch.dtype, N: int, K: int, table: str | None = None) -> int:
    """CHUNK_K for a weight of shape [N, K]: a function of (dtype, K) and the device kind
    alone, never of M, so every batch size adds a row's products in the same order.

    A long K in a few chunks lets a small batch use more programs (the partials
    launch) without a chunk per few hundred K, whose sums cost a large batch more
    than they give a small one. K itself (one chunk) where the interpreter runs or
    the dtype is fp32."""
    if INTERPRET or dtype == torch.float32 or (table or TABLE) == "round3" or not TARGET_CHUNK_K:
        return K
    chunks = max(1, round(K / TARGET_CHUNK_K))
    return triton.cdiv(triton.cdiv(K, 64), chunks) * 64


@dataclass(frozen=True)
class _Launch:
    """What ``linear`` decides from shapes, strides and alignment alone (see ``_launch_for``)."""

    tiles: Tiles
    chunk: int
    chunks: int
    partials: bool  # two kernels: the chunk partials, then their sum
    halves: bool  # two programs per tile, the second waiting for the first's running total
    k_mid: int  # where the second half's chunks start (halves only)
    tma: bool
    ws: bool  # matmul_hopper's kernel
    cluster: int  # its CTAs per program (1 or 2)
    grid: tuple[int, ...]
    sum_grid: tuple[int, ...]  # the summing kernel's (partials only)
    flags: dict  # the kernel's constexprs and launch options


SUM_BLOCK = 1024  # elements per program of _sum_partials_kernel
# linear's host path: at small M an eager call costs more host time than kernel time (round
# 4: ~40-60 us of Python and launch against a 13-40 us kernel), so the decisions that depend
# on shapes alone are made once per shape and kept here. The key holds everything they read;
# an engine sees a few thousand keys (M varies), so the dict is cleared when it grows past this.
_LAUNCHES: dict[tuple, _Launch] = {}
MAX_CACHED_LAUNCHES = 16384


def _launch_for(dtype: torch.dtype, device: torch.device, M: int, N: int, K: int,
                x_stride: tuple[int, ...], w_stride: tuple[int, ...], aligned: bool,
                tiles: Tiles | None, chunk_k: int | None, table: str | None) -> _Launch:
    key = (dtype, device, M, N, K, x_stride, w_stride, aligned, tiles, chunk_k, table or TABLE)
    launch = _LAUNCHES.get(key)
    if launch is None:
        launch = _plan_launch(dtype, device, M, N, K, x_stride, w_stride, aligned, tiles, chunk_k, table)
        if len(_LAUNCHES) >= MAX_CACHED_LAUNCHES:
            _LAUNCHES.clear()
        _LAUNCHES[key] = launch
    return launch


def _plan_launch(dtype, device, M, N, K, x_stride, w_stride, aligned, tiles, chunk_k, table) -> _Launch:
    sm_count = _sm_count(device)
    t = tiles or tiles_for(dtype, M, N, K, table, sm_count)
    chunk = min(chunk_k or k_chunk(dtype, N, K, table), K)
    chunks = triton.cdiv(K, chunk)
    if chunks > 1 and chunk % t.BLOCK_K:
        raise ValueError(f"chunk_k={chunk} is not a multiple of BLOCK_K={t.BLOCK_K}")
    partials = t.partials and chunks > 1 and chunks * M * N < 2**31
    tiles_mn = triton.cdiv(M, t.BLOCK_M) * triton.cdiv(N, t.BLOCK_N)
    # a second half spins until its first half has published, so every program must be
    # resident at once (one per SM at most: the tiles that use halves fill an SM's shared memory)
    halves = (t.halves and not partials and 2 <= chunks <= 4 and M * N < 2**31
              and 2 * tiles_mn <= sm_count)
    elem = dtype.itemsize
    tma = t.tma and _tma_ok(dtype, device, N, elem, x_stride, w_stride, aligned)
    return _Launch(
        tiles=t, chunk=chunk, chunks=chunks, partials=partials, halves=halves, k_mid=(chunks // 2) * chunk,
        tma=tma,
        ws=(t.ws and tma and not partials and not halves and t.BLOCK_M == 128 and (chunks == 1 or t.BLOCK_N <= 128)
            and matmul_hopper.supported(device)),
        cluster=t.cluster if t.cluster > 1 and gluon_api.MULTICAST else 1,
        grid=(tiles_mn, chunks) if partials else (tiles_mn, 2) if halves else (tiles_mn,),
        sum_grid=(triton.cdiv(M * N, SUM_BLOCK),),
        flags=dict(CHUNKED=chunks > 1, PARTIALS=partials, NESTED=t.nested, HALVES=halves, BLOCK_M=t.BLOCK_M,
                   BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K, GROUP_M=t.GROUP_M, num_warps=t.num_warps,
                   num_stages=t.num_stages),
    )


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Programs that run at once, one per SM; the interpreter runs them one by one, in order."""
    if INTERPRET or device.type != "cuda":
        return 2**30
    return torch.cuda.get_device_properties(device).multi_processor_count


def _scratch(p: _Launch, M: int, N: int, device: torch.device) -> torch.Tensor:
    """fp32 memory between programs: the chunk partials, or for halves the first halves' totals
    (rows [0, M)) and the parked chunks (from M rounded up to whole tiles)."""
    if p.partials:
        return torch.empty((p.chunks, M, N), dtype=torch.float32, device=device)
    return torch.empty((2 * triton.cdiv(M, p.tiles.BLOCK_M) * p.tiles.BLOCK_M, N), dtype=torch.float32, device=device)


# One flag per tile for the halves launch, per device and stream: a second half takes its
# flag down after reading, so the flags are all 0 between launches and need no reset.
_HALF_FLAGS: dict[tuple, torch.Tensor] = {}


def _half_flags(device: torch.device, tiles: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    flags = _HALF_FLAGS.get(key)
    if flags is None or flags.numel() < tiles:
        flags = _HALF_FLAGS[key] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return flags


# Weights live as long as the model, so their tensor descriptors are made once per
# (pointer, shape, strides, dtype, block). A cached descriptor holds its tensor, so the
# pointer cannot be freed and reused by another tensor while the entry lives (the price:
# a weight stays allocated while cached; ``clear_caches`` lets it go). Triton still
# encodes the CUtensorMap at each launch; this saves the Python side only. x and out are
# new tensors at every call, so theirs are made per call.
_WEIGHT_DESCS: dict[tuple, object] = {}
MAX_CACHED_WEIGHT_DESCS = 1024


def _triton_descriptor(t: torch.Tensor, block: tuple[int, int]):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(t, list(block))


def _weight_desc(weight: torch.Tensor, block: tuple[int, int], make=_triton_descriptor):
    """The weight's descriptor for ``block``, made by ``make`` (Triton's, or matmul_hopper's
    Gluon one) once per weight and kind."""
    key = (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype, weight.device, block, make)
    desc = _WEIGHT_DESCS.get(key)
    if desc is None:
        if len(_WEIGHT_DESCS) >= MAX_CACHED_WEIGHT_DESCS:
            _WEIGHT_DESCS.clear()
        desc = _WEIGHT_DESCS[key] = make(weight, block)
    return desc


def clear_caches() -> None:
    """Forget the cached launch decisions and weight descriptors (frees weights they held)."""
    _LAUNCHES.clear()
    _WEIGHT_DESCS.clear()


def _hopper_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                   p: _Launch) -> torch.Tensor | None:
    """matmul_hopper's kernel for launch ``p``: in 2-CTA programs where asked and this Triton
    builds them, else in 1-CTA programs (the same bits); None where this Triton builds neither
    (the caller runs the Triton kernel: the same bits again)."""
    t = p.tiles
    for cluster in ((p.cluster, 1) if p.cluster > 1 and not gluon_api.refused("matmul-cluster") else (1,)):
        make = matmul_hopper.shared_descriptor if cluster > 1 else matmul_hopper.descriptor
        w_desc = _weight_desc(weight, (t.BLOCK_N, t.BLOCK_K), make)
        try:
            return matmul_hopper.linear(x2, w_desc, bias, out, t.BLOCK_N, t.BLOCK_K, t.num_stages, t.GROUP_M,
                                        p.chunk, cluster=cluster)
        except CompilationError as error:  # this Triton cannot build it
            if cluster > 1:
                gluon_api.refuse("matmul-cluster", error, instead="the 1-CTA Gluon matmul kernel")
            else:
                gluon_api.refuse("matmul", error)
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           tiles: Tiles | None = None, chunk_k: int | None = None, table: str | None = None) -> torch.Tensor:
    """x[..., K] @ weight[N, K]^T + bias[N] -> [..., N] in x's dtype.

    ``tiles`` and ``chunk_k`` override the table and the chunk rule, ``table`` picks
    one of TABLES (benchmarks, tuning and tests only: another chunk_k, or round 3's
    table, adds in another order)."""
    check_linear(x, weight, bias)
    N, K = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.reshape(*lead, N)
    if K == 0:
        out.zero_()
        if bias is not None:
            out += bias.to(out.dtype)
        return out.reshape(*lead, N)
    aligned = x2.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
    p = _launch_for(x.dtype, x.device, M, N, K, x2.stride(), weight.stride(), aligned, tiles, chunk_k, table)
    t = p.tiles
    part = _scratch(p, M, N, x.device) if p.partials or p.halves else out
    flags = _half_flags(x.device, p.grid[0]) if p.halves else out
    bias_arg = bias if bias is not None else out
    if p.ws and not gluon_api.refused("matmul"):
        done = _hopper_linear(x2, weight, bias, out, p)
        if done is not None:
            return done.reshape(*lead, N)
    if p.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        out_desc = TensorDescriptor(out, out.shape, out.stride(), [t.BLOCK_M, t.BLOCK_N])
        _linear_tma_kernel[p.grid](
            TensorDescriptor(x2, x2.shape, x2.stride(), [t.BLOCK_M, t.BLOCK_K]),
            _weight_desc(weight, (t.BLOCK_N, t.BLOCK_K)),
            out_desc, bias_arg, part,
            TensorDescriptor(part, part.shape, part.stride(), [t.BLOCK_M, t.BLOCK_N // 2]) if p.halves else out_desc,
            flags, M, N, K, p.chunk, p.k_mid,
            HAS_BIAS=bias is not None, OUT_DTYPE=tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16,
            **p.flags,
        )
    else:
        _linear_kernel[p.grid](
            x2, weight, bias_arg, out, part, flags,
            M, N, K, p.chunk, p.k_mid,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, INTERPRETED=INTERPRET, **p.flags,
        )
    if p.partials:
        _sum_partials_kernel[p.sum_grid](
            part, bias_arg, out, M, N, p.chunks, out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, INTERPRETED=INTERPRET, BLOCK=SUM_BLOCK, num_warps=4,
        )
    return out.reshape(*lead, N)


# Triton compiles one kernel per set of constexprs and per class of each int argument:
# 1, a multiple of 16, or any other value. M is such an argument (so are the descriptors'
# shapes), so a table entry needs up to three compiles; the representatives below cover
# every row count the table can tell apart (past 1024 rows it changes at 2048 and 4096).
WARM_ROWS = tuple(range(1, 1025)) + (1040, 1041, 2048, 2049, 4096, 4097)


def _m_class(M: int) -> int:
    return 1 if M == 1 else 16 if M % 16 == 0 else 0


def warm_up(layers: list[tuple[torch.Tensor, torch.Tensor | None]], table: str | None = None) -> int:
    """Launch ``linear`` once for every distinct kernel the tile table can pick for these
    (weight, bias) pairs, so that no forward pass compiles (an eager mixed pass can meet a
    row count, hence a launch shape, that no warm-up pass had). The number of launches;
    0 (a no-op) on a CPU or under the interpreter, where nothing is compiled ahead."""
    launched, seen = 0, set()
    for weight, bias in layers:
        if INTERPRET or not weight.is_cuda:
            continue
        N, K = weight.shape
        for M in WARM_ROWS:
            p = _launch_for(weight.dtype, weight.device, M, N, K, (K, 1), weight.stride(),
                            weight.data_ptr() % 16 == 0, None, None, table)
            key = (p.tiles, p.partials, p.halves, p.tma, p.chunks > 1, _m_class(M), bias is not None, weight.dtype,
                   N, K, weight.stride())
            if key not in seen:
                seen.add(key)
                linear(torch.zeros((M, K), dtype=weight.dtype, device=weight.device), weight, bias, table=table)
                launched += 1
    return launched
