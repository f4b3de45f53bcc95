"""Chunked prefill (``Engine(prefill_chunk=C)``): a prompt enters C tokens a pass, so
it takes more forward passes; with batch-invariant kernels every chunking gives the
bits of the whole-prompt prefill, alone, batched and with the prefix cache on."""

from __future__ import annotations

import math
import random

import pytest

from local_backend.engine import Engine, Request

PROMPT = [5, 9, 33, 2, 100, 7, 8, 40, 41, 3, 60, 61, 17, 90, 11, 12, 13, 70, 71, 4, 99, 98, 97]
STEPS = 3


def bits(result) -> list:
    return [(t.token_id, t.logprob.hex(), [(i, lp.hex()) for i, _, lp in t.top]) for t in result.tokens]


def filler(length: int, max_tokens: int, seed: int) -> Request:
    rng = random.Random(seed)
    return Request(prompt_ids=[rng.randrange(3, 128) for _ in range(length)], max_tokens=max_tokens,
                   ignore_eos=True)


def ask() -> Request:
    return Request(prompt_ids=PROMPT, max_tokens=STEPS, top_logprobs=5, ignore_eos=True)


def passes(engine: Engine, requests: list[Request]) -> tuple[int, list]:
    """(forward passes until every request finished, the results in order)."""
    ids = [engine.add_request(r) for r in requests]
    done, steps = {}, 0
    while engine.has_unfinished():
        steps += 1
        done.update((r.request_id, r) for r in engine.step())
    return steps, [done[i] for i in ids]


@pytest.fixture(scope="module")
def engine(model_dirs):
    return Engine.load(model_dirs["llama"], kernels="batch-invariant", kernel_impl="cpu-exact",
                       device="cpu", max_slots=4, max_len=128)


def test_a_chunked_prompt_takes_more_passes_and_gives_the_same_bits(engine):
    engine.prefill_chunk = None
    whole_steps, [whole] = passes(engine, [ask()])
    assert whole_steps == STEPS
    for chunk in (1, 4, 7, len(PROMPT) - 1, len(PROMPT), 64):
        engine.prefill_chunk = chunk
        steps, [result] = passes(engine, [ask()])
        assert steps == math.ceil(len(PROMPT) / chunk) - 1 + STEPS, f"chunk {chunk}"
        assert bits(result) == bits(whole), f"prefill in chunks of {chunk} changed the bits"
    engine.prefill_chunk = None


def test_chunked_beside_a_decoding_request_gives_the_same_bits(engine):
    engine.prefill_chunk = None
    [alone] = engine.generate([ask()])
    engine.prefill_chunk = 5
    try:
        _, results = passes(engine, [filler(3, 12, 1), ask(), filler(30, 2, 2)])
    finally:
        engine.prefill_chunk = None
    assert bits(results[1]) == bits(alone)
    assert [len(r.tokens) for r in results] == [12, STEPS, 2]


def test_chunked_with_the_prefix_cache_gives_the_same_bits(model_dirs):
    plain = Engine.load(model_dirs["llama"], kernels="batch-invariant", kernel_impl="cpu-exact",
                        device="cpu", max_slots=2, max_len=128)
    cached = Engine.load(model_dirs["llama"], kernels="batch-invariant", kernel_impl="cpu-exact",
                         device="cpu", max_slots=2, max_len=128, prefix_cache=True, prefill_chunk=6)
    want = bits(plain.generate([ask()])[0])
    assert bits(cached.generate([ask()])[0]) == want  # cold, in chunks of 6
    assert bits(cached.generate([ask()])[0]) == want  # warm: its first block from the cache
    assert cached.prefix.hit_tokens >= 16
    assert cached.describe()["prefill_chunk"] == 6


def test_bad_chunk_sizes_are_refused(model_dirs):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="prefill_chunk"):
            Engine.load(model_dirs["llama"], kernels="batch-invariant", kernel_impl="cpu-exact",
                        device="cpu", max_slots=1, max_len=64, prefill_chunk=bad)
