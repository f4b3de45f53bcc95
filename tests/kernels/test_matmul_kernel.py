"""linear: correct, and a row's output is the same bits at any batch size and position."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import DEVICE, DTYPES, EXTRA_ROWS, assert_close_to, batches_with_needle, randn


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 96, 80), (70, 130, 200)])
def test_linear_matches_float64_reference(bi, gen, dtype, M, N, K):
    x, w, b = randn(M, K, gen=gen, dtype=dtype), randn(N, K, gen=gen, dtype=dtype), randn(N, gen=gen, dtype=dtype)
    out = bi.linear(x, w, b)
    assert out.dtype == dtype
    assert_close_to(out, x.double() @ w.double().T + b.double(), dtype)
    assert_close_to(bi.linear(x, w), x.double() @ w.double().T, dtype)


def test_fp32_is_ieee_not_tf32(bi, gen):
    """TF32 keeps 10 mantissa bits (error ~1e-3); IEEE fp32 must be far closer."""
    x, w = randn(16, 256, gen=gen), randn(64, 256, gen=gen)
    err = (bi.linear(x, w).double() - x.double() @ w.double().T).abs().max().item()
    assert err < 1e-4


def test_linear_accepts_strided_and_batched_inputs(bi, gen):
    x = randn(40, 24, gen=gen).T  # [24, 40], not contiguous
    w = randn(50, 40, gen=gen)
    assert torch.allclose(bi.linear(x, w), F.linear(x, w), atol=1e-5)
    x3 = randn(2, 3, 40, gen=gen)
    assert bi.linear(x3, w).shape == (2, 3, 50)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_is_batch_invariant(bi, gen, dtype):
    N, K = 150, 200
    w, b = randn(N, K, gen=gen, dtype=dtype), randn(N, gen=gen, dtype=dtype)
    needle = randn(K, gen=gen, dtype=dtype)
    others = randn(max(EXTRA_ROWS), K, gen=gen, dtype=dtype)
    alone = bi.linear(needle[None], w, b)[0]
    for batch, at in batches_with_needle(needle, others, gen):
        assert torch.equal(bi.linear(batch, w, b)[at], alone), f"row differs in a batch of {len(batch)}"


def test_negative_control_default_linear_is_not_batch_invariant(default_ops, gen):
    """CPU torch takes another BLAS path for one row than for many; the check must see it."""
    x, w = randn(64, 128, gen=gen, device="cpu"), randn(256, 128, gen=gen, device="cpu")
    assert not torch.equal(default_ops.linear(x[:1], w)[0], default_ops.linear(x, w)[0])


def test_linear_rejects_bad_input_clearly(bi, gen):
    w = randn(8, 16, gen=gen)
    with pytest.raises(ValueError, match="weight's K=16"):
        bi.linear(randn(2, 15, gen=gen), w)
    with pytest.raises(ValueError, match="cast one to match"):
        bi.linear(randn(2, 16, gen=gen, dtype=torch.bfloat16), w)


def _chunk_launches():
    """Launch shapes of one chunked sum: plain loop, nested loop, partials + summing kernel."""
    from local_backend.kernels._triton import INTERPRET
    from local_backend.kernels.matmul import Tiles
    if INTERPRET:  # big tiles: each interpreted program costs milliseconds
        return [Tiles(128, 128, 32, 4, 1, GROUP_M=1), Tiles(128, 128, 32, 4, 1, GROUP_M=1, nested=True),
                Tiles(128, 128, 32, 4, 1, GROUP_M=1, partials=True), Tiles(16, 32, 32, 4, 1, partials=True),
                Tiles(128, 128, 32, 4, 1, GROUP_M=1, halves=True), Tiles(16, 32, 32, 4, 1, halves=True)]
    return [Tiles(64, 64, 64, 4, 3), Tiles(64, 64, 64, 4, 3, nested=True), Tiles(16, 32, 64, 4, 3, partials=True),
            Tiles(16, 64, 64, 4, 3, partials=True), Tiles(64, 64, 64, 4, 3, partials=True),
            Tiles(64, 64, 64, 4, 3, halves=True), Tiles(16, 32, 64, 4, 3, halves=True),
            Tiles(64, 64, 64, 4, 3, tma=True, halves=True)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_linear_is_one_sum_in_every_launch_shape(gen, dtype):
    """K cut into chunks (fixed per weight): every launch shape adds the chunk sums in the
    same order, so a row alone (partials launch) and the same row in a batch (fused
    launch) give the same bits, and the result is still the product."""
    from local_backend.kernels import matmul
    N, K, chunk = 150, 200, 64  # 4 chunks: 64, 64, 64, 8
    if DEVICE == "cuda":
        K, chunk = 496, 128  # 4 chunks: 128, 128, 128, 112
    w, b = randn(N, K, gen=gen, dtype=dtype), randn(N, gen=gen, dtype=dtype)
    needle = randn(K, gen=gen, dtype=dtype)
    others = randn(max(EXTRA_ROWS), K, gen=gen, dtype=dtype)
    launches = _chunk_launches()
    alone = [matmul.linear(needle[None], w, b, tiles=t, chunk_k=chunk)[0] for t in launches]
    assert all(torch.equal(a, alone[0]) for a in alone[1:]), "launch shapes disagree on one row"
    halves = [t for t in launches if t.halves]
    assert halves and all(matmul._launch_for(dtype, w.device, 1, N, K, (K, 1), w.stride(), True, t, chunk, None).halves
                          for t in halves), "the halves launch was not taken"
    for batch, at in batches_with_needle(needle, others, gen):
        for t in [t for t in launches if not t.partials]:
            out = matmul.linear(batch, w, b, tiles=t, chunk_k=chunk)
            assert torch.equal(out[at], alone[0]), f"row differs in a batch of {len(batch)} ({t})"
    assert_close_to(matmul.linear(others, w, b, tiles=launches[2], chunk_k=chunk),
                    others.double() @ w.double().T + b.double(), dtype)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's run of the bulk-copy kernel (a GPU runs "
                                             "test_matmul_halves.py)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,N,K,BM,BN", [(77, 200, 1472, 64, 64), (130, 256, 1088, 64, 128), (40, 96, 704, 64, 64)])
def test_bulk_copy_halves_add_as_the_nested_loop(gen, dtype, M, N, K, BM, BN):
    """The TMA kernel's halves, launched under the interpreter in the engine's dtype and in
    fp32: 4, 3 and 2 chunks, ragged rows and columns, with and without a bias: the nested and
    fused loops' bits, in bf16 the pointer kernel's bits (one order of addition in both), and every
    flag taken down again. (The interpreter runs one program at a time, so races between
    programs show on a GPU only: test_matmul_halves.py.)"""
    from triton.tools.tensor_descriptor import TensorDescriptor
    from local_backend.kernels import matmul
    from local_backend.kernels._triton import tl, triton
    chunk = 384
    chunks = triton.cdiv(K, chunk)
    x = randn(M, K, gen=gen, dtype=dtype)
    w, b = randn(N, K, gen=gen, scale=K ** -0.5, dtype=dtype), randn(N, gen=gen, dtype=dtype)
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)

    def launch(halves: bool, bias, nested: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.zeros(M, N, dtype=dtype)
        part = torch.full((2 * triton.cdiv(M, BM) * BM, N), float("nan"))
        flags = torch.zeros(tiles, dtype=torch.int32)
        matmul._linear_tma_kernel[(tiles, 2 if halves else 1)](
            TensorDescriptor(x, x.shape, x.stride(), [BM, 64]), TensorDescriptor(w, w.shape, w.stride(), [BN, 64]),
            TensorDescriptor(out, out.shape, out.stride(), [BM, BN]), b if bias else out, part,
            TensorDescriptor(part, part.shape, part.stride(), [BM, BN // 2]), flags, M, N, K, chunk,
            (chunks // 2) * chunk, HAS_BIAS=bias, OUT_DTYPE=getattr(tl, str(dtype).removeprefix("torch.")), CHUNKED=True,
            PARTIALS=False, NESTED=nested and not halves, HALVES=halves, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=64, GROUP_M=8)
        return out, flags

    for bias in (True, False):
        nested, _ = launch(False, bias)
        halves, flags = launch(True, bias)
        assert torch.equal(halves, nested), f"halves differ from the nested loop (bias {bias})"
        assert not flags.any(), "a flag was left up"
        assert torch.equal(launch(False, bias, nested=False)[0], nested), "the fused loop differs"
        if dtype == torch.bfloat16:  # fp32 weights reach the interpreter's dot as a transposed view,
            # whose products numpy sums over K in another order than the pointer kernel's
            pointer = matmul.linear(x, w, b if bias else None, tiles=matmul.Tiles(BM, BN, 64, 4, 3, nested=True),
                                    chunk_k=chunk)
            assert torch.equal(nested, pointer), f"the bulk-copy kernel adds in another order (bias {bias})"
    assert_close_to(halves, x.double() @ w.double().T, dtype)
