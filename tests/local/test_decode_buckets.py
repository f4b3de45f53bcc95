"""Decode steps padded to batch-size buckets (and replayed from CUDA graphs on a GPU):
the bucket a request lands in never changes its bits, and padding rows never touch a
request's cache slot."""

from __future__ import annotations

import random

import pytest
import torch

from local_backend.decode_graphs import bucket_sizes
from local_backend.engine import Engine, Request

TARGET = [5, 9, 33, 2, 100, 7, 8, 40, 41]
STEPS = 5
SLOTS = 12  # buckets 1, 2, 4, 8, 12


def target() -> Request:
    return Request(prompt_ids=TARGET, max_tokens=STEPS, top_logprobs=5, ignore_eos=True)


def fillers(n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [Request(prompt_ids=[rng.randrange(3, 128) for _ in range(rng.randint(1, 20))],
                    max_tokens=rng.randint(1, STEPS + 2), ignore_eos=True) for _ in range(n)]


def bits(result) -> list:
    return [(t.token_id, t.logprob.hex(), [(i, lp.hex()) for i, _, lp in t.top]) for t in result.tokens]


def target_in_batches(engine: Engine) -> dict[str, tuple[list, list[int]]]:
    """The target's bits with 0, 2, 5 and 10 other requests, and the buckets its decode steps ran at."""
    seen: list[int] = []
    choose = engine.decode.bucket
    engine.decode.bucket = lambda n: seen.append(choose(n)) or seen[-1]
    try:
        out = {}
        for others in (0, 2, 5, 10):
            seen.clear()
            batch = fillers(others, seed=others)
            batch.insert(others // 2, target())
            out[f"with {others} others"] = (bits(engine.generate(batch)[others // 2]), sorted(set(seen)))
        return out
    finally:
        engine.decode.bucket = choose


def test_bucket_sizes_cover_every_batch():
    for max_rows in (1, 3, 8, 12, 100, 256, 300):
        sizes = bucket_sizes(max_rows)
        assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == max_rows
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]
    assert bucket_sizes(100)[4:8] == [16, 24, 32, 40]


def test_bad_decode_graphs_mode_is_refused(model_dirs):
    with pytest.raises(ValueError, match="decode_graphs must be one of"):
        Engine.load(model_dirs["qwen3"], device="cpu", decode_graphs="sometimes")


def test_the_bucket_never_changes_the_bits_on_cpu(model_dirs):
    plain = Engine.load(model_dirs["qwen3"], kernels="batch-invariant", kernel_impl="cpu-exact",
                        device="cpu", max_slots=SLOTS, max_len=64, decode_graphs="off")
    assert plain.decode is None
    reference = bits(plain.generate([target()])[0])
    engine = Engine.load(model_dirs["qwen3"], kernels="batch-invariant", kernel_impl="cpu-exact",
                         device="cpu", max_slots=SLOTS, max_len=64, decode_graphs="buckets")
    runs = target_in_batches(engine)
    buckets = {b for _, used in runs.values() for b in used}
    assert {1, 4, 8, 12} <= buckets, f"the batches did not reach every bucket: {sorted(buckets)}"
    assert runs["with 10 others"][1] != runs["with 0 others"][1]
    for name, (got, used) in runs.items():
        assert got == reference, f"target's bits changed {name} (decode buckets {used})"
    # the scratch slot that padding writes into is never handed to a request
    assert engine.cache.free_slots == SLOTS and engine.decode.scratch_slot == SLOTS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_buckets_give_the_eager_bits(model_dirs):
    load = lambda mode: Engine.load(model_dirs["qwen3"], kernels="batch-invariant", device="cuda",  # noqa: E731
                                    max_slots=SLOTS, max_len=64, decode_graphs=mode)
    reference = bits(load("off").generate([target()])[0])
    engine = load("on")
    runs = target_in_batches(engine)
    assert {1, 4, 8, 12} <= set(engine.decode.captured)
    for name, (got, used) in runs.items():
        assert got == reference, f"target's bits changed {name} (CUDA graph buckets {used})"
