"""One switch for every reduction the model does: ``get_ops("batch-invariant")``
or ``get_ops("default")``, and, for batch-invariant, which implementation runs.

The model calls only these ops for anything that reduces (matmul, RMSNorm,
log-softmax, attention) or that runs a transcendental function elementwise
(SiLU), so that the switch covers the whole forward pass. An ``Ops`` object is
passed to the model explicitly: no global override, nothing to leave installed
when an exception escapes.

Shapes:
    linear(x[M, K], weight[N, K], bias[N] | None) -> [M, N]           (nn.Linear layout)
    linears(x, [(weight, bias), ...]) -> [linear(x, weight, bias), ...]  (one input, several projections)
    rms_norm(x[M, D], weight[D], eps) -> [M, D]
    silu_mul(gate[M, F], up[M, F]) -> [M, F]                            silu(gate) * up
    log_softmax(x[M, V]) -> [M, V] float32
    attention(q[T, Hq, D], k_cache[S, L, Hkv, D], v_cache[S, L, Hkv, D],
              slots[T] int, positions[T] int, scale) -> [T, Hq, D]
        Query token t attends causally to k_cache[slots[t], 0 .. positions[t]]
        (inclusive). The cache already holds the token's own K/V: it is written
        before attention, in prefill and in decode alike. Hq is a multiple of Hkv (GQA).
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from local_backend.kernel_names import IMPLEMENTATIONS, MODES  # noqa: F401  (their one home)


class Ops(Protocol):
    name: str
    implementation: str  # what actually ran: triton, triton-interpreter, cpu-exact or torch

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...
    def linears(self, x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]: ...
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...
    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor: ...
    def log_softmax(self, x: torch.Tensor) -> torch.Tensor: ...
    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor: ...


def resolve_implementation(mode: str, device_type: str, implementation: str = "auto") -> str:
    """The implementation that ``get_ops`` will use; ValueError names the choices."""
    if mode not in MODES:
        raise ValueError(f"unknown kernels {mode!r}; use one of: {', '.join(MODES)}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel implementation {implementation!r}; use one of: "
                         f"{', '.join(IMPLEMENTATIONS)}")
    if mode == "default":
        return "torch"
    if implementation == "auto":
        return "triton" if device_type == "cuda" else "cpu-exact"
    if implementation == "cpu-exact" and device_type != "cpu":
        raise ValueError(f"the cpu-exact kernels run on the CPU only, not on {device_type}; "
                         "use --kernel-impl triton (or auto) there")
    return implementation


def get_ops(mode: str, device_type: str = "cpu", implementation: str = "auto") -> Ops:
    """The ops of one kernel mode on one kind of device (see IMPLEMENTATIONS)."""
    chosen = resolve_implementation(mode, device_type, implementation)
    if chosen == "torch":
        from local_backend.kernels.torch_ops import TorchOps
        return TorchOps()
    if chosen == "cpu-exact":
        from local_backend.kernels.exact_cpu import ExactCpuOps
        return ExactCpuOps()
    if device_type == "cpu":
        # Triton kernels run on a CPU only under the interpreter, chosen at import time.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from local_backend.kernels.batch_invariant import BatchInvariantOps
    return BatchInvariantOps()
