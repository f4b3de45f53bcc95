"""``stream: true`` on a real ``detaudit serve``: server-sent events as vLLM writes them,
read raw and by the official openai client's own stream parser; the same text, tokens
and logprob bits as the whole answer (batch-invariant kernels); a hang-up aborts the
engine's work; the request timeout ends a stream with an error event; and ``detaudit
run`` with a streamed probe stores what the whole answers store, raw chunks kept."""

from __future__ import annotations

import json
import socket
import struct
import time

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detaudit.backends.base import BackendError
from detaudit.probes import load_probe
from detaudit.store import RunStore
from local_backend.config import resolve_model_dir
from local_backend.server.streaming import TextDeltas
from local_backend.tokenizer import Tokenizer
from tests.serve.conftest import COIN, ROOT, Server, detaudit, json_out
from tests.servers.client import send

pytestmark = pytest.mark.slow

STORY = [{"role": "user", "content": "Tell a short story about a lighthouse keeper."}]
PROMPT = "Once upon a time, a lighthouse keeper"


def bits(value: float) -> bytes:
    return struct.pack(">d", value)


def sse_chunks(response: httpx.Response) -> tuple[list[dict], list[str]]:
    """(the chunks, the data lines as sent) of a whole event-stream body; [DONE] last."""
    data = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    assert response.text.endswith("data: [DONE]\n\n")
    return [json.loads(d) for d in data[:-1]], data[:-1]


def post(server: Server, route: str, body: dict) -> httpx.Response:
    response = httpx.post(server.url + route, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def test_a_streamed_chat_answer_is_the_whole_answer_bit_for_bit(server_invariant):
    body = {"model": "tiny", "messages": STORY, "max_tokens": 10, "temperature": 0, "seed": 7,
            "logprobs": True, "top_logprobs": 5}
    whole = post(server_invariant, "/chat/completions", body).json()
    response = post(server_invariant, "/chat/completions",
                    {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks, _ = sse_chunks(response)

    choice = whole["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(chunks) == 1 + len(entries) + 1 + 1  # role, one per token, finish, usage
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == "tiny"
        assert chunk["id"] == chunks[0]["id"] and chunk["id"].startswith("chatcmpl-")
        assert chunk["created"] == chunks[0]["created"]
        assert chunk["system_fingerprint"] == whole["system_fingerprint"]
    role, tokens, finish, usage = chunks[0], chunks[1:-2], chunks[-2], chunks[-1]
    assert role["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}]
    streamed = [c["choices"][0]["logprobs"]["content"] for c in tokens]
    assert all(len(one) == 1 for one in streamed)
    assert [one[0] for one in streamed] == entries  # token, bytes, top_logprobs: equal
    for (got,), want in zip(streamed, entries):  # and the very float bits
        assert bits(got["logprob"]) == bits(want["logprob"])
        assert [bits(t["logprob"]) for t in got["top_logprobs"]] == \
               [bits(t["logprob"]) for t in want["top_logprobs"]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in tokens) == choice["message"]["content"]
    assert all(c["choices"][0]["finish_reason"] is None for c in tokens)
    assert finish["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert finish["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_a_streamed_completion_is_the_whole_answer_bit_for_bit(server_invariant):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 3}
    whole = post(server_invariant, "/completions", body).json()
    chunks, _ = sse_chunks(post(server_invariant, "/completions", {**body, "stream": True}))
    choice = whole["choices"][0]
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)
    tokens, finish = chunks[:-1], chunks[-1]  # no usage chunk unless asked
    assert len(tokens) == len(choice["logprobs"]["tokens"])
    merged = {key: [v for c in tokens for v in c["choices"][0]["logprobs"][key]]
              for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert merged == choice["logprobs"]  # text_offset counted over the whole answer
    assert [bits(v) for v in merged["token_logprobs"]] == \
           [bits(v) for v in choice["logprobs"]["token_logprobs"]]
    assert "".join(c["choices"][0]["text"] for c in tokens) == choice["text"]
    assert finish["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert "usage" not in finish


def test_the_openai_client_reads_the_stream_as_the_whole_answer(server_invariant):
    """The SDK's own stream parser takes every chunk (chat, completions, n = 2, usage)."""
    client = openai.OpenAI(base_url=server_invariant.url, api_key="unused", max_retries=0)
    args = dict(model="tiny", messages=STORY, max_tokens=6, temperature=1.0, seed=3, n=2,
                logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(type(c).__name__ == "ChatCompletionChunk" for c in chunks)
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        got = [lp for c in mine if c.logprobs for lp in c.logprobs.content]
        assert [(t.token, t.logprob, t.bytes, [(x.token, x.logprob) for x in t.top_logprobs])
                for t in got] == \
               [(t.token, t.logprob, t.bytes, [(x.token, x.logprob) for x in t.top_logprobs])
                for t in choice.logprobs.content]
        assert mine[-1].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage

    completions = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5,
                                            temperature=0, logprobs=2, stream=True)
    pieces = list(completions)
    whole_text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5,
                                           temperature=0, logprobs=2).choices[0].text
    assert "".join(p.choices[0].text for p in pieces) == whole_text
    assert pieces[-1].choices[0].finish_reason == "length"


def test_stop_strings_end_a_stream_where_they_end_the_whole_answer(server_default):
    """Deltas hold back what may be the start of a stop string, so the streamed text
    is the whole answer's, cut at the stop, for every seed."""
    for seed in range(4):
        body = {"model": "tiny", "messages": STORY, "max_tokens": 30, "temperature": 1.2,
                "seed": seed, "stop": [" the", "."]}
        whole = post(server_default, "/chat/completions", body).json()["choices"][0]
        chunks, _ = sse_chunks(post(server_default, "/chat/completions", {**body, "stream": True}))
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == whole["message"]["content"], seed
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(resolve_model_dir("tiny"))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_deltas_join_to_the_whole_text(tokenizer, data):
    """Any token sequence (UTF-8 characters split across tokens included), any stop
    strings: fed as the engine makes them (it stops at the token that completes a stop
    string), the deltas join to the text it answers, and no replacement character goes
    out for bytes that were still to come."""
    multibyte = [i for i in range(tokenizer.vocab_size) if tokenizer.token_bytes(i)[:1] >= b"\x80"]
    ids = data.draw(st.lists(st.sampled_from(multibyte) | st.integers(0, tokenizer.vocab_size - 1),
                             max_size=30))
    text = tokenizer.decode(ids)
    pieces = [text[i:i + 2] for i in range(0, len(text) - 1, 3)]
    stops = data.draw(st.lists((st.sampled_from(pieces) if pieces else st.just("zz"))
                               | st.text(min_size=1, max_size=3), max_size=2))
    stops = [s for s in stops if s]
    deltas = TextDeltas(tokenizer.decode, stops)
    sent, fed = [], []
    for token in ids:
        fed.append(token)
        sent.append(deltas.add(token))
        if any(s in tokenizer.decode(fed) for s in stops):
            break
    so_far = tokenizer.decode(fed)
    expected = so_far[:min([i for s in stops if (i := so_far.find(s)) >= 0], default=len(so_far))]
    sent.append(deltas.finish(expected))
    assert "".join(sent) == expected
    assert all("\ufffd" not in piece for piece in sent[:-1]) or "\ufffd" in expected


@pytest.fixture(scope="module")
def short_timeout():
    """A request timeout that 480 tokens cannot meet. (The hang-up tests use a server
    without one, so that only the hang-up can have ended their requests.)"""
    server = Server("--kernels", "default", "--max-batch", "4", "--request-timeout", "0.4")
    yield server
    assert server.stop() == 0


LONG = {"model": "tiny", "messages": COIN, "max_tokens": 480, "ignore_eos": True,
        "logprobs": True, "stream": True}


def wait_idle(server: Server, within_s: float = 5) -> dict:
    deadline = time.monotonic() + within_s
    while True:
        health = server.health()
        if (health["in_flight"], health["running"], health["waiting"]) == (0, 0, 0) \
                or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_a_client_that_hangs_up_mid_stream_aborts_its_choices(server_default):
    before = server_default.health()
    with httpx.stream("POST", server_default.url + "/chat/completions",
                      json={**LONG, "n": 2, "temperature": 1, "seed": 1}, timeout=30) as response:
        assert response.status_code == 200
        got = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                got.append(line)
            if len(got) == 6:  # two role chunks and a few tokens: then hang up
                break
    after = wait_idle(server_default)
    assert (after["in_flight"], after["running"], after["free_slots"]) == (0, 0, after["max_batch"])
    assert after["aborted"] - before["aborted"] == 2
    assert after["steps"] - before["steps"] < 300  # 480 tokens would need 480 steps


def test_a_client_that_hangs_up_before_the_first_event_aborts_too(server_default):
    before = server_default.health()
    data = json.dumps(LONG).encode()
    with socket.create_connection(server_default.address, timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    after = wait_idle(server_default)
    assert (after["in_flight"], after["running"]) == (0, 0)
    assert after["aborted"] - before["aborted"] == 1
    assert after["steps"] - before["steps"] < 300


def test_the_request_timeout_ends_a_stream_with_an_error_event(short_timeout):
    before = short_timeout.health()
    response = httpx.post(short_timeout.url + "/chat/completions", json=LONG, timeout=30)
    assert response.status_code == 200  # the stream had started
    chunks, _ = sse_chunks(response)
    assert chunks[-1]["error"]["code"] == "timeout" and "request timeout" in chunks[-1]["error"]["message"]
    assert 1 < len(chunks) < 480
    after = wait_idle(short_timeout)
    assert (after["in_flight"], after["running"]) == (0, 0)
    assert after["aborted"] - before["aborted"] == 1

    # the backend reads it as a server error, retried
    probe = load_probe("coin-flip").with_overrides(stream=True, max_tokens=480)
    probe.request["ignore_eos"] = True
    error = send(short_timeout.url, probe, model="tiny", api_key_env="DETAUDIT_NO_KEY_SET")
    assert isinstance(error, BackendError) and error.kind == "server_error" and error.retryable
    assert "error event" in error.message and "request timeout" in error.message


def test_refusals_come_before_the_stream_as_error_statuses(short_timeout):
    for body, param in [({**LONG, "max_tokens": 10**6}, "max_tokens"),
                        ({**LONG, "stream": "yes"}, "stream"),
                        ({**LONG, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
                        ({**LONG, "stream_options": {"continuous_usage_stats": True}},
                         "stream_options.continuous_usage_stats"),
                        ({**LONG, "stream": False, "stream_options": {"include_usage": True}},
                         "stream_options")]:
        response = httpx.post(short_timeout.url + "/chat/completions", json=body, timeout=30)
        assert response.status_code == 400, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["error"]["param"] == param


def test_detaudit_run_with_a_streamed_probe_stores_what_whole_answers_store(server_invariant, tmp_path):
    text = (ROOT / "probes" / "greedy-divergence.toml").read_text()
    assert "[request]" in text
    probe = tmp_path / "streamed.toml"
    probe.write_text(text.replace("[request]", "[request]\nstream = true", 1)
                     .replace("max_tokens = 100", "max_tokens = 8"))
    whole_probe = tmp_path / "whole.toml"
    whole_probe.write_text(text.replace("max_tokens = 100", "max_tokens = 8"))
    runs = {}
    for name, path in (("whole", whole_probe), ("streamed", probe)):
        runs[name] = json_out(detaudit("run", "--model", "tiny", "--base-url", server_invariant.url,
                                       "--probe", str(path), "--n", "3", "--concurrency", "3",
                                       "--quiet", "--json", "--out", str(tmp_path / name)))
    whole, streamed = runs["whole"], runs["streamed"]
    assert whole["ok"] == streamed["ok"] == 3
    assert streamed["tokens"] == whole["tokens"]  # the same distinct values, texts and all
    assert streamed["divergence"] == whole["divergence"]
    assert streamed["deterministic"] and whole["deterministic"]

    def samples(name: str):
        [folder] = (tmp_path / name).iterdir()
        with RunStore.open_read_only(folder) as store:
            return store.samples(), store.manifest
    (whole_samples, _), (streamed_samples, manifest) = samples("whole"), samples("streamed")
    assert manifest["probe"]["request"]["stream"] is True
    for a, b in zip(whole_samples, streamed_samples):
        assert (a.completion.text, a.completion.finish_reason, a.completion.positions) == \
               (b.completion.text, b.completion.finish_reason, b.completion.positions)
        chunks = json.loads(b.completion.raw)  # the raw chunks, kept
        assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * len(chunks)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
        assert b.completion.extra["stream_chunks"] == len(chunks) == 8 + 3
        raw_texts = [p.logprob_text for p in b.completion.positions]
        assert all(f'"logprob":{t}' in b.completion.raw for t in raw_texts)


def test_stream_flag_sets_the_probe_request():
    plan = json_out(detaudit("run", "--model", "gpt-4o-mini", "--stream", "--dry-run", "--json"))
    assert plan["request"]["stream"] is True
    plan = json_out(detaudit("run", "--model", "gpt-4o-mini", "--no-stream", "--dry-run", "--json"))
    assert plan["request"]["stream"] is False
