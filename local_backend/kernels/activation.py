"""Batch-invariant ``silu_mul``: silu(gate) * up, the SwiGLU of a Llama MLP.

Elementwise, but it runs a transcendental function, so it goes through the
same switch as the reductions: whole rows in fixed chunks (one row per
program on a GPU, a fixed block of ROWS rows under the interpreter, where each
program costs milliseconds), so an element's instructions never depend on
where its row sits in the batch. Rounding matches torch's ``F.silu(gate) * up``: silu in fp32,
rounded to the input dtype, then the product rounded again.
"""

from __future__ import annotations

import torch

from local_backend.kernels._triton import INTERPRET, cast_to, tl, triton
from local_backend.kernels.contracts import check_silu_mul

MAX_BLOCK = 4096
ROWS = 16 if INTERPRET else 1  # rows per program; fixed, never chosen from the batch


@triton.jit
def _silu_mul_kernel(
    gate_ptr, up_ptr, out_ptr, F, M,
    stride_gm, stride_um, stride_om,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, INTERPRETED: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS))[:, None]
    offs = tl.arange(0, BLOCK)
    for f0 in range(0, F, BLOCK):
        f = (f0 + offs)[None, :]
        mask = (rows < M) & (f < F)
        g = tl.load(gate_ptr + rows * stride_gm + f, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + rows * stride_um + f, mask=mask, other=0.0).to(tl.float32)
        silu = cast_to(g / (1.0 + tl.exp(-g)), out_ptr.dtype.element_ty, INTERPRETED).to(tl.float32)
        tl.store(out_ptr + rows * stride_om + f, cast_to(silu * u, out_ptr.dtype.element_ty, INTERPRETED),
                 mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate[..., F]) * up[..., F] -> same shape and dtype."""
    check_silu_mul(gate, up)
    F = gate.shape[-1]
    g2, u2 = gate.reshape(-1, F), up.reshape(-1, F)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    if u2.stride(-1) != 1:
        u2 = u2.contiguous()
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    if g2.shape[0] and F:
        BLOCK = min(triton.next_power_of_2(F), MAX_BLOCK)
        M = g2.shape[0]
        _silu_mul_kernel[(triton.cdiv(M, ROWS),)](g2, u2, out, F, M, g2.stride(0), u2.stride(0),
                                                  out.stride(0), BLOCK=BLOCK, ROWS=ROWS,
                                                  INTERPRETED=INTERPRET)
    return out.reshape(gate.shape)
