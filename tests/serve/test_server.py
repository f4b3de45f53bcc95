"""``detaudit serve`` over real HTTP, driven by the official openai client: the wire
format, exact logprobs, dynamic batching, errors, limits and shutdown."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import COIN, Server

pytestmark = pytest.mark.slow


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def test_chat_logprobs_match_the_engine_in_process_bit_for_bit(server_invariant):
    """The server answers what the engine computes: same tokens, same float bits."""
    from local_backend.engine import Engine, Request
    from local_backend.kernels.revision import KERNELS_REVISION

    response = client(server_invariant).chat.completions.create(
        model="tiny", messages=COIN, max_tokens=2, temperature=0, seed=42, logprobs=True,
        top_logprobs=20)
    engine = Engine.load("tiny", kernels="batch-invariant", device="cpu", max_slots=1)
    [expected] = engine.generate([Request(messages=COIN, max_tokens=2, temperature=0, seed=42,
                                          top_logprobs=20)])

    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == "tiny"
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    content = choice.logprobs.content
    assert [c.token for c in content] == [t.text for t in expected.tokens]
    for got, want in zip(content, expected.tokens):
        assert got.logprob == want.logprob  # exact: fp32 -> Python float -> JSON -> float
        assert bytes(got.bytes) == engine.tokenizer.token_bytes(want.token_id)
        assert [(t.token, t.logprob) for t in got.top_logprobs] == [(text, lp) for _, text, lp in want.top]
    assert response.usage.prompt_tokens == len(expected.prompt_ids)
    assert response.usage.completion_tokens == len(expected.token_ids)
    health = server_invariant.health()
    assert response.system_fingerprint == health["system_fingerprint"] == engine.fingerprint()
    assert health["weights_sha256"][:12] in response.system_fingerprint
    assert f"-batch-invariant-{engine.ops.implementation}-k{KERNELS_REVISION}-" in response.system_fingerprint


def test_logprob_json_text_round_trips(server_default):
    body = {"model": "tiny", "messages": COIN, "max_tokens": 1, "temperature": 0,
            "logprobs": True, "top_logprobs": 20}
    raw = httpx.post(server_default.url + "/chat/completions", json=body).content
    texts = []
    json.loads(raw, parse_float=lambda text: texts.append(text) or float(text))
    assert len(texts) == 21  # the chosen token and its top 20
    for text in texts:
        assert repr(float(text)) == text


def test_legacy_completions_format(server_default):
    response = client(server_default).completions.create(
        model="tiny", prompt="The lighthouse keeper", max_tokens=4, temperature=0, logprobs=5,
        extra_body={"ignore_eos": True})
    choice = response.choices[0]
    lp = choice.logprobs
    assert response.object == "text_completion" and choice.finish_reason == "length"
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 5 and value <= 0
        assert max(top.values()) >= value  # greedy: the chosen token is the most likely
    assert response.usage.completion_tokens == 4


def test_n_choices_and_stop_strings(server_default):
    c = client(server_default)
    free = c.completions.create(model="tiny", prompt="Tell a short story about a lighthouse",
                                max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    text = free.choices[0].text
    cut = text.find(" ", 2)
    assert cut > 0, text
    stop = text[cut:cut + 3]
    stopped = c.completions.create(model="tiny", prompt="Tell a short story about a lighthouse",
                                   max_tokens=12, temperature=0, stop=[stop],
                                   extra_body={"ignore_eos": True})
    assert stopped.choices[0].text == text[:text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"

    many = c.chat.completions.create(model="tiny", messages=COIN, max_tokens=3, n=3,
                                     temperature=1.0, seed=7)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    again = c.chat.completions.create(model="tiny", messages=COIN, max_tokens=3, n=3,
                                      temperature=1.0, seed=7)
    assert [ch.message.content for ch in many.choices] == [ch.message.content for ch in again.choices]
    one = c.chat.completions.create(model="tiny", messages=COIN, max_tokens=3, temperature=1.0, seed=7)
    assert one.choices[0].message.content == many.choices[0].message.content


def test_models_and_health(server_default):
    models = client(server_default).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client(server_default).models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client(server_default).models.retrieve("gpt-4o")
    health = server_default.health()
    assert health["status"] == "ok" and health["kernels"] == "default"


def test_the_engine_is_warmed_up_before_the_server_says_it_is_ready():
    """``detaudit serve`` runs ``Engine.warm_up`` before it listens. Its first answers,
    before any request ran, say what the warm-up did: exactly what the same engine's
    warm_up does in process (on a GPU: every matmul kernel of the tile table and every
    decode graph, in one line logged before the ready line; on a CPU nothing, since
    nothing is compiled ahead there: start-up prints the ready line alone)."""
    from local_backend.engine import Engine

    server = Server("--kernels", "batch-invariant", "--max-batch", "4")
    try:
        health = server.health()
        startup = list(server.stderr)
    finally:
        server.stop()
    engine = Engine.load("tiny", kernels="batch-invariant", device=health["device"], max_slots=4)
    launches = engine.warm_up()
    graphs = len(engine.decode.captured) if engine.decode is not None else 0
    assert health["steps"] == 0 and health["in_flight"] == 0  # no request has run yet
    warmed = health["warm_up"]
    assert (warmed["matmul_launches"], warmed["decode_graphs"]) == (launches, graphs)
    assert warmed["seconds"] >= 0
    ready = [i for i, line in enumerate(startup) if " at http://" in line]
    assert ready == [len(startup) - 1], startup  # the ready line comes last
    if launches or graphs:
        said = rf"warmed up in \d+\.\d s: {launches} matmul kernels, {graphs} decode graphs\n"
        assert sum(bool(re.fullmatch(said, line)) for line in startup[:-1]) == 1, startup
    else:
        assert health["device"] == "cpu" and startup[:-1] == [], startup


BAD_REQUESTS = [
    # (body, expected status, expected param)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'"text"', 400, None),
    (b"[" * 100000, 400, None),
    ({"messages": COIN}, 400, "model"),
    ({"model": "gpt-4o", "messages": COIN}, 404, "model"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content"),
    ({"model": "tiny", "messages": COIN, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"model": "tiny", "messages": COIN, "top_logprobs": 3}, 400, "top_logprobs"),
    ({"model": "tiny", "messages": COIN, "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "messages": COIN, "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": COIN, "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "messages": COIN, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "messages": COIN, "max_tokens": 10**12}, 400, "max_tokens"),
    ({"model": "tiny", "messages": COIN, "n": 1000}, 400, "n"),
    ({"model": "tiny", "messages": COIN, "seed": 1.5}, 400, "seed"),
    ({"model": "tiny", "messages": COIN, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "messages": COIN, "stream": "yes"}, 400, "stream"),
    ({"model": "tiny", "messages": COIN, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "tiny", "messages": COIN, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"model": "tiny", "messages": COIN, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "tiny", "messages": COIN, "wibble": 1}, 400, "wibble"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 20000}]}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "\ud800"}]}, None, None),
]


@pytest.mark.parametrize("body, status, param", BAD_REQUESTS,
                         ids=[f"bad{i}" for i in range(len(BAD_REQUESTS))])
def test_bad_requests_get_openai_error_bodies(server_default, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server_default.url + "/chat/completions", content=content,
                          headers={"content-type": "application/json"})
    if status is None:  # a lone surrogate: either tokenized or refused, never a crash
        assert response.status_code in (200, 400)
    else:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"] and error["param"] == param
    assert server_default.health()["status"] == "ok"


def test_bad_completions_prompt_and_routes(server_default):
    for prompt in (None, 5, [], ["a", "b"], [10**9]):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 1}
        response = httpx.post(server_default.url + "/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    response = httpx.post(server_default.url + "/completions",
                          json={"model": "tiny", "prompt": "hi", "logprobs": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"
    assert httpx.get(server_default.root + "/v2/nothing").status_code == 404
    wrong_method = httpx.get(server_default.url + "/chat/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client(server_default).chat.completions.create(model="tiny", messages=COIN, logprobs=True,
                                                       top_logprobs=25)


def test_concurrent_requests_share_forward_passes(server_invariant):
    """Eight requests of 3 tokens each: 24 steps one after another, far fewer when the
    scheduler batches them together."""
    async def burst():
        async with openai.AsyncOpenAI(base_url=server_invariant.url, api_key="x", max_retries=0) as c:
            calls = [c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Tell a story number {i}"}],
                max_tokens=3, temperature=0, extra_body={"ignore_eos": True}) for i in range(8)]
            return await asyncio.gather(*calls)

    before = server_invariant.health()["steps"]
    responses = asyncio.run(burst())
    steps = server_invariant.health()["steps"] - before
    assert all(r.usage.completion_tokens == 3 for r in responses)
    assert steps < 8 * 3 / 2, f"{steps} steps for 8 concurrent requests: not batched"


def test_full_queue_429_timeout_504_and_body_limit_413():
    """One slot, no queue: a second request meanwhile is refused with Retry-After; the
    first outlives its request timeout; a big body is refused before it is read."""
    server = Server("--kernels", "batch-invariant", "--max-batch", "1", "--max-queue", "0",
                    "--request-timeout", "0.5", "--max-body-bytes", "4000")
    try:
        # 450 decode steps: longer than the timeout on any CPU path (cpu-exact takes ~5 ms a step)
        long = {"model": "tiny", "messages": COIN, "max_tokens": 450, "ignore_eos": True}

        async def scenario():
            async with httpx.AsyncClient(timeout=60) as http:
                first = asyncio.create_task(http.post(server.url + "/chat/completions", json=long))
                while (await http.get(server.root + "/health")).json()["in_flight"] < 1:
                    await asyncio.sleep(0.02)
                second = await http.post(server.url + "/chat/completions", json=long)
                return await first, second

        started = time.monotonic()
        first, second = asyncio.run(scenario())
        assert second.status_code == 429 and second.json()["error"]["code"] == "queue_full"
        assert int(second.headers["retry-after"]) >= 1
        assert first.status_code == 504 and first.json()["error"]["type"] == "timeout_error"
        assert time.monotonic() - started < 10

        big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}
        too_big = httpx.post(server.url + "/chat/completions", json=big)
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"

        def chunks():
            yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}]}'
        chunked = httpx.post(server.url + "/chat/completions", content=chunks(),
                             headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert server.health()["status"] == "ok"
    finally:
        assert server.stop() == 0


def test_sigterm_lets_in_flight_requests_finish_and_exits_0():
    server = Server("--kernels", "default", "--shutdown-grace", "5")
    body = {"model": "tiny", "messages": COIN, "max_tokens": 400, "ignore_eos": True}

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as http:
            request = asyncio.create_task(http.post(server.url + "/chat/completions", json=body))
            while (await http.get(server.root + "/health")).json()["in_flight"] < 1:
                await asyncio.sleep(0.01)
            server.signal(signal.SIGTERM)
            return await request

    response = asyncio.run(scenario())
    started = time.monotonic()
    code = server.proc.wait(20)
    assert code == 0 and time.monotonic() - started < 15
    assert response.status_code in (200, 503)
    if response.status_code == 200:
        assert response.json()["usage"]["completion_tokens"] == 400
    log = "".join(server.stderr)
    assert "Traceback" not in log and "server stopped" in log


def test_ctrl_c_exits_130_without_a_traceback():
    server = Server("--kernels", "default")
    server.signal(signal.SIGINT)
    assert server.proc.wait(20) == 130
    assert "Traceback" not in "".join(server.stderr)


# Any JSON a client can send: the answer is a completion or an OpenAI error body.
_junk = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                     | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_fields = {
    "model": st.sampled_from(["tiny", "other"]) | _junk,
    "messages": st.just(COIN) | st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "bot"]), "content": st.text(max_size=40) | _junk}),
        max_size=3) | _junk,
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 1000), max_size=6) | _junk,
    "max_tokens": st.integers(-2, 4) | _junk, "temperature": st.floats(-1, 3) | _junk,
    "top_p": st.floats(-0.5, 1.5) | _junk, "seed": st.integers(-2**63, 2**63) | _junk,
    "n": st.integers(-1, 3) | _junk, "stop": st.text(max_size=3) | _junk,
    "logprobs": st.booleans() | st.integers(-1, 25) | _junk, "top_logprobs": st.integers(-1, 25) | _junk,
    "stream": st.booleans(), "surprise": _junk,
}
_bodies = st.fixed_dictionaries({}, optional=_fields) | _junk


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies, route=st.sampled_from(["/chat/completions", "/completions"]))
def test_no_request_body_crashes_the_server(server_default, body, route):
    response = httpx.post(server_default.url + route, json=body, timeout=60)
    assert response.status_code in (200, 400, 404), response.text
    if response.headers["content-type"].startswith("text/event-stream"):  # stream: true
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks and all(c["system_fingerprint"] and "error" not in c for c in chunks)
        assert any(choice["finish_reason"] for c in chunks for choice in c["choices"])
        return
    data = response.json()
    if response.status_code == 200:
        assert data["choices"] and data["system_fingerprint"]
    else:
        assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"]


@pytest.mark.parametrize("number", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_numbers_are_a_400(server_default, number):
    """Python's json (and some clients) write Infinity and NaN; they are not JSON."""
    body = ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
            f'"temperature": {number}}}')
    response = httpx.post(server_default.url + "/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]


def test_a_burst_beyond_the_queue_is_answered_in_full():
    """60 requests at once into 2 slots + 2 queue places: every one gets a completion
    or a 429 with Retry-After, none is lost or hangs, and the engine drains to zero."""
    server = Server("--kernels", "default", "--max-batch", "2", "--max-queue", "2")
    body = {"model": "tiny", "messages": COIN, "max_tokens": 8, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2}

    async def burst():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=60)) as http:
            return await asyncio.gather(*(http.post(server.url + "/chat/completions", json=body)
                                          for _ in range(60)))

    try:
        responses = asyncio.run(burst())
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 4 and 429 in statuses
        for r in responses:
            if r.status_code == 200:
                assert r.json()["usage"]["completion_tokens"] == 8
            else:
                assert int(r.headers["retry-after"]) >= 1
        assert server.health()["in_flight"] == 0
    finally:
        assert server.stop() == 0
