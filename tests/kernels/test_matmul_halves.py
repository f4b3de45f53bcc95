"""The halves launch on a Hopper GPU, through the bulk-copy (TMA) kernel the table uses: two
programs per tile, the second waiting for the first's running total. The same bits as the
fused chunk loop at ragged row and column edges, with and without a bias, with K in 2, 3 or
4 chunks (a second half of one chunk or two), launch after launch (each takes its flags
down for the next) and replayed from a CUDA graph. (The CPU suite checks the pointer
kernel's halves under the interpreter: test_matmul_kernel.py.)"""

from __future__ import annotations

import pytest
import torch

from kernel_checks import gpu_linear_operands as operands
from local_backend.kernels import matmul

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="the bulk-copy kernel runs on Hopper or newer")

HALVES = [matmul.Tiles(128, 256, 64, 8, 3, tma=True, halves=True),
          matmul.Tiles(64, 64, 64, 4, 3, tma=True, halves=True)]
FUSED = matmul.Tiles(64, 64, 64, 4, 3, tma=True, nested=True)


@pytest.mark.parametrize("tiles", HALVES, ids=["128x256", "64x64"])
@pytest.mark.parametrize("chunks", [2, 3, 4])
@pytest.mark.parametrize("M,N", [(1, 512), (77, 1000), (400, 4096)])
def test_halves_are_the_fused_loops_bits(tiles, chunks, M, N):
    chunk = 384
    K = chunks * chunk - 64  # a short last chunk
    x, w, b = operands(M, N, K)
    launch = matmul._launch_for(x.dtype, x.device, M, N, K, x.stride(), w.stride(), True, tiles, chunk, None)
    if 2 * launch.grid[0] > torch.cuda.get_device_properties(0).multi_processor_count:
        pytest.skip("more tiles than this GPU can hold two programs each at once")
    assert launch.halves and launch.tma, "the halves launch through the bulk-copy kernel was not taken"
    for bias in (None, b):
        fused = matmul.linear(x, w, bias, tiles=FUSED, chunk_k=chunk)
        first = matmul.linear(x, w, bias, tiles=tiles, chunk_k=chunk)
        again = matmul.linear(x, w, bias, tiles=tiles, chunk_k=chunk)
        assert torch.equal(first, fused), f"halves differ from the fused loop (bias {bias is not None})"
        assert torch.equal(again, fused), "a second launch differs: the flags were not left down"
    expected = x.double() @ w.double().T
    assert (matmul.linear(x, w, tiles=tiles, chunk_k=chunk).double() - expected).abs().max() < 0.05


def test_halves_replay_from_a_cuda_graph():
    """Flags raised and taken down inside every replay: replays keep giving the fused bits."""
    tiles = HALVES[0]
    M, N, chunk = 400, 4096, 3584
    K = 4 * chunk
    x, w, b = operands(M, N, K, seed=1)
    fused = matmul.linear(x, w, b, tiles=FUSED, chunk_k=chunk)
    matmul.linear(x, w, b, tiles=tiles, chunk_k=chunk)  # compiled before capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = matmul.linear(x, w, b, tiles=tiles, chunk_k=chunk)
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, fused)
