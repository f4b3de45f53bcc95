"""The warp-specialised Gluon matmul (matmul_hopper.py, Hopper only): the same bits as the
Triton kernel of the table, at ragged row and column edges, with and without a bias, with K
in one chunk or several, for a persistent program that takes many tiles; and a row's result
does not depend on how many rows share the launch (batch invariance)."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import gpu_linear_operands as operands
from local_backend.kernels import matmul

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="the Gluon matmul runs on Hopper (sm_90) only")

TRITON = matmul.Tiles(128, 128, 64, 4, 3, tma=True)
WS = [matmul.Tiles(128, 256, 64, 4, 3, tma=True, ws=True), matmul.Tiles(128, 128, 64, 4, 5, GROUP_M=16, tma=True,
                                                                         ws=True)]


@pytest.mark.parametrize("tiles", WS, ids=["n256", "n128"])
@pytest.mark.parametrize("M,N,K", [(2048, 4096, 4096), (300, 1000, 520), (4100, 14336, 4096), (1, 384, 64)])
def test_the_gluon_matmul_is_the_triton_kernels_bits(tiles, M, N, K):
    x, w, b = operands(M, N, K)
    assert matmul._launch_for(x.dtype, x.device, M, N, K, x.stride(), w.stride(), True, tiles, None, None).ws
    for bias in (None, b):
        ours = matmul.linear(x, w, bias, tiles=tiles)
        expected = matmul.linear(x, w, bias, tiles=TRITON)
        assert torch.equal(ours, expected), f"M={M} N={N} K={K} bias={bias is not None}"
    reference = (x.double() @ w.double().t() + b.double()).float()
    err = (matmul.linear(x, w, b, tiles=tiles).float() - reference).abs().max().item()
    assert err < 2e-2 * max(reference.abs().max().item(), 1.0)


def test_one_program_takes_every_tile_in_turn(monkeypatch):
    """A persistent grid of one program (a GPU of one SM, as far as the launch knows): every
    tile through the same ring, its barriers' phases carried from tile to tile."""
    x, w, b = operands(1000, 1500, 640, seed=1)
    expected = matmul.linear(x, w, b, tiles=TRITON)
    monkeypatch.setattr(matmul.matmul_hopper, "sm_count", lambda device: 1)
    assert torch.equal(matmul.linear(x, w, b, tiles=WS[0]), expected)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    x, w, _ = operands(8192, 4096, 4096, seed=2)
    full = matmul.linear(x, w, tiles=WS[0])
    for rows in (slice(0, 1), slice(1000, 1077), slice(4096, 8192)):
        assert torch.equal(matmul.linear(x[rows], w, tiles=WS[0]), full[rows])


@pytest.mark.parametrize("M", [512, 300])
def test_k_in_chunks_folds_as_the_triton_kernel_does(M):
    """K in several chunks: each chunk's sum joins the total at its end, in the Triton
    kernel's order (its nested loop and its flat one give the same bits); 128-column tiles
    only: with 256 columns the running total would not fit beside the accumulator, and the
    flag gives way to the Triton kernel."""
    N, K = 1024, 14336
    x, w, b = operands(M, N, K, seed=3)
    narrow = matmul.Tiles(128, 128, 64, 4, 5, tma=True, ws=True)
    launch = matmul._launch_for(x.dtype, x.device, M, N, K, x.stride(), w.stride(), True, narrow, None, None)
    assert launch.chunks > 1 and launch.ws
    wide = matmul._launch_for(x.dtype, x.device, M, N, K, x.stride(), w.stride(), True, WS[0], None, None)
    assert wide.tma and not wide.ws
    for nested in (True, False):
        expected = matmul.linear(x, w, b, tiles=matmul.Tiles(128, 128, 64, 4, 3, tma=True, nested=nested))
        assert torch.equal(matmul.linear(x, w, b, tiles=narrow), expected), f"nested={nested}"


# Programs of two CTAs (a 256-row tile, each weight chunk copied once into both: Triton 3.7 on;
# before it the launch runs 1-CTA programs, and these tests check that those give the bits)
PAIR = matmul.Tiles(128, 128, 64, 4, 5, tma=True, ws=True, cluster=2)
PAIR_CLUSTER = 2 if matmul.gluon_api.MULTICAST else 1


@pytest.mark.parametrize("M,N,K", [(512, 4096, 14336), (300, 1000, 520), (2048, 4096, 4096), (1, 384, 64),
                                   (257, 640, 4096)])
def test_two_cta_programs_give_the_triton_kernels_bits(M, N, K):
    """Ragged rows (a CTA whose rows all lie past M), ragged columns, K in one chunk or several."""
    x, w, b = operands(M, N, K, seed=4)
    launch = matmul._launch_for(x.dtype, x.device, M, N, K, x.stride(), w.stride(), True, PAIR, None, None)
    assert launch.ws and launch.cluster == PAIR_CLUSTER
    for bias in (None, b):
        expected = matmul.linear(x, w, bias, tiles=matmul.Tiles(128, 128, 64, 4, 3, tma=True, nested=True))
        ours = matmul.linear(x, w, bias, tiles=PAIR)
        assert torch.equal(ours, expected), f"M={M} N={N} K={K} bias={bias is not None}"
        assert torch.equal(matmul.linear(x, w, bias, tiles=PAIR), ours)


def test_one_two_cta_program_takes_every_tile_in_turn(monkeypatch):
    x, w, b = operands(1000, 1500, 2048, seed=5)
    expected = matmul.linear(x, w, b, tiles=TRITON)
    monkeypatch.setattr(matmul.matmul_hopper, "sm_count", lambda device: 2)
    assert torch.equal(matmul.linear(x, w, b, tiles=PAIR), expected)


def test_in_two_cta_programs_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """A row lands in either CTA of a pair, at any of its 256 places, as the rows before it vary."""
    x, w, _ = operands(2048, 4096, 14336, seed=6)
    full = matmul.linear(x, w, tiles=PAIR)
    for rows in (slice(0, 1), slice(63, 64 + 128), slice(200, 712), slice(1025, 2048)):
        assert torch.equal(matmul.linear(x[rows], w, tiles=PAIR), full[rows])
