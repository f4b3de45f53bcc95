"""Batch-invariant ``linear``: out[M, N] = x[M, K] @ weight[N, K]^T + bias.

Why it is batch-invariant: every output element is one program's fp32
accumulator, filled by a single loop over K from 0 to K in steps of BLOCK_K.
There is no split-K, and BLOCK_K is the same at every M, so a row's sums are
added in the same order whether the batch holds 1 row or 1,000. What does
change with M is only how output elements are grouped into programs
(BLOCK_M x BLOCK_N, warps, pipeline depth, program order): a tensor-core dot
computes each output element from its own row and column alone, so the
grouping moves work between programs without touching any element's
arithmetic. bench/bench_matmul.py checks that claim bit for bit on the GPU,
for every entry of the tile table. fp32 inputs use IEEE products
(``input_precision="ieee"``), never TF32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from local_backend.kernels._triton import INTERPRET, cast_to, interpreted_dot, tl, triton
from local_backend.kernels.contracts import check_linear

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
def _linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        a = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None] * stride_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if INTERPRETED:
            acc = interpreted_dot(a, b, acc)
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             cast_to(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _linear_tma_kernel(
    x_desc, w_desc, out_desc, bias_ptr,
    M, N, K,
    HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The same loop as _linear_kernel, fed by tensor descriptors (TMA zero-fills past the edges)."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = x_desc.load([off_m, k0])
        b = w_desc.load([off_n, k0])
        acc = tl.dot(a, b.T, acc)
    if HAS_BIAS:
        cols = off_n + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out_desc.store([off_m, off_n], acc.to(OUT_DTYPE))


def _tma_ok(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Tensor descriptors need Hopper or newer, unit inner strides and 16-byte aligned rows."""
    if INTERPRET or not x2.is_cuda or torch.cuda.get_device_capability(x2.device)[0] < 9:
        return False
    if x2.dtype not in (torch.bfloat16, torch.float16):
        return False
    return all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in (x2, weight))


# 16-bit dtypes on a GPU: BLOCK_K = 64 at every M, the rest chosen from the H100
# sweep (bench/bench_matmul.py --tune, figures in bench/NOTES.md). Every candidate
# there was bitwise equal to the 8192-row product at every M.
SM_COUNT_GUESS = 132  # H100 SXM; only tips the choice between two tile widths


def _gpu_tiles_16bit(M: int, N: int) -> Tiles:
    # Small M is weight-bound: narrow tiles, deep pipelines, enough programs to
    # pull the weights through every SM.
    if M <= 64:
        return Tiles(64, 16, 64, num_warps=4, num_stages=8) if N <= 8192 else Tiles(64, 64, 64, num_warps=4, num_stages=5)
    if M <= 128:
        return Tiles(64, 32, 64, num_warps=4, num_stages=6) if N <= 8192 else \
            Tiles(128, 128, 64, num_warps=4, num_stages=5, tma=True)
    if M <= 1024:
        if triton.cdiv(M, 128) * triton.cdiv(N, 128) < SM_COUNT_GUESS:  # 128-row tiles would leave SMs idle
            return Tiles(64, 128, 64, num_warps=4, num_stages=4, tma=True)
        return Tiles(128, 128, 64, num_warps=4, num_stages=3, tma=True)
    return Tiles(128, 128, 64, num_warps=4, num_stages=5, tma=True)


def tiles_for(dtype: torch.dtype, M: int, N: int, K: int) -> Tiles:
    """The tiles for one launch. BLOCK_K depends only on the dtype (and device), never on M.

    Under the interpreter one fixed shape is used (big, because each interpreted
    program costs about 2 ms), and the dot is ``interpreted_dot``, not numpy's BLAS.
    """
    if INTERPRET:
        return Tiles(128, 128, 32, num_warps=4, num_stages=1, GROUP_M=1)
    if dtype == torch.float32:
        return Tiles(64, 64, 32, num_warps=4, num_stages=3)
    return _gpu_tiles_16bit(M, N)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           tiles: Tiles | None = None) -> torch.Tensor:
    """x[..., K] @ weight[N, K]^T + bias[N] -> [..., N] in x's dtype.

    ``tiles`` overrides the table (benchmarks and tuning only)."""
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
    t = tiles or tiles_for(x.dtype, M, N, K)
    grid = (triton.cdiv(M, t.BLOCK_M) * triton.cdiv(N, t.BLOCK_N),)
    if t.tma and _tma_ok(x2, weight) and (N * out.element_size()) % 16 == 0:
        from triton.tools.tensor_descriptor import TensorDescriptor
        _linear_tma_kernel[grid](
            TensorDescriptor.from_tensor(x2, [t.BLOCK_M, t.BLOCK_K]),
            TensorDescriptor.from_tensor(weight, [t.BLOCK_N, t.BLOCK_K]),
            TensorDescriptor.from_tensor(out, [t.BLOCK_M, t.BLOCK_N]),
            bias if bias is not None else out, M, N, K,
            HAS_BIAS=bias is not None, OUT_DTYPE=tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16,
            BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K, GROUP_M=t.GROUP_M,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )
        return out.reshape(*lead, N)
    _linear_kernel[grid](
        x2, weight, bias if bias is not None else x2, out,
        M, N, K,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, INTERPRETED=INTERPRET,
        BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K, GROUP_M=t.GROUP_M,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out.reshape(*lead, N)
