"""``detaudit serve --prefix-cache``: a repeated prompt (its prefix then comes from the
cache) gets the same logprob bits as the engine with the cache off."""

from __future__ import annotations

import openai

from tests.servers.serve_process import Server

CHAT = [{"role": "system", "content": "You answer in one word. " * 6},
        {"role": "user", "content": "Flip a coin. Return Heads or Tails only."}]


def test_prefix_cache_serves_the_bits_of_the_cache_off():
    from local_backend.engine import Engine, Request

    engine = Engine.load("tiny", kernels="batch-invariant", device="cpu", max_slots=1)
    [expected] = engine.generate([Request(messages=CHAT, max_tokens=3, top_logprobs=5)])
    assert len(expected.prompt_ids) > 32  # at least two cached blocks on the second request
    server = Server("--kernels", "batch-invariant", "--prefix-cache", "--max-batch", "2")
    try:
        assert any("prefix cache on" in line for line in server.stderr)
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        for attempt in ("first", "cached"):
            response = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0,
                                                      logprobs=True, top_logprobs=5)
            got = [(c.token, c.logprob, [(t.token, t.logprob) for t in c.top_logprobs])
                   for c in response.choices[0].logprobs.content]
            want = [(t.text, t.logprob, [(text, lp) for _, text, lp in t.top]) for t in expected.tokens]
            assert got == want, f"{attempt} request: served bits differ from the engine without a prefix cache"
    finally:
        server.stop()
