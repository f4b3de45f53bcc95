"""The prefix cache: a request whose prompt prefix is cached gives the same bits as
with the cache off (batch-invariant kernels), and a slot that was overwritten is never
read as a hit."""

from __future__ import annotations

import random

from local_backend.engine import Engine, Request
from local_backend.prefix_cache import BLOCK, block_keys

PREFIX = [random.Random(1).randrange(3, 128) for _ in range(2 * BLOCK + 7)]  # 2 full blocks and a bit


def ask(prompt: list[int], steps: int = 4) -> Request:
    return Request(prompt_ids=prompt, max_tokens=steps, top_logprobs=3, ignore_eos=True)


def tail(seed: int, n: int = 9) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 128) for _ in range(n)]


def bits(result) -> list:
    return [(t.token_id, t.logprob.hex(), [(i, lp.hex()) for i, _, lp in t.top]) for t in result.tokens]


def load(model_dirs, prefix_cache: bool, slots: int = 3) -> Engine:
    return Engine.load(model_dirs["qwen3"], kernels="batch-invariant", kernel_impl="cpu-exact", device="cpu",
                       max_slots=slots, max_len=128, prefix_cache=prefix_cache)


def test_block_keys_name_whole_prefixes():
    a = block_keys(PREFIX)
    assert len(a) == 2 and block_keys(PREFIX[:BLOCK]) == a[:1]
    other = [PREFIX[0] + 1] + PREFIX[1:]
    assert all(x != y for x, y in zip(a, block_keys(other)))  # one token in block 0 changes every key
    assert block_keys(PREFIX[:BLOCK - 1]) == []


def test_cached_prefix_gives_the_bits_of_the_cache_off(model_dirs):
    off, on = load(model_dirs, False), load(model_dirs, True)
    first = on.generate([ask(PREFIX + tail(1))])[0]
    assert on.prefix.hit_tokens == 0
    # each scenario: (requests, which result to compare, prompt tokens that must come from the cache)
    follow_up = PREFIX + tail(1) + first.token_ids[:-1] + tail(2, 20)  # a second turn: generated K/V too
    scenarios = {
        "same prefix, other tail": ([ask(PREFIX + tail(3))], 0, 2 * BLOCK),
        "the very same prompt": ([ask(PREFIX + tail(1))], 0, 2 * BLOCK),
        "second turn": ([ask(follow_up)], 0, (len(PREFIX) + 9 + 3) // BLOCK * BLOCK),
        "batched with others": ([ask(tail(4, 30)), ask(PREFIX + tail(5)), ask(PREFIX[:BLOCK] + tail(6))], 1, None),
    }
    for name, (requests, index, hit) in scenarios.items():
        before = on.prefix.hit_tokens
        got = bits(on.generate(requests)[index])
        want = bits(off.generate(requests)[index])
        assert got == want, f"{name}: the cached prefix changed the bits"
        if hit is not None:
            assert on.prefix.hit_tokens - before >= hit, f"{name}: expected {hit} cached prompt tokens"
    assert on.prefix.hit_tokens > 0


def test_overwritten_slots_are_not_hits(model_dirs):
    """Two slots, many prompts: every slot is reused, and the index must follow."""
    off, on = load(model_dirs, False, slots=2), load(model_dirs, True, slots=2)
    prompts = [PREFIX + tail(10)] + [tail(20 + i, 40) for i in range(4)] + [PREFIX + tail(11)]
    for prompt in prompts:
        assert bits(on.generate([ask(prompt)])[0]) == bits(off.generate([ask(prompt)])[0])
    # the forward_logits path writes into slots too: the index must forget them
    on.forward_logits([tail(30, 40), tail(31, 40)])
    assert bits(on.generate([ask(PREFIX + tail(12))])[0]) == bits(off.generate([ask(PREFIX + tail(12))])[0])
