"""Batch-invariant RMSNorm, in Hugging Face ``LlamaRMSNorm`` order:
normalise in fp32, cast to the input dtype, then multiply by the weight.

Why it is batch-invariant: each row is reduced on its own (one program per
row on a GPU); the sum of squares runs over fixed-size chunks in one order, so
a row's result never depends on its neighbours or on how many rows there are.
Under the interpreter a program takes a fixed block of ROWS rows instead: the
per-program overhead is milliseconds there, and a fixed block shape keeps each
row's arithmetic the same wherever it sits.
"""

from __future__ import annotations

import torch

from local_backend.kernels._triton import INTERPRET, cast_to, tl, triton
from local_backend.kernels.contracts import check_rms_norm

MAX_BLOCK = 8192  # wider rows are reduced in chunks of this size
ROWS = 16 if INTERPRET else 1  # rows per program; fixed, never chosen from the batch


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, D, eps,
    M, stride_xm, stride_om,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, INTERPRETED: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    x_rows = x_ptr + rows[:, None] * stride_xm
    out_rows = out_ptr + rows[:, None] * stride_om
    offs = tl.arange(0, BLOCK)

    sum_sq = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for d0 in range(0, D, BLOCK):
        d = d0 + offs
        mask = row_ok[:, None] & (d < D)[None, :]
        x = tl.load(x_rows + d[None, :], mask=mask, other=0.0).to(tl.float32)
        sum_sq += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=1) / D + eps)

    for d0 in range(0, D, BLOCK):
        d = d0 + offs
        mask = row_ok[:, None] & (d < D)[None, :]
        x = tl.load(x_rows + d[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
        normed = cast_to(x * rstd[:, None], out_ptr.dtype.element_ty, INTERPRETED).to(tl.float32)
        tl.store(out_rows + d[None, :], cast_to(normed * w[None, :], out_ptr.dtype.element_ty, INTERPRETED),
                 mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x[..., D] normalised over D and scaled by weight[D] -> x's shape and dtype."""
    check_rms_norm(x, weight)
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] and D:
        BLOCK = min(triton.next_power_of_2(D), MAX_BLOCK)
        M = x2.shape[0]
        _rms_norm_kernel[(triton.cdiv(M, ROWS),)](x2, weight, out, D, float(eps), M,
                                                  x2.stride(0), out.stride(0), BLOCK=BLOCK, ROWS=ROWS,
                                                  INTERPRETED=INTERPRET)
    return out.reshape(x.shape)
