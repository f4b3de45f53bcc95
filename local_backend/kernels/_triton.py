"""The one place that imports Triton.

Without a CUDA device the kernels run under Triton's interpreter (numpy on the
CPU). The switch is the TRITON_INTERPRET environment variable, read when
kernels are decorated and when ``triton.language`` is imported, so every
kernel module imports Triton from here and never directly.
"""

from __future__ import annotations

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Compiled kernels fuse a * b + c into one FMA, as every Triton up to 3.9 does by default.
# Triton 3.10 turns fusion off by default ("TRITON_DEFAULT_FP_FUSION is unset" warns about it
# in 3.9), which would give other bits under the same KERNELS_REVISION. Pinned here, so
# that a Triton upgrade does not silently move a GPU's bits; the interpreter never fuses.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

INTERPRET = bool(triton.knobs.runtime.interpret)
"""True when kernels run under the interpreter. Kernels take it as the
constexpr ``INTERPRETED`` and work around three flaws of the interpreter:
``tl.dot`` is numpy's BLAS, whose row results depend on the row's place in the
block on some CPUs, and on bf16 it multiplies the raw uint16 bits (kernels use
``interpreted_dot``, in fp32: products of bf16/fp16 values are exact there); and
fp32 -> bf16 casts truncate instead of rounding to nearest even (kernels use
``cast_to``)."""


def _reload_language_for_interpreter() -> None:
    """Some libraries (transformers' Llama, for one) import Triton before we can
    switch the interpreter on; ``tl.sum``, ``tl.max``, ``tl.zeros``... were then
    built for the compiler and cannot run in the interpreter. Rebuild them.
    Nothing is lost: without CUDA the compiled versions could not run anyway."""
    import triton.language.random
    import triton.language.standard

    importlib.reload(triton.language.standard)
    importlib.reload(triton.language.random)
    importlib.reload(triton.language)


if INTERPRET and not isinstance(tl.sum, InterpretedFunction):
    _reload_language_for_interpreter()

if INTERPRET:
    # interpreted_dot holds a [M, K, N] block of products, which can pass the
    # compiler's cap on a block's size (2^20 elements); the interpreter's blocks
    # are numpy arrays, to which the cap does not apply.
    import triton._utils

    if hasattr(triton._utils, "TRITON_MAX_TENSOR_NUMEL"):
        triton._utils.TRITON_MAX_TENSOR_NUMEL = 1 << 26


@triton.jit
def cast_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even, as on a GPU, also under the
    interpreter, whose fp32 -> bf16 cast truncates. Use it before every store of
    a narrower dtype: a store's implicit cast truncates too."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def interpreted_matmul(a, b):
    """a @ b in fp32 for the interpreter, without numpy's BLAS (see ``interpreted_dot``)."""
    return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def interpreted_dot(a, b, acc):
    """acc + a @ b for the interpreter, without numpy's BLAS.

    The interpreter runs ``tl.dot`` as numpy matmul, and OpenBLAS's sgemm
    micro-kernels (Haswell, Zen) give a row other bits at another place in the
    block: a kernel would be batch-invariant or not by the CPU it lands on. Here
    every product is one IEEE multiply and the sum over K is numpy's sum over a
    block of fixed shape, the same arithmetic for every row wherever it sits."""
    return acc + interpreted_matmul(a, b)


__all__ = ["triton", "tl", "INTERPRET", "cast_to", "interpreted_dot",
           "interpreted_matmul"]
