"""The ``batch-invariant`` kernels: Triton kernels whose reduction order is
fixed per row, so a row's result is the same bits at any batch size and at any
position in the batch (Thinking Machines, "Defeating Nondeterminism in LLM
Inference", 2025). On a machine without CUDA they run under Triton's
interpreter: slow, but the same kernels and the same guarantees (under the
interpreter a dot avoids numpy's BLAS: see ``_triton.interpreted_dot``). The
engine's default CPU path is ``exact_cpu`` instead.
"""

from __future__ import annotations

from local_backend.kernels import activation, attention, matmul, rmsnorm, softmax
from local_backend.kernels._triton import INTERPRET


class BatchInvariantOps:
    name = "batch-invariant"
    implementation = "triton-interpreter" if INTERPRET else "triton"

    def linear(self, x, weight, bias=None):
        return matmul.linear(x, weight, bias)

    def linears(self, x, layers):
        return [self.linear(x, weight, bias) for weight, bias in layers]

    def warm_up(self, layers):
        """Compile every matmul kernel the tile table can pick for these (weight, bias)
        pairs (a no-op on a CPU); the number of launches (matmul.warm_up)."""
        return matmul.warm_up(layers)

    def rms_norm(self, x, weight, eps):
        return rmsnorm.rms_norm(x, weight, eps)

    def silu_mul(self, gate, up):
        return activation.silu_mul(gate, up)

    def log_softmax(self, x):
        return softmax.log_softmax(x)

    def attention(self, q, k_cache, v_cache, slots, positions, scale):
        return attention.attention(q, k_cache, v_cache, slots, positions, scale)
