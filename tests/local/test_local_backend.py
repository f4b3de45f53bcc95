"""LocalBackend as the runner sees it: a probe in, a Completion out, each repeat in
its own reproducible batch; with batch-invariant kernels every batch gives the
same bits."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from tokenizers import Tokenizer

from detaudit.backends.base import BackendError
from tests.local.conftest import DEVICE
from detaudit.backends.local import LocalBackend
from detaudit.probes import LoadSpec, load_probe

SIZES = [1, 3, 4]


@pytest.fixture(scope="module")
def backend(chat_model_dir):
    return LocalBackend(str(chat_model_dir), kernels="batch-invariant", batch_sizes=SIZES,
                        device=DEVICE, seed=0, max_len=128)


@pytest.fixture(scope="module")
def coin_flip():
    """Coin flip, 2 tokens, with short fillers: the Triton interpreter is slow."""
    probe = load_probe("coin-flip").with_overrides(max_tokens=2)
    return dataclasses.replace(probe, load=LoadSpec(filler_min_tokens=2, filler_max_tokens=12))


def complete(backend, probe, index):
    return asyncio.run(backend.complete(probe, index))


@pytest.mark.slow
def test_every_batch_size_gives_the_same_bits(backend, coin_flip):
    runs = [complete(backend, coin_flip, i) for i in range(len(SIZES))]
    assert [r.extra["batch_size"] for r in runs] == SIZES
    first = runs[0]
    assert len(first.positions) == 2 and len(first.positions[0].top) == 20
    for run in runs[1:]:
        assert run.positions == first.positions, f"batch of {run.extra['batch_size']} changed the logprobs"
        assert run.text == first.text
    for p in first.positions:
        assert float.fromhex(p.logprob_text) == p.logprob
        assert [t.logprob for t in p.top] == sorted((t.logprob for t in p.top), reverse=True)
        assert p.token in [t.token for t in p.top]
    assert first.system_fingerprint == backend.system_fingerprint
    assert first.finish_reason in ("stop", "length")


@pytest.mark.slow
def test_an_index_always_runs_in_the_same_batch(backend, coin_flip):
    again = [complete(backend, coin_flip, 5) for _ in range(2)]
    assert again[0].positions == again[1].positions
    assert again[0].extra == again[1].extra
    assert again[0].extra["batch_size"] == SIZES[5 % len(SIZES)]
    one_token = coin_flip.with_overrides(max_tokens=1)
    positions = {complete(backend, one_token, i).extra["batch_position"] for i in (2, 5, 8, 11)}
    assert len(positions) > 1, "the probe should not always sit at the same place in the batch"


def test_first_token_is_the_tokenizers_first_token(backend, chat_model_dir):
    reference = Tokenizer.from_file(str(chat_model_dir / "tokenizer.json"))
    for label in ("Heads", "Tails", "sea"):
        expected = reference.decode([reference.encode(label).ids[0]])
        assert backend.first_token(label) == expected
        assert label.startswith(backend.first_token(label))


def test_describe_for_the_manifest(backend, chat_model_dir):
    facts = backend.describe()
    assert facts["type"] == "local" and facts["batch_sizes"] == SIZES
    assert facts["kernels"] == "batch-invariant" and facts["device"] == DEVICE
    assert len(facts["weights_sha256"]) == 64 and facts["model_path"] == str(chat_model_dir)


def test_a_request_the_engine_cannot_run_is_a_bad_request(backend):
    probe = load_probe("coin-flip").with_overrides(prompt="Heads " * 200)
    with pytest.raises(BackendError) as info:
        complete(backend, probe, 0)
    assert info.value.kind == "bad_request" and "context is 128 tokens" in info.value.message


def test_bad_batch_sizes_are_refused(chat_model_dir):
    with pytest.raises(ValueError, match="batch_sizes"):
        LocalBackend(str(chat_model_dir), kernels="default", batch_sizes=[0, 2], device=DEVICE)
