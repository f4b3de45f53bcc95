"""linear's host path: cached launch decisions and weight descriptors, the tile table's
policy and the kernel warm-up. The table functions are plain Python, so they are checked
here for the GPU's table even where the interpreter runs (which uses one fixed tile)."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import DEVICE, randn

from local_backend.kernels import matmul, matmul_hopper
from local_backend.kernels.matmul import Tiles, triton

# bench_matmul's (N, K) and the engine's Llama-3.2-1B projections
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (2048, 2048), (512, 2048), (8192, 2048),
          (2048, 8192), (128256, 2048)]


def _chunk(K: int) -> int:
    """The round-4 chunk rule of k_chunk on a GPU (about K / 4096 per chunk)."""
    return triton.cdiv(triton.cdiv(K, 64), max(1, round(K / 4096))) * 64


def _table(M: int, N: int, K: int, table: str) -> Tiles:
    return matmul.round3_tiles_16bit(M, N) if table == "round3" else matmul._gpu_tiles_16bit(M, N, K, _chunk(K))


@pytest.mark.parametrize("table", matmul.TABLES)
def test_warm_up_rows_reach_every_table_entry(table):
    """Every (tiles, row-count class) the table picks for 1..8192 rows is picked for one of
    WARM_ROWS too: the warm-up compiles what any pass can launch."""
    for N, K in SHAPES:
        def entries(rows):
            return {(_table(M, N, K, table), matmul._m_class(M)) for M in rows}
        assert entries(range(1, 8193)) <= entries(matmul.WARM_ROWS), (N, K)


def test_the_gluon_matmuls_entries_fit_its_kernel():
    """Every entry the table sends to matmul_hopper's kernel has its 128-row tiles and fits
    one SM's shared memory; where K is in chunks, the entry's 256 columns send it to the
    Triton kernel instead (the running total would not fit), and that kernel needs 8 warps."""
    for N, K in SHAPES:
        for M in range(1, 8193, 7):
            t = matmul._gpu_tiles_16bit(M, N, K, _chunk(K))
            if not t.ws:
                continue
            assert t.BLOCK_M == 128 and t.tma and not t.partials, (M, N, K, t)
            assert matmul_hopper.shared_bytes(t.BLOCK_N, t.BLOCK_K, t.num_stages) <= matmul_hopper.SM_SHARED_BYTES
            if K > _chunk(K) and t.BLOCK_N > 128:  # the Triton kernel runs it
                assert t.num_warps == 8, (M, N, K, t)


def test_partials_only_with_many_chunks_and_small_m():
    """Two kernels per call only where they pay: 16 < M <= 128 and >= 3 chunks of K."""
    for N, K in SHAPES:
        chunks = triton.cdiv(K, _chunk(K))
        for M in range(1, 4097):
            t = matmul._gpu_tiles_16bit(M, N, K, _chunk(K))
            assert t.partials == (16 < M <= 128 and chunks >= matmul.PARTIALS_MIN_CHUNKS), (M, N, K)
            assert chunks == 1 or _chunk(K) % t.BLOCK_K == 0, (M, N, K, t)  # chunks are whole K steps


def test_engine_down_projection_keeps_one_kernel():
    """K = 8192 is 2 chunks: no partials at any M (the eager passes stay one launch)."""
    assert triton.cdiv(8192, _chunk(8192)) == 2
    assert not any(matmul._gpu_tiles_16bit(M, 2048, 8192, _chunk(8192)).partials for M in range(1, 2049))


def test_launch_decisions_are_cached_per_shape_and_layout(gen):
    """Same key, same decisions (one dict lookup); another row count or x layout is another key;
    and the cached path gives the bits of a fresh one."""
    matmul.clear_caches()
    w = randn(40, 24, gen=gen)
    x = randn(5, 24, gen=gen)
    first = matmul.linear(x, w)
    assert len(matmul._LAUNCHES) == 1
    again = matmul.linear(x, w)
    assert len(matmul._LAUNCHES) == 1 and torch.equal(first, again)
    matmul.linear(randn(6, 24, gen=gen), w)
    assert len(matmul._LAUNCHES) == 2
    wide = randn(5, 48, gen=gen)[:, ::2]  # the same shape, another stride
    out = matmul.linear(wide, w)
    assert len(matmul._LAUNCHES) == 3
    assert torch.equal(out, matmul.linear(wide.contiguous(), w))
    matmul.clear_caches()
    assert torch.equal(matmul.linear(x, w), first)


def test_launch_cache_keeps_overrides_apart(gen):
    """tiles / chunk_k overrides are part of the key: an override never leaks into the default."""
    matmul.clear_caches()
    w, x = randn(40, 24, gen=gen), randn(5, 24, gen=gen)
    plain = matmul.linear(x, w)
    with pytest.raises(ValueError, match="not a multiple of BLOCK_K"):
        matmul.linear(x, w, tiles=Tiles(16, 16, 16, 4, 1), chunk_k=8)
    assert torch.equal(matmul.linear(x, w), plain)
    assert len(matmul._LAUNCHES) == 1  # the failed override was not cached


def test_weight_descriptor_is_made_once_and_holds_its_weight(gen):
    pytest.importorskip("triton.tools.tensor_descriptor")
    matmul.clear_caches()
    w = randn(64, 64, gen=gen, dtype=torch.bfloat16)
    d = matmul._weight_desc(w, (32, 64))
    assert matmul._weight_desc(w, (32, 64)) is d
    assert matmul._weight_desc(w, (64, 64)) is not d
    assert d.base.data_ptr() == w.data_ptr() and tuple(d.shape) == (64, 64)
    top = w[:32]  # the same pointer, another shape: another descriptor
    assert matmul._weight_desc(top, (32, 64)) is not d
    matmul.clear_caches()
    assert not matmul._WEIGHT_DESCS


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU no-op; on a GPU warm_up launches every table entry (bench_e2e runs it)")
def test_warm_up_is_a_no_op_on_the_cpu(gen):
    w = randn(40, 24, gen=gen)
    matmul.clear_caches()
    assert matmul.warm_up([(w, None), (w, randn(40, gen=gen))]) == 0
    assert not matmul._LAUNCHES


def test_the_tables_halves_keep_every_program_resident(monkeypatch):
    """With the table's halves switched on: 4096x14336 (K in 4 chunks) at 385-512 rows takes
    them on a 132-SM GPU, and wherever the table picks halves for a device's SM count, the
    two programs of every tile fit on it at once (a second half spins until its first half
    is done). Off (the default), the table never picks them."""
    monkeypatch.setattr(matmul, "TABLE_HALVES", True)
    chunk = _chunk(14336)
    assert all(matmul._gpu_tiles_16bit(M, 4096, 14336, chunk).halves for M in range(385, 513))
    for sm_count in (114, 132):
        for N, K in SHAPES:
            for M in range(1, 2049):
                t = matmul._gpu_tiles_16bit(M, N, K, _chunk(K), sm_count)
                programs = 2 * triton.cdiv(M, t.BLOCK_M) * triton.cdiv(N, t.BLOCK_N)
                assert not t.halves or programs <= sm_count, (M, N, K, sm_count)
    monkeypatch.setattr(matmul, "TABLE_HALVES", False)
    assert not any(matmul._gpu_tiles_16bit(M, N, K, _chunk(K)).halves for N, K in SHAPES for M in range(1, 2049))
