"""What every implementation of an op accepts, checked in one place: the Triton kernels
and the cpu-exact ops raise the same ValueError for the same bad input. No Triton here,
so the CPU path checks without importing it."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256


def check_same_device(*tensors: torch.Tensor) -> None:
    """Kernels read raw pointers: a tensor on another device is a crash, not an error."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
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


def check_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> None:
    D = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or tuple(weight.shape) != (D,):
        raise ValueError(f"rms_norm: weight must have shape ({D},) to match x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"rms_norm: x must be a floating tensor, got {x.dtype}")
    check_same_device(x, weight)


def check_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate and up must match in shape and dtype, got "
                         f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")
    if gate.dim() < 1 or not gate.is_floating_point():
        raise ValueError(f"silu_mul: need floating tensors with at least 1 dim, got {gate.dtype} {tuple(gate.shape)}")
    check_same_device(gate, up)


def check_log_softmax(x: torch.Tensor) -> None:
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"log_softmax: need a floating tensor with at least 1 dim, got {x.dtype} {tuple(x.shape)}")
    check_same_device(x)


def check_attention(q, k_cache, v_cache, slots, positions) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"attention: expected q[T, Hq, D] and k_cache = v_cache shape [S, L, Hkv, D], got "
                         f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    T, Hq, D = q.shape
    S, L, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"attention: head_dim of q ({D}) and of the cache ({Dk}) differ")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim {D} is over the supported {MAX_HEAD_DIM}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"attention: q, k_cache and v_cache must share a dtype, got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if slots.shape != (T,) or positions.shape != (T,):
        raise ValueError(f"attention: slots and positions must have shape ({T},), got "
                         f"{tuple(slots.shape)} and {tuple(positions.shape)}")
    check_same_device(q, k_cache, v_cache, slots, positions)


def check_attention_indices(slots: torch.Tensor, positions: torch.Tensor, S: int, L: int) -> None:
    """On host copies: an index outside the cache would read or write out of bounds."""
    lo_slot, hi_slot, lo_pos, hi_pos = (int(slots.min()), int(slots.max()), int(positions.min()), int(positions.max()))
    if lo_slot < 0 or hi_slot >= S:
        raise ValueError(f"attention: slots must lie in [0, {S}), got {lo_slot}..{hi_slot}")
    if lo_pos < 0 or hi_pos >= L:
        raise ValueError(f"attention: positions must lie in [0, {L}), got {lo_pos}..{hi_pos}")
