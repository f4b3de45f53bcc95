"""Batch-invariant ``log_softmax`` over the vocabulary, fp32 output.

Why it is batch-invariant: one program per row; the max and the sum of
exponentials run over fixed-size chunks of the vocabulary in one order, so a
row's logprobs are the same bits whatever else is in the batch. These are the
numbers detaudit reports, so this kernel is the last word on them.
"""

from __future__ import annotations

import torch

from local_backend.kernels._triton import tl, triton
from local_backend.kernels.contracts import check_log_softmax

MAX_BLOCK = 8192  # larger vocabularies are swept in chunks of this size


@triton.jit
def _log_softmax_kernel(
    x_ptr, out_ptr, V,
    stride_xm, stride_om,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    out_row = out_ptr + row * stride_om
    offs = tl.arange(0, BLOCK)

    running_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        v = v0 + offs
        x = tl.load(x_row + v, mask=v < V, other=float("-inf")).to(tl.float32)
        running_max = tl.maximum(running_max, x)
    row_max = tl.max(running_max, axis=0)

    sum_exp = tl.zeros((BLOCK,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        v = v0 + offs
        x = tl.load(x_row + v, mask=v < V, other=float("-inf")).to(tl.float32)
        sum_exp += tl.exp(x - row_max)
    log_sum = tl.log(tl.sum(sum_exp, axis=0))

    for v0 in range(0, V, BLOCK):
        v = v0 + offs
        mask = v < V
        x = tl.load(x_row + v, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + v, x - row_max - log_sum, mask=mask)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim of x[..., V] -> same shape, float32."""
    check_log_softmax(x)
    V = x.shape[-1]
    x2 = x.reshape(-1, V)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.float32, device=x.device)
    if x2.shape[0] and V:
        BLOCK = min(triton.next_power_of_2(V), MAX_BLOCK)
        _log_softmax_kernel[(x2.shape[0],)](x2, out, V, x2.stride(0), out.stride(0), BLOCK=BLOCK)
    return out.reshape(x.shape)
