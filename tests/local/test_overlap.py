"""Overlap scheduling (Engine(overlap=True)): each decode step is launched before the
last one's picks are read, its tokens fed from the device. It must change nothing but
timing: the same tokens and logprob bits, the same finish reasons, and (when no request
ends early by EOS or a stop string) the very same passes, so even default kernels give
the same bits."""

from __future__ import annotations

import random

import pytest
import torch

from local_backend.engine import Engine, Request

SLOTS = 6


def workload(n: int, seed: int, **extra) -> list[Request]:
    rng = random.Random(seed)
    return [Request(prompt_ids=[rng.randrange(3, 128) for _ in range(rng.randint(1, 24))],
                    max_tokens=rng.randint(1, 9), top_logprobs=rng.choice([0, 0, 5]), **extra)
            for _ in range(n)]


def bits(result) -> tuple:
    return (result.finish_reason, [(t.token_id, t.logprob.hex(), [(i, lp.hex()) for i, _, lp in t.top])
                                   for t in result.tokens])


def load(folder, overlap: bool, kernels: str = "batch-invariant", device: str = "cpu", **kw) -> Engine:
    impl = "cpu-exact" if kernels == "batch-invariant" and device == "cpu" else "auto"
    engine = Engine.load(folder, kernels=kernels, kernel_impl=impl, device=device, max_slots=SLOTS,
                         max_len=64, overlap=overlap, **kw)
    engine.admit_group = 2  # joins in groups, as with decode graphs: exercises the admission prediction
    return engine


def passes(engine: Engine) -> list[tuple[str, int]]:
    """Record each forward pass (kind, rows) as it is launched."""
    seen: list[tuple[str, int]] = []
    forward, fed = engine._forward, engine._forward_fed
    engine._forward = lambda ids, *rest: seen.append(("host", len(ids))) or forward(ids, *rest)
    engine._forward_fed = lambda tokens, source, *rest: seen.append(("fed", len(source))) or fed(tokens, source, *rest)
    return seen


def streamed(engine: Engine, requests: list[Request], abort_after: dict[int, str] | None = None):
    """Drive step() as a server does; (results by id, tokens streamed by id)."""
    out: dict[str, list] = {}
    ids = [engine.add_request(r) for r in requests]
    done, calls = {}, 0
    while engine.has_unfinished():
        for result in engine.step(lambda rid, tok: out.setdefault(rid, []).append(tok)):
            done[result.request_id] = result
        calls += 1
        if abort_after and calls in abort_after:
            assert engine.abort(abort_after[calls])
    return [done.get(i) for i in ids], out


@pytest.mark.parametrize("kernels", ["batch-invariant", "default"])
@pytest.mark.parametrize("decode_graphs", ["off", "buckets"])
def test_overlap_gives_the_same_bits_and_the_same_passes(model_dirs, kernels, decode_graphs):
    requests = workload(15, seed=1, ignore_eos=True)
    runs = {}
    for overlap in (False, True):
        engine = load(model_dirs["qwen3"], overlap, kernels, decode_graphs=decode_graphs)
        seen = passes(engine)
        runs[overlap] = ([bits(r) for r in engine.generate(requests)], [rows for _, rows in seen],
                         sum(kind == "fed" for kind, _ in seen))
        assert engine.cache.free_slots == SLOTS and engine._in_flight is None
    (plain, plain_rows, plain_fed), (over, over_rows, over_fed) = runs[False], runs[True]
    assert plain_fed == 0 and over_fed > len(over_rows) // 2, "most decode steps should be fed from the device"
    assert over_rows == plain_rows, "overlap changed which rows ran together"
    assert over == plain


def test_overlap_with_eos_seeded_sampling_and_streaming(model_dirs):
    requests = workload(12, seed=2)
    probe = load(model_dirs["llama"], overlap=False).generate([Request(prompt_ids=r.prompt_ids, max_tokens=9,
                                                                       ignore_eos=True) for r in requests])
    eos = probe[0].token_ids[2]  # a token some completions reach: EOS for both runs below
    requests[4] = Request(prompt_ids=requests[4].prompt_ids, max_tokens=8, temperature=0.9, seed=7)
    got = {}
    for overlap in (False, True):
        engine = load(model_dirs["llama"], overlap)
        engine.eos_ids = {eos}
        results, tokens = streamed(engine, requests)
        for r in results:  # streamed tokens are the result's tokens, in order
            assert [t.token_id for t in tokens.get(r.request_id, [])] == r.token_ids
        got[overlap] = [bits(r) for r in results]
        again = engine.generate(requests[:3])  # nothing left over from the spare rows
        assert [bits(r) for r in again] == got[overlap][:3]
        assert engine.cache.free_slots == SLOTS
    stops = [b for b, r in zip(got[False], requests) if b[0] == "stop" and len(b[1]) < r.max_tokens]
    assert stops, "no request ended early by EOS: the test would not exercise spare rows"
    assert got[True] == got[False]


def test_overlap_abort_and_prefix_cache(model_dirs):
    shared = list(range(10, 50))  # 40 tokens: two cached blocks of 16
    requests = [Request(prompt_ids=shared + [60 + i], max_tokens=6, ignore_eos=True) for i in range(8)]
    got = {}
    for overlap, cache in ((False, False), (False, True), (True, True)):
        engine = load(model_dirs["qwen3"], overlap, prefix_cache=cache)
        victim = requests[1].request_id
        results, tokens = streamed(engine, requests, abort_after={3: victim})
        assert results[1] is None and 0 < len(tokens[victim]) < 6
        got[(overlap, cache)] = ([bits(r) for i, r in enumerate(results) if i != 1], len(tokens[victim]))
        assert engine.cache.free_slots == SLOTS
        if cache:
            assert engine.prefix.hit_tokens > 0
    assert got[(True, True)] == got[(False, True)] == got[(False, False)]


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_passes_split_into_prefill_and_decode_give_the_same_bits(model_dirs, overlap):
    """Engine.split_mixed: a pass with prompts and decode tokens runs as a prefill pass, then a
    decode step of the rest; with batch-invariant kernels no bit may change."""
    requests = workload(15, seed=3, ignore_eos=True)
    runs = {}
    for split in (False, True):
        engine = load(model_dirs["qwen3"], overlap, decode_graphs="buckets")
        engine.split_mixed = split
        seen = passes(engine)
        runs[split] = ([bits(r) for r in engine.generate(requests)], len(seen))
    assert runs[True][1] > runs[False][1], "no mixed pass was split"
    assert runs[True][0] == runs[False][0]


def test_overlap_is_off_on_a_cpu_by_default_and_checked(model_dirs):
    assert Engine.load(model_dirs["qwen3"], device="cpu").overlap is False
    with pytest.raises(ValueError, match="overlap must be"):
        Engine.load(model_dirs["qwen3"], device="cpu", overlap="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernels", ["batch-invariant", "default"])
def test_overlap_on_cuda_graphs_same_bits_and_no_sync(model_dirs, kernels):
    requests = workload(15, seed=1, ignore_eos=True)
    runs = {}
    for overlap in (False, True):
        engine = load(model_dirs["qwen3"], overlap, kernels, device="cuda", decode_graphs="on")
        assert engine.overlap is overlap and engine.decode.graphs
        engine.decode.capture_all()
        seen = passes(engine)
        launch = engine._launch

        def strict(plan, defer):  # a fed step must queue its work without waiting for the GPU
            if plan.feed is None:
                return launch(plan, defer)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return launch(plan, defer)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        engine._launch = strict
        runs[overlap] = ([bits(r) for r in engine.generate(requests)], [rows for _, rows in seen])
        fed = sum(kind == "fed" for kind, _ in seen)
        assert (fed > len(seen) // 2) if overlap else fed == 0
    assert runs[True] == runs[False]
