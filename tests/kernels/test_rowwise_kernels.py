"""rms_norm, silu_mul and log_softmax: correct, and a row's output is the same
bits whatever batch it sits in."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import DEVICE, DTYPES, EXTRA_ROWS, assert_close_to, batches_with_needle, randn

EPS = 1e-6


def rms_norm_reference(x, w):
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [96, 10_000])  # 10,000 > one chunk of the kernel
def test_rms_norm_matches_reference(bi, gen, dtype, D):
    x, w = randn(3, D, gen=gen, dtype=dtype, scale=3.0), randn(D, gen=gen, dtype=dtype)
    out = bi.rms_norm(x, w, EPS)
    assert out.dtype == dtype
    assert_close_to(out, rms_norm_reference(x, w), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_rounds_like_hugging_face_llama(bi, gen, dtype):
    """LlamaRMSNorm rounds the normalised value to the input dtype before the
    weight multiplies it; rounding once at the end gives other bits."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    D = 96
    norm = LlamaRMSNorm(D, eps=EPS)
    norm.weight.data = randn(D, gen=gen)
    norm = norm.to(dtype=dtype, device=DEVICE)
    x = randn(64, D, gen=gen, dtype=dtype, scale=3.0)
    with torch.no_grad():
        expected = norm(x)
    same = (bi.rms_norm(x, norm.weight, EPS) == expected).float().mean().item()
    # Sums of squares may differ in the last bit of fp32 (another order), rarely visible in 16 bits.
    assert same >= 0.99, f"only {same:.1%} of elements equal Hugging Face's"


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(bi, gen, dtype):
    gate, up = randn(5, 300, gen=gen, dtype=dtype, scale=3.0), randn(5, 300, gen=gen, dtype=dtype)
    out = bi.silu_mul(gate, up)
    assert out.dtype == dtype
    assert_close_to(out, F.silu(gate.double()) * up.double(), dtype)
    if dtype == torch.bfloat16:  # same two roundings as torch: silu in bf16, then the product
        assert (out == F.silu(gate) * up).float().mean().item() >= 0.99


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1000, 20_000])  # 20,000 spans several chunks of the kernel
def test_log_softmax_matches_reference(bi, gen, dtype, V):
    x = randn(3, V, gen=gen, dtype=dtype, scale=4.0)
    out = bi.log_softmax(x)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(x.double(), dim=-1)
    assert (out.double() - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())


def _run(bi, op: str, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if op == "rms_norm":
        return bi.rms_norm(rows, weight, EPS)
    if op == "silu_mul":
        return bi.silu_mul(rows, rows.flip(-1) * 0.5)
    return bi.log_softmax(rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["rms_norm", "silu_mul", "log_softmax"])
def test_row_is_batch_invariant(bi, gen, op, dtype):
    D = 1000
    weight = randn(D, gen=gen, dtype=dtype)
    needle = randn(D, gen=gen, dtype=dtype, scale=3.0)
    others = randn(max(EXTRA_ROWS), D, gen=gen, dtype=dtype, scale=3.0)
    alone = _run(bi, op, needle[None], weight)[0]
    for batch, at in batches_with_needle(needle, others, gen):
        assert torch.equal(_run(bi, op, batch, weight)[at], alone), f"{op}: row differs in a batch of {len(batch)}"


def test_rowwise_ops_reject_bad_input_clearly(bi, gen):
    with pytest.raises(ValueError, match="weight must have shape"):
        bi.rms_norm(randn(2, 8, gen=gen), randn(7, gen=gen), EPS)
    with pytest.raises(ValueError, match="gate and up must match"):
        bi.silu_mul(randn(2, 8, gen=gen), randn(2, 9, gen=gen))
    with pytest.raises(ValueError, match="floating"):
        bi.log_softmax(torch.ones(2, 8, dtype=torch.int64, device=DEVICE))
