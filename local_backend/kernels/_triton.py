"""The one place that imports Triton.

Without a CUDA device the kernels run under Triton's interpreter (numpy on the
CPU). The interpreter must be switched on before ``triton`` is first imported,
so every kernel module imports Triton from here and never directly.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""True when kernels run under the interpreter. There ``tl.dot`` on bf16 is
numpy matmul over the raw uint16 bits (wrong numbers), so kernels upcast their
dot operands to fp32 first; the product of two bf16/fp16 values is exact in
fp32, so this changes rounding only in the accumulation, not the maths."""


def check_same_device(*tensors: torch.Tensor) -> None:
    """Kernels read raw pointers: a tensor on another device is a crash, not an error."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


__all__ = ["triton", "tl", "INTERPRET", "check_same_device"]
