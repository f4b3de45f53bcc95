"""Batch-invariant ``silu_mul``: silu(gate) * up, the SwiGLU of a Llama MLP.

Elementwise, but it runs a transcendental function, so it goes through the
same switch as the reductions: one program per row, whole rows in fixed
chunks, so an element's instructions never depend on where its row sits in
the batch. Rounding matches torch's ``F.silu(gate) * up``: silu in fp32,
rounded to the input dtype, then the product rounded again.
"""

from __future__ import annotations

import torch

from local_backend.kernels._triton import INTERPRET, cast_to, check_same_device, tl, triton

MAX_BLOCK = 4096


@triton.jit
def _silu_mul_kernel(
    gate_ptr, up_ptr, out_ptr, F,
    stride_gm, stride_um, stride_om,
    BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    for f0 in range(0, F, BLOCK):
        f = f0 + offs
        mask = f < F
        g = tl.load(gate_ptr + row * stride_gm + f, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * stride_um + f, mask=mask, other=0.0).to(tl.float32)
        silu = cast_to(g / (1.0 + tl.exp(-g)), out_ptr.dtype.element_ty, INTERPRETED).to(tl.float32)
        tl.store(out_ptr + row * stride_om + f, cast_to(silu * u, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate[..., F]) * up[..., F] -> same shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate and up must match in shape and dtype, got "
                         f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")
    if gate.dim() < 1 or not gate.is_floating_point():
        raise ValueError(f"silu_mul: need floating tensors with at least 1 dim, got {gate.dtype} {tuple(gate.shape)}")
    check_same_device(gate, up)
    F = gate.shape[-1]
    g2, u2 = gate.reshape(-1, F), up.reshape(-1, F)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    if u2.stride(-1) != 1:
        u2 = u2.contiguous()
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    if g2.shape[0] and F:
        BLOCK = min(triton.next_power_of_2(F), MAX_BLOCK)
        _silu_mul_kernel[(g2.shape[0],)](g2, u2, out, F, g2.stride(0), u2.stride(0), out.stride(0),
                                         BLOCK=BLOCK, INTERPRETED=INTERPRET)
    return out.reshape(gate.shape)
