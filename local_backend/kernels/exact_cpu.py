"""Batch-invariant ops for the CPU in plain torch: no result depends on a reduction order.

Why this exists: under Triton's interpreter a kernel is both slow (milliseconds per
program) and only as invariant as numpy's BLAS, whose sgemm micro-kernels give a row
other bits at another place in a block (OpenBLAS's Haswell and Zen kernels do). On a
CPU the engine runs these ops instead; the Triton kernels stay the GPU path.

Why they are batch-invariant on any CPU, with any BLAS:
  * Products (matmul, attention) are exact. Each row of the left operand and each
    column of the right one is cut into chunks of CHUNK = 32 along the reduced axis;
    a chunk's values are rounded to 24-bit integers on a grid set by the chunk's
    largest magnitude (block floating point: fp32's precision, relative to the
    chunk). A product of two such integers has at most 48 bits, and a sum of 32 of
    them at most 53, so float64 holds every partial sum exactly: the BLAS may add in
    any order, split K, vectorise or thread, and the result is the same integer.
    Chunk results are then added in chunk order, and rounded once to the output dtype.
    A row's grids depend on that row's values alone, never on its neighbours.
  * Everything else is elementwise IEEE-754 operations that are correctly rounded
    (+, -, *, /, sqrt, min/max, floor, round, casts, bit reinterpretation), which
    give the same bits on every element whether SIMD or scalar code ran them, and
    sums written out as fixed halving trees over a fixed length (RMSNorm,
    log-softmax). Nothing calls torch.sum, and no multiply-add can be fused for
    some elements only, since multiplies and adds are separate torch calls.
  * exp and log are polynomials in those operations, evaluated in float64 and
    rounded once (within 1 ulp of float32's true value), not libm or SLEEF calls,
    whose vector and scalar tails may round differently.
  * Padding adds exact zeros, and attention zeroes every key a token cannot see
    before its values are cut into chunks, so the batch's longest sequence never
    reaches a token's bits.
The result is a function of each row's own inputs alone: the same bits at any batch
size and batch position, with any BLAS build and thread count, on any CPU.
"""

from __future__ import annotations

import math

import torch

from local_backend.kernels.contracts import (check_attention, check_attention_indices, check_linear,
                                             check_log_softmax, check_rms_norm, check_silu_mul)
from local_backend.kernels.pass_memo import memo

CHUNK = 32              # 32 products of two 24-bit integers sum exactly in float64 (2^53)
GRID_BITS = 24          # bits kept per value, relative to its chunk's largest magnitude
MATMUL_ELEMENTS = 1 << 23  # float64 partial products held at once (bounds memory; speed only)

_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that n * _LN2_HI is exact for |n| < 2^11
_LN2_LO = 1.90821492927058770002e-10
_LOG2_E = 1.4426950408889634
_EXP_TERMS = tuple(1.0 / math.factorial(i) for i in range(13))  # Taylor terms of e^r, |r| <= ln2 / 2


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """2.0 ** n for integer-valued float64 n in [-1022, 1023], built from the exponent bits (exact)."""
    return ((n.to(torch.int64) + 1023) << 52).view(torch.float64)


def exp(x: torch.Tensor) -> torch.Tensor:
    """e^x in x's dtype (float32 or wider), from correctly rounded operations only."""
    d = x.to(torch.float64)
    d = torch.clamp(d, -745.0, 709.0)  # outside: 0 or inf once rounded to float32
    n = torch.floor(d * _LOG2_E + 0.5)
    r = (d - n * _LN2_HI) - n * _LN2_LO
    p = torch.full_like(r, _EXP_TERMS[-1])
    for c in reversed(_EXP_TERMS[:-1]):  # Horner: p * r + c, the multiply and the add apart
        p = p * r
        p = p + c
    # 2^n in two factors, so that neither leaves the float64 exponent range.
    half = torch.floor(n * 0.5)
    out = (p * _pow2(half)) * _pow2(n - half)
    out = torch.where(torch.isnan(d), d, out)
    return out.to(x.dtype)


def log(x: torch.Tensor) -> torch.Tensor:
    """ln x for positive x, in x's dtype, from correctly rounded operations only.

    x = m * 2^e with m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(s), s = (m - 1) / (m + 1)."""
    d = x.to(torch.float64)
    bits = d.view(torch.int64)
    e = ((bits >> 52) & 0x7FF) - 1023
    m = ((bits & 0xFFFFFFFFFFFFF) | (1023 << 52)).view(torch.float64)  # mantissa in [1, 2)
    big = m > math.sqrt(2.0)
    m = torch.where(big, m * 0.5, m)
    e = (e + big.to(torch.int64)).to(torch.float64)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    series = torch.full_like(s, 1.0 / 21.0)
    for k in range(19, 0, -2):  # 1 + s^2/3 + s^4/5 + ... + s^20/21
        series = series * s2
        series = series + 1.0 / k
    out = (s * series) * 2.0
    out = out + e * _LN2_LO
    out = out + e * _LN2_HI
    out = torch.where(d == 0, torch.full_like(d, -math.inf), out)
    out = torch.where((d < 0) | torch.isnan(d), torch.full_like(d, math.nan), out)
    out = torch.where(torch.isinf(d) & (d > 0), d, out)
    return out.to(x.dtype)


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis by halving: pairs (i, i + half) at every level, the length
    padded with zeros to a power of two. The pairing depends on the length alone."""
    n = x.shape[-1]
    width = 1 << max(0, (n - 1).bit_length())
    if width != n:
        x = torch.nn.functional.pad(x, (0, width - n))
    while width > 1:
        width //= 2
        x = x[..., :width] + x[..., width:]
    return x[..., 0]


def block_integers(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t[..., K] as integers (float64) [..., C, CHUNK] and their grid step [..., C]:
    t ~= ints * step, each chunk of CHUNK values on a grid of 2^-GRID_BITS of its
    largest magnitude (K padded with zeros to whole chunks)."""
    K = t.shape[-1]
    C = max(1, -(-K // CHUNK))
    d = t.to(torch.float64)
    if C * CHUNK != K:
        d = torch.nn.functional.pad(d, (0, C * CHUNK - K))
    d = d.reshape(*t.shape[:-1], C, CHUNK)
    _, exponent = torch.frexp(torch.amax(d.abs(), dim=-1))  # |values| < 2^exponent
    exponent = exponent.to(torch.float64)
    return torch.round(d * _pow2(GRID_BITS - exponent)[..., None]), _pow2(exponent - GRID_BITS)


def left_blocks(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a[..., M, K] cut for the left of a product: integers [..., C, M, CHUNK], steps [..., C, M]."""
    ints, steps = block_integers(a)
    return ints.movedim(-2, -3).contiguous(), steps.movedim(-1, -2)


def right_blocks(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """b[..., N, K] cut for the right of a @ b^T: integers [..., C, CHUNK, N], steps [..., C, N]."""
    ints, steps = block_integers(b)
    return ints.movedim(-2, -3).transpose(-1, -2).contiguous(), steps.movedim(-1, -2)


def _chunk_products(left: tuple[torch.Tensor, torch.Tensor], ib: torch.Tensor, sb: torch.Tensor | None
                    ) -> torch.Tensor:
    """sum over chunks c, in order, of (ia[c] @ ib[c]) * sa[c] (* sb[c]).

    ia [..., C, M, CHUNK] and ib [..., C, CHUNK, N] hold integers of at most 24 bits,
    so each chunk's matmul is exact whatever the BLAS does; sa [..., C, M] and
    sb [..., C, N] are powers of two, so scaling is exact too."""
    ia, sa = left
    sums = torch.matmul(ia, ib)                               # [..., C, M, N]
    scale = sa[..., :, None] if sb is None else sa[..., :, None] * sb[..., None, :]
    scaled = sums * scale
    out = scaled.select(-3, 0)
    for c in range(1, scaled.shape[-3]):
        out = out + scaled.select(-3, c)
    return out


def exact_matmul(a: torch.Tensor | tuple[torch.Tensor, torch.Tensor], b: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
                 ) -> torch.Tensor:
    """a[..., M, K] @ b[..., N, K]^T in float64 (see the module docstring), broadcasting
    over the leading dims. Either side may come already cut (left_blocks / right_blocks)."""
    left = a if isinstance(a, tuple) else left_blocks(a)
    ib, sb = b if isinstance(b, tuple) else right_blocks(b)
    return _chunk_products(left, ib, sb)


def exact_matmul_integers(a: torch.Tensor, b_ints: torch.Tensor) -> torch.Tensor:
    """a[..., M, K] @ b_ints[..., K, N] in float64, where b_ints holds integers of at
    most GRID_BITS bits (the caller has moved b's grid steps into a)."""
    left = left_blocks(a)
    K, C = b_ints.shape[-2], left[0].shape[-3]
    if C * CHUNK != K:
        b_ints = torch.nn.functional.pad(b_ints, (0, 0, 0, C * CHUNK - K))
    ib = b_ints.reshape(*b_ints.shape[:-2], C, CHUNK, b_ints.shape[-1])
    return _chunk_products(left, ib, None)


class ExactCpuOps:
    """The ``batch-invariant`` ops on a CPU (see the module docstring)."""

    name = "batch-invariant"
    implementation = "cpu-exact"
    # Many small ops: OpenMP's barriers cost more than a second thread gives, and far more
    # when other processes hold the cores (5x slower at batch 32 on a loaded 2-core
    # machine). The engine runs each forward pass with this many torch threads.
    cpu_threads = 1

    def __init__(self) -> None:
        self._weights: dict[tuple[int, int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}

    def _weight_blocks(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """right_blocks of a weight, made once (the model's weights never change)."""
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        blocks = self._weights.get(key)
        if blocks is None:
            blocks = self._weights[key] = right_blocks(weight)
        return blocks

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x[..., K] @ weight[N, K]^T + bias, exact per chunk, rounded once to x's dtype."""
        return self.linears(x, [(weight, bias)])[0]

    def linears(self, x: torch.Tensor, layers) -> list[torch.Tensor]:
        """Several projections of one input (q/k/v, gate/up): x is cut into blocks once."""
        for weight, bias in layers:
            check_linear(x, weight, bias)
        K = x.shape[-1]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, K)
        widest = max(weight.shape[0] for weight, _ in layers)
        rows = max(1, MATMUL_ELEMENTS // max(1, widest * max(1, -(-K // CHUNK))))
        pieces = [x2] if x2.shape[0] <= rows else list(x2.split(rows))  # rows are independent
        lefts = [left_blocks(piece) for piece in pieces]
        outs = []
        for weight, bias in layers:
            blocks = self._weight_blocks(weight)
            out = torch.cat([exact_matmul(left, blocks) for left in lefts]) if len(lefts) > 1 \
                else exact_matmul(lefts[0], blocks)
            if bias is not None:
                out = out + bias.to(torch.float64)
            outs.append(out.to(x.dtype).reshape(*lead, weight.shape[0]))
        return outs

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Hugging Face's order: normalise in fp32, cast to x's dtype, multiply by the weight."""
        check_rms_norm(x, weight)
        D = x.shape[-1]
        xf = x.float()
        mean_sq = tree_sum(xf * xf) / D
        rstd = 1.0 / torch.sqrt(mean_sq + eps)
        normed = (xf * rstd[..., None]).to(x.dtype).float()
        return (normed * weight.float()).to(x.dtype)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        check_silu_mul(gate, up)
        g = gate.float()
        silu = (g / (exp(-g) + 1.0)).to(gate.dtype).float()
        return (silu * up.float()).to(gate.dtype)

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        check_log_softmax(x)
        xf = x.float()
        shifted = xf - torch.amax(xf, dim=-1, keepdim=True)  # a max is exact in any order
        return shifted - log(tree_sum(exp(shifted)))[..., None]

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention of each packed token over its own sequence's cache prefix,
        one sequence at a time (its keys are cut into integer blocks once).

        Scores are exact_matmul products; the max over a token's keys is exact in any
        order; the weighted values are exact too: each key's values are cut into
        integers on the key's own grid, whose steps move into the probabilities, and
        keys a token cannot see weigh exactly zero. So what sits in the cache past a
        token, and which other tokens share its pass, never reaches its bits."""
        check_attention(q, k_cache, v_cache, slots, positions)
        T, Hq, D = q.shape
        G = Hq // k_cache.shape[2]
        out = torch.empty(T, Hq, D, dtype=q.dtype)
        if T == 0:
            return out
        check_attention_indices(slots, positions, k_cache.shape[0], k_cache.shape[1])
        for slot, rows, pos, length in memo.get("exact-cpu", (slots, positions),
                                                lambda: _sequences(slots, positions)):
            out[rows] = _sequence_attention(q[rows], k_cache[slot, :length], v_cache[slot, :length],
                                            pos, scale, G).to(q.dtype)
        return out


def _sequences(slots: torch.Tensor, positions: torch.Tensor) -> list[tuple[int, slice | torch.Tensor, torch.Tensor, int]]:
    """(slot, its token rows, their positions, keys to read) for every sequence in a pass."""
    rows_of: dict[int, list[int]] = {}
    for row, slot in enumerate(slots.tolist()):
        rows_of.setdefault(slot, []).append(row)
    plan = []
    for slot, rows in rows_of.items():
        index = slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] + 1 == len(rows) else torch.tensor(rows)
        pos = positions[index]
        plan.append((slot, index, pos, int(pos.max()) + 1))
    return plan


def _sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                        scale: float, G: int) -> torch.Tensor:
    """q [P, Hq, D] of one sequence over its keys k, v [L, Hkv, D]; P rows, float64 out."""
    P, Hq, D = q.shape
    L, Hkv = k.shape[0], k.shape[1]
    rows = q.reshape(P, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * P, D)  # rows (g, p)
    scores = (exact_matmul(rows, k.permute(1, 0, 2)) * scale).float()          # [Hkv, G*P, L]
    visible = (torch.arange(L)[None, :] <= pos[:, None]).repeat(G, 1)           # [G*P, L]
    scores = torch.where(visible, scores, -math.inf)
    p = exp(scores - torch.amax(scores, dim=-1, keepdim=True))
    v_ints, v_steps = block_integers(v.permute(1, 0, 2))                        # [Hkv, L, Cd, CHUNK], [Hkv, L, Cd]
    p64 = p.to(torch.float64)
    chunks = [exact_matmul_integers(p64 * v_steps[:, None, :, c], v_ints[:, :, c, :])
              for c in range(v_ints.shape[-2])]                                 # [Hkv, G*P, CHUNK] each
    p_ints, p_steps = block_integers(p64)
    partial = p_ints.sum(-1) * p_steps      # integer sums of at most 29 bits: exact in any order
    total = partial[..., 0]
    for c in range(1, partial.shape[-1]):
        total = total + partial[..., c]
    out = torch.cat(chunks, dim=-1)[..., :D] / total[..., None]
    return out.reshape(Hkv, G, P, D).permute(2, 0, 1, 3).reshape(P, Hq, D)
