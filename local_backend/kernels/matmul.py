"""Batch-invariant ``linear``: out[M, N] = x[M, K] @ weight[N, K]^T + bias.

Why it is batch-invariant: every output element is one program's fp32
accumulator, filled by a single loop over K from 0 to K in steps of a fixed
BLOCK_K. There is no split-K and no tile choice that depends on M, so a row's
sums are added in the same order whether the batch holds 1 row or 1,000.
fp32 inputs use IEEE products (``input_precision="ieee"``), never TF32.
"""

from __future__ import annotations

import torch

from local_backend.kernels._triton import INTERPRET, cast_to, check_same_device, tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
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
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             cast_to(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=row_ok[:, None] & col_ok[None, :])


def _tiles(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps), fixed per device and dtype, never per M.

    Under the interpreter tl.dot is numpy matmul, whose BLAS kernel may depend on
    the operand shapes; fixed tiles keep it on one path. Big tiles keep the
    interpreter (about 2 ms per program) fast.
    """
    if INTERPRET:
        return 128, 256, 128, 4
    if dtype == torch.float32:
        return 64, 64, 32, 4
    return 128, 128, 64, 8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[..., K] @ weight[N, K]^T + bias[N] -> [..., N] in x's dtype."""
    if weight.dim() != 2:
        raise ValueError(f"linear: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"linear: x's last dim must equal weight's K={K}, got x shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"linear: dtype {x.dtype} not supported; use one of {SUPPORTED_DTYPES}")
    if weight.dtype != x.dtype:
        raise ValueError(f"linear: x is {x.dtype} but weight is {weight.dtype}; cast one to match")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"linear: bias must have shape ({N},), got {tuple(bias.shape)}")
    check_same_device(x, weight, *([bias] if bias is not None else []))

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
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps = _tiles(x.dtype)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _linear_kernel[grid](
        x2, weight, bias if bias is not None else x2, out,
        M, N, K,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, INTERPRETED=INTERPRET,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=num_warps,
    )
    return out.reshape(*lead, N)
