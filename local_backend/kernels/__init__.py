"""One switch for every reduction the model does: ``get_ops("batch-invariant")``
or ``get_ops("default")``.

The model calls only these ops for anything that reduces (matmul, RMSNorm,
log-softmax, attention) or that runs a transcendental function elementwise
(SiLU), so that the switch covers the whole forward pass. An ``Ops`` object is
passed to the model explicitly: no global override, nothing to leave installed
when an exception escapes.

Shapes:
    linear(x[M, K], weight[N, K], bias[N] | None) -> [M, N]           (nn.Linear layout)
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

from typing import Protocol

import torch

MODES = ("batch-invariant", "default")


class Ops(Protocol):
    name: str

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...
    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor: ...
    def log_softmax(self, x: torch.Tensor) -> torch.Tensor: ...
    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor: ...


def get_ops(mode: str) -> Ops:
    if mode == "default":
        from local_backend.kernels.torch_ops import TorchOps
        return TorchOps()
    if mode == "batch-invariant":
        from local_backend.kernels.batch_invariant import BatchInvariantOps
        return BatchInvariantOps()
    raise ValueError(f"unknown kernels {mode!r}; use one of: {', '.join(MODES)}")
