"""OpenAIBackend through the official SDK against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import time

import pytest

from detaudit.backends.base import BackendError
from detaudit.backends.openai_backend import OpenAIBackend, is_local
from detaudit.probes import load_probe, parse_probe
from detaudit.records import Completion
from tests.servers.fake_openai import Fault, State, outcome_states

KEY = "sk-test-0123456789abcdefSECRET"

COMPLETIONS_PROBE = """
name = "legacy"
api = "completions"
[request]
prompt = "Flip a coin:"
max_tokens = 3
temperature = 0
seed = 42
logprobs = true
top_logprobs = 5
[track]
outcomes = ["Heads", "Tails"]
"""


def run_backend(url: str, probe, n: int = 1, **kwargs) -> list[Completion | BackendError]:
    """n requests one after another (so result i answers request i)."""
    async def go():
        backend = OpenAIBackend(kwargs.pop("model", "gpt-4o-mini"), url, **kwargs)
        results = []
        try:
            for i in range(n):
                try:
                    results.append(await backend.complete(probe, i))
                except BackendError as exc:
                    results.append(exc)
        finally:
            await backend.aclose()
        return results
    return asyncio.run(go())


def all_logprob_texts(completion: Completion) -> list[str]:
    return [t for p in completion.positions for t in [p.logprob_text] + [x.logprob_text for x in p.top]]


def test_chat_keeps_every_logprob_text_as_sent(fake_openai):
    fake_openai.configure(
        states=outcome_states("Heads", [(-0.31326166, 3), (-0.3132617, 1)],
                              alternatives={"T": -1.3132617}),
        fingerprints=["fp_a", "fp_b"])
    probe = load_probe("coin-flip")
    results = run_backend(fake_openai.url, probe, n=8, model="gpt-4o-mini")

    assert len(fake_openai.received) == 8  # no caching: every call is a request
    for i, completion in enumerate(results):
        sent = fake_openai.sent[i]
        assert completion.raw == sent["body"]
        texts = all_logprob_texts(completion)
        assert sorted(texts) == sorted(sent["logprobs"])
        for p in completion.positions:
            for value, text in [(p.logprob, p.logprob_text)] + [(t.logprob, t.logprob_text) for t in p.top]:
                assert value == float(text)
        assert completion.text == "Heads"
        assert completion.model == "gpt-4o-mini"
        assert completion.system_fingerprint == ["fp_a", "fp_b"][i % 2]
        assert len(completion.positions[0].top) == 20
        top = completion.positions[0].top[0]
        assert top.token == "Heads" and top.bytes == list(b"Heads")
    # The texts really were kept, not re-rendered: some are not Python's repr.
    texts = [t for c in results for t in all_logprob_texts(c)]
    assert any(t != repr(float(t)) for t in texts)
    # Weights 3:1 -> exactly two of eight answers carry the second value.
    heads = [c.positions[0].logprob for c in results]
    assert heads.count(-0.3132617) == 2 and heads.count(-0.31326166) == 6


def test_chat_sends_the_probe_request(fake_openai):
    probe = load_probe("coin-flip")
    probe.request["top_k"] = 1  # not an SDK parameter (vLLM's): goes in the body as is
    run_backend(fake_openai.url, probe, model="test-model")
    body = fake_openai.received[0]["body"]
    assert fake_openai.received[0]["path"] == "/v1/chat/completions"
    assert body == {**probe.request, "model": "test-model"}


def test_completions_api(fake_openai):
    fake_openai.configure(states=[State([{"Heads": -0.25, "T": -1.5}, {" it": -0.125}, {"!": -2.0}])])
    probe = parse_probe(COMPLETIONS_PROBE, "legacy.toml")
    [completion] = run_backend(fake_openai.url, probe, api="completions")

    received = fake_openai.received[0]
    assert received["path"] == "/v1/completions"
    assert received["body"]["logprobs"] == 5 and "top_logprobs" not in received["body"]
    assert completion.text == "Heads it!"
    assert [p.token for p in completion.positions] == ["Heads", " it", "!"]
    assert [p.logprob for p in completion.positions] == [-0.25, -0.125, -2.0]
    assert sorted(all_logprob_texts(completion)) == sorted(fake_openai.sent[0]["logprobs"])
    assert [t.token for t in completion.positions[0].top][:2] == ["Heads", "T"]
    assert all(len(p.top) == 5 for p in completion.positions)


def test_length_finish_and_positions(fake_openai):
    fake_openai.configure(states=[State([{"Red": -0.5}, {".": -0.01}, {"\n": -3.0}])])
    probe = load_probe("top-logprobs").with_overrides(max_tokens=2)
    [completion] = run_backend(fake_openai.url, probe)
    assert completion.finish_reason == "length"
    assert [p.token for p in completion.positions] == ["Red", "."]


def test_sentinel_logprobs_left_out_of_top_k_and_noted(fake_openai):
    """-9999 marks "outside the top 20", not a logprob: the entries leave the top-k
    list (their tokens count as missing), the count is noted, the raw body keeps them."""
    fake_openai.configure(floor_from=5)
    [completion] = run_backend(fake_openai.url, load_probe("coin-flip"))
    top = completion.positions[0].top
    assert len(top) == 5 and all(t.logprob > -9999.0 for t in top)
    assert completion.extra["sentinel_logprobs"] == 15
    sent = json.loads(completion.raw)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert sum(entry["logprob"] == -9999.0 for entry in sent) == 15


def test_no_logprobs_when_not_asked_is_fine(fake_openai):
    probe = load_probe("coin-flip")
    for key in ("logprobs", "top_logprobs"):
        del probe.request[key]
    [completion] = run_backend(fake_openai.url, probe)
    assert completion.text == "Heads" and completion.positions == []


# -- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fault, kind, retryable, retry_after", [
    (Fault("status", status=429, headers={"Retry-After": "2"}), "rate_limit", True, 2.0),
    (Fault("status", status=429, headers={"retry-after-ms": "1500", "Retry-After": "2"}),
     "rate_limit", True, 1.5),
    (Fault("status", status=429), "rate_limit", True, None),
    (Fault("status", status=429, code="insufficient_quota"), "rate_limit", False, None),
    (Fault("status", status=503, headers={"Retry-After": "7"}), "server_error", True, 7.0),
    (Fault("status", status=500), "server_error", True, None),
    (Fault("status", status=408), "server_error", True, None),
    (Fault("status", status=409), "server_error", True, None),
    (Fault("status", status=400), "bad_request", False, None),
    (Fault("status", status=422), "bad_request", False, None),
    (Fault("status", status=403), "auth", False, None),
    (Fault("html", status=502, message="Bad Gateway"), "server_error", True, None),
    # A 200 that is no completion at all is a transport fault, retried like a 502...
    (Fault("html", status=200), "bad_response", True, None),
    (Fault("malformed_json"), "bad_response", True, None),
    (Fault("empty_choices"), "bad_response", True, None),
    (Fault("error_200"), "bad_response", True, None),
    # ...but a completion without the logprobs asked for is what this server does.
    (Fault("no_logprobs"), "no_logprobs", False, None),  # stops the run: tests/test_text_only.py
    (Fault("drop"), "connection", True, None),
])
def test_error_kinds(fake_openai, fault, kind, retryable, retry_after):
    fault.on = {0}
    fake_openai.configure(faults=[fault])
    error, after = run_backend(fake_openai.url, load_probe("coin-flip"), n=2)
    assert isinstance(error, BackendError), error
    assert (error.kind, error.retryable, error.retry_after) == (kind, retryable, retry_after)
    assert fake_openai.url.rsplit("/", 1)[0] in error.message  # says where
    assert "Traceback" not in error.message and "<html>" not in error.message
    assert isinstance(after, Completion)  # the backend keeps working after a fault


def test_error_messages_say_what_happened(fake_openai):
    fake_openai.configure(faults=[Fault("no_logprobs", on={0}), Fault("html", status=502, on={1},
                                                                        message="Bad Gateway")])
    no_logprobs, html = run_backend(fake_openai.url, load_probe("coin-flip"), n=2)
    assert "returned no logprobs" in no_logprobs.message and "--no-logprobs" in no_logprobs.message
    assert "502 Bad Gateway" in html.message and html.status == 502


def test_retry_after_as_http_date(fake_openai):
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)  # 1 s resolution
    fake_openai.configure(faults=[Fault("status", status=429, on={0},
                                        headers={"Retry-After": in_a_minute})])
    [error] = run_backend(fake_openai.url, load_probe("coin-flip"))
    assert 50 <= error.retry_after <= 61


def test_timeout(fake_openai):
    fake_openai.configure(faults=[Fault("slow", delay=2.0, on={0})])
    error, after = run_backend(fake_openai.url, load_probe("coin-flip"), n=2, timeout=0.3)
    assert error.kind == "timeout" and error.retryable
    assert isinstance(after, Completion)


def test_nothing_listening():
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    [error] = run_backend(f"http://127.0.0.1:{port}/v1", load_probe("coin-flip"))
    assert error.kind == "connection" and error.retryable


def test_unknown_model_is_not_found(fake_openai):
    [error] = run_backend(fake_openai.url, load_probe("coin-flip"), model="gpt-9-imaginary")
    assert (error.kind, error.retryable, error.status) == ("not_found", False, 404)
    assert "gpt-9-imaginary" in error.message and "/models" in error.message


def test_wrong_base_url_is_not_found_with_a_hint(fake_openai):
    [error] = run_backend(fake_openai.url.removesuffix("/v1"), load_probe("coin-flip"))
    assert error.kind == "not_found" and "/v1" in error.message


# -- the API key -----------------------------------------------------------------------------


def test_key_is_sent_but_never_shown(fake_openai, monkeypatch):
    monkeypatch.setenv("DETAUDIT_TEST_KEY", KEY)
    fake_openai.configure(api_key=KEY)

    async def go():
        backend = OpenAIBackend("gpt-4o-mini", fake_openai.url, api_key_env="DETAUDIT_TEST_KEY")
        try:
            return backend.describe(), await backend.complete(load_probe("coin-flip"), 0)
        finally:
            await backend.aclose()

    description, completion = asyncio.run(go())
    assert fake_openai.received[0]["headers"]["authorization"] == f"Bearer {KEY}"
    assert description == {"type": "openai", "base_url": fake_openai.url, "api": "chat",
                           "model": "gpt-4o-mini", "sdk_version": description["sdk_version"]}
    assert KEY not in json.dumps(description) and KEY not in completion.raw


def test_rejected_key_is_redacted_from_the_error(fake_openai, monkeypatch):
    """The server echoes the wrong key back in its 401; the error must not carry it."""
    monkeypatch.setenv("DETAUDIT_TEST_KEY", KEY)
    fake_openai.configure(api_key="sk-the-right-one", echo_key_in_errors=True)
    [error] = run_backend(fake_openai.url, load_probe("coin-flip"), api_key_env="DETAUDIT_TEST_KEY")
    assert KEY in fake_openai.sent[0]["body"]  # it really was echoed
    assert (error.kind, error.retryable, error.status) == ("auth", False, 401)
    assert KEY not in error.message and KEY not in str(error) and "***" in error.message


def test_missing_key_for_a_remote_url_names_the_variable(monkeypatch):
    monkeypatch.delenv("DETAUDIT_UNSET_KEY", raising=False)
    with pytest.raises(BackendError) as info:
        OpenAIBackend("gpt-4o", "https://api.example.com/v1", api_key_env="DETAUDIT_UNSET_KEY")
    assert info.value.kind == "auth" and "DETAUDIT_UNSET_KEY" in info.value.message


def test_local_server_needs_no_key(fake_openai, monkeypatch):
    monkeypatch.delenv("DETAUDIT_UNSET_KEY", raising=False)
    [completion] = run_backend(fake_openai.url, load_probe("coin-flip"),
                               api_key_env="DETAUDIT_UNSET_KEY")
    assert completion.text == "Heads"


def test_credentials_in_the_url_are_not_described(monkeypatch):
    monkeypatch.setenv("DETAUDIT_TEST_KEY", KEY)
    backend = OpenAIBackend("m", "https://user:hunter2@llm.example.com:8443/v1",
                            api_key_env="DETAUDIT_TEST_KEY")
    assert backend.describe()["base_url"] == "https://llm.example.com:8443/v1"


@pytest.mark.parametrize("url, local", [
    ("http://127.0.0.1:8000/v1", True), ("http://localhost:11434/v1", True),
    ("http://192.168.1.20:8000/v1", True), ("http://gpu-box:8000/v1", True),
    ("http://[::1]:8000/v1", True), ("https://api.openai.com/v1", False),
    ("https://8.8.8.8/v1", False),
])
def test_is_local(url, local):
    assert is_local(url) is local


def test_first_token_uses_the_model_tokenizer(fake_openai):
    backend = OpenAIBackend("gpt-4o-mini", fake_openai.url)
    assert backend.first_token("Tails") == "T"
    assert OpenAIBackend("Qwen/Qwen2.5-0.5B", fake_openai.url).first_token("Tails") is None


# -- under concurrency, and the fake server itself ---------------------------------------------


def test_concurrent_requests_each_get_their_own_answer(fake_openai):
    """200 requests, 32 at a time, with a random 10 % of faults: every answer is one the
    server sent, every fault is reported as an error, nothing is lost or merged."""
    fake_openai.configure(
        states=outcome_states("Heads", [(-0.31326166, 1), (-0.3132617, 1), (-0.31326175, 1)],
                              alternatives={"T": -1.3132617}),
        fingerprints=["fp_a", "fp_b", "fp_c"],
        faults=[Fault("status", status=500, rate=0.1)], seed=7)
    probe = load_probe("coin-flip")

    async def go():
        backend = OpenAIBackend("gpt-4o-mini", fake_openai.url)
        gate = asyncio.Semaphore(32)

        async def one(i):
            async with gate:
                try:
                    return await backend.complete(probe, i)
                except BackendError as exc:
                    return exc
        try:
            return await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            await backend.aclose()

    results = asyncio.run(go())
    sent_bodies = {s["body"]: s for s in fake_openai.sent if s["status"] == 200}
    completions = [r for r in results if isinstance(r, Completion)]
    errors = [r for r in results if isinstance(r, BackendError)]
    assert len(fake_openai.received) == 200
    assert len(errors) == sum(s["fault"] == "status" for s in fake_openai.sent) > 0
    assert all(e.kind == "server_error" for e in errors)
    for completion in completions:
        sent = sent_bodies[completion.raw]
        assert sorted(all_logprob_texts(completion)) == sorted(sent["logprobs"])
        assert completion.system_fingerprint == sent["fingerprint"]
    assert len({c.positions[0].logprob for c in completions}) == 3


def test_fake_server_lists_its_models(fake_openai):
    import openai

    async def go():
        async with openai.AsyncOpenAI(base_url=fake_openai.url, api_key="x", max_retries=0) as client:
            return [m.id async for m in client.models.list()]

    fake_openai.configure(models=["a-model", "b-model"])
    assert asyncio.run(go()) == ["a-model", "b-model"]


def test_probe_for_another_api_is_refused_before_sending(fake_openai):
    [error] = run_backend(fake_openai.url, parse_probe(COMPLETIONS_PROBE, "legacy.toml"), api="chat")
    assert error.kind == "bad_request" and "completions" in error.message
    assert fake_openai.received == []
