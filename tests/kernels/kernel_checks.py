"""Inputs and checks shared by the kernel tests (imported by name: conftest is not a module to import)."""

from __future__ import annotations

import torch

# The kernel tests run wherever the kernels do: compiled on a CUDA device, else the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# Tolerances against a float64 reference, scaled to the output's magnitude.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Batches that hold one "needle" row among others: 1+3, 1+31 and a larger one
# that spans several tiles of every kernel.
EXTRA_ROWS = [3, 31, 80]


def randn(*shape: int, gen: torch.Generator, dtype=torch.float32, scale: float = 1.0,
          device: str = DEVICE) -> torch.Tensor:
    """Drawn on the CPU from a seeded generator, so every device sees the same numbers."""
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Close to a float64 reference, relative to the reference's largest magnitude."""
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    err = (actual.double() - expected.double()).abs().max().item()
    size = expected.double().abs().max().item()
    assert err <= TOL[dtype] * max(size, 1.0), f"max error {err:.3g} vs magnitude {size:.3g} ({dtype})"


def batches_with_needle(needle: torch.Tensor, others: torch.Tensor, gen: torch.Generator):
    """Yield (batch, index of the needle) for each size in EXTRA_ROWS, needle at a random row."""
    for extra in EXTRA_ROWS:
        at = int(torch.randint(0, extra + 1, (1,), generator=gen))
        batch = torch.cat([others[:at], needle[None], others[at:extra]])
        yield batch, at


def gpu_linear_operands(M: int, N: int, K: int, seed: int = 0):
    """bf16 x [M, K], weight [N, K] (scaled so outputs stay near 1) and bias [N], drawn on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=gen) * K ** -0.5).bfloat16()
    b = torch.randn(N, device="cuda", generator=gen).bfloat16()
    return x, w, b
