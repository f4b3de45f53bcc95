"""``Engine.score``: teacher forcing in one prefill pass. With batch-invariant kernels it
gives back, bitwise, the logprobs that generation reported in any batch (prefill =
decode); its ids and rows are those of the generated tokens, not their neighbours'."""

from __future__ import annotations

import pytest
import torch

from local_backend.engine import Engine, Request, RequestError
from tests.local.conftest import DEVICE

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


def sampled(seed: int) -> Request:
    return Request(messages=PROMPT, max_tokens=10, temperature=1.0, seed=seed)


def filler(length: int, steps: int) -> Request:
    return Request(prompt_ids=[(7 * i + 3) % 300 + 20 for i in range(length)], max_tokens=steps,
                   ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    return Engine.load("tiny", kernels="batch-invariant", device=DEVICE, max_slots=4, max_len=128)


def test_score_gives_generation_logprobs_back_bitwise(engine):
    batches = [[sampled(1)], [filler(5, 12), sampled(2), filler(17, 3)],
               [filler(30, 1), filler(2, 12), filler(9, 4), sampled(3)]]
    checked = 0
    for batch in batches:
        results = engine.generate(batch)
        for request, result in zip(batch, results):
            if request.messages is None or not result.token_ids:
                continue
            scores = engine.score(result.prompt_ids, result.token_ids)
            assert [float.hex(v) for v in scores] == [float.hex(t.logprob) for t in result.tokens]
            checked += len(scores)
    assert checked >= 10


def test_score_is_the_log_softmax_of_each_prefix(engine):
    """Row by row against the whole-sequence prefill (prompt_logprobs)."""
    prompt, completion = [0, 4, 389, 461, 417, 5], [300, 41, 77, 12]
    rows = engine.prompt_logprobs(prompt + completion)
    expected = [float(rows[len(prompt) - 1 + i][t]) for i, t in enumerate(completion)]
    assert engine.score(prompt, completion) == expected
    # one token changed: the scores before it stay, the one at it is another row entry
    other = engine.score(prompt, [300, 42, 77, 12])
    assert other[0] == expected[0] and other[1] != expected[1]


def test_score_refuses_what_it_cannot_score(engine):
    with pytest.raises(RequestError, match="non-empty"):
        engine.score([1, 2], [])
    with pytest.raises(RequestError, match="token ids must be in"):
        engine.score([1, 2], [engine.config.vocab_size])
    with pytest.raises(RequestError, match="not in 1.."):
        engine.score([5] * engine.max_len, [6, 7])


def test_default_kernels_score_close_to_generation():
    engine = Engine.load("tiny", kernels="default", device=DEVICE, max_slots=4, max_len=128)
    result = engine.generate([filler(6, 5), sampled(4)])[1]
    assert result.token_ids  # seed 4 writes a sentence
    scores = torch.tensor(engine.score(result.prompt_ids, result.token_ids))
    torch.testing.assert_close(scores, torch.tensor([t.logprob for t in result.tokens]), atol=1e-4, rtol=0)


def test_packed_scores_are_bitwise_the_scores_alone_in_any_packing(engine):
    """``score_many`` packs completions of one prompt into few passes (4 slots here, and a
    token budget that cuts passes early); with batch-invariant kernels each value is the
    one ``score`` gives alone, whatever else shares its pass and at which place."""
    prompt = [0, 4, 389, 461, 417, 5]
    completions = [[(11 * i + 5 * j) % 400 + 10 for j in range(length)]
                   for i, length in enumerate((1, 9, 3, 14, 2, 7, 20, 5, 11))]
    alone = [[float.hex(v) for v in engine.score(prompt, ids)] for ids in completions]
    for order, budget in ((completions, 4096), (completions[::-1], 4096), (completions, 24)):
        packed = engine.score_many(prompt, order, pack_tokens=budget)
        expected = alone if order is completions else alone[::-1]
        assert [[float.hex(v) for v in scores] for scores in packed] == expected
    with pytest.raises(RequestError, match="non-empty"):
        engine.score_many(prompt, [[5], []])


def test_with_default_kernels_the_reference_scores_each_completion_alone():
    """What LocalReference relies on: it packs only batch-invariant kernels. With default
    kernels it scores one completion per pass, the same values as ``score`` alone."""
    from detaudit.reference import LocalReference

    reference = LocalReference("tiny", "default", None, None, DEVICE)
    assert reference.packed is False and reference.describe()["packed"] is False
    prompt = [0, 4, 389, 461, 417, 5]
    completions = [[(11 * i + 5 * j) % 400 + 10 for j in range(length)]
                   for i, length in enumerate((1, 9, 3, 14))]
    assert reference.score_many(prompt, completions) == [reference.engine.score(prompt, ids)
                                                         for ids in completions]
    assert LocalReference("tiny", "batch-invariant", None, None, DEVICE).packed is True
