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

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

INTERPRET = bool(triton.knobs.runtime.interpret)
"""True when kernels run under the interpreter. Kernels take it as the
constexpr ``INTERPRETED`` and work around two numeric flaws of the interpreter:
``tl.dot`` on bf16 multiplies the raw uint16 bits (kernels upcast dot operands
to fp32 first; products of bf16/fp16 values are exact in fp32), and fp32 -> bf16
casts truncate instead of rounding to nearest even (kernels use ``cast_to``)."""


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


def check_same_device(*tensors: torch.Tensor) -> None:
    """Kernels read raw pointers: a tensor on another device is a crash, not an error."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


__all__ = ["triton", "tl", "INTERPRET", "cast_to", "check_same_device"]
