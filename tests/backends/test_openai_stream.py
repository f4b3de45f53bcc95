"""OpenAIBackend with ``stream = true``, through the official SDK, against a real HTTP
server on 127.0.0.1 that writes scripted server-sent events (tests/servers/sse_server.py):
chunks assembled with their number texts as sent, SSE framing the way the spec has it,
and every broken stream mapped to its error kind, retried or not, with no key in what
is stored. Streams of the real ``detaudit serve``: tests/serve/test_streaming.py."""

from __future__ import annotations

import json

import pytest

import detaudit
from detaudit.backends.base import BackendError
from detaudit.probes import Probe, load_probe, parse_probe
from detaudit.records import Completion
from detaudit.session import UsageProblem
from detaudit.store import RunStore
from detaudit.wire import request_body
from tests.servers.client import send
from tests.servers.sse_server import (DONE, Answer, SSEServer, chat_events, completions_events,
                                      event)

KEY = "sk-test-0123456789abcdefSTREAMKEY"
# Number texts in forms Python's repr would not write: kept as sent, or the test fails.
TOKENS = [("Heads", "-0.31326166e0"), (" up", "-1.0E-3"), ("!", "-0.0000012500")]


def streamed(probe: Probe | None = None) -> Probe:
    return (probe or load_probe("coin-flip")).with_overrides(stream=True)


@pytest.fixture
def sse():
    with SSEServer() as server:
        yield server


def texts(completion: Completion) -> list[str]:
    return [t for p in completion.positions for t in [p.logprob_text] + [x.logprob_text for x in p.top]]


def test_a_chat_stream_is_assembled_with_its_number_texts_as_sent(sse):
    sse.answers = [Answer(chat_events(TOKENS) + [DONE])]
    completion = send(sse.url, streamed())
    assert isinstance(completion, Completion), completion
    assert sse.received[0]["stream"] is True
    assert sse.received[0]["stream_options"] == {"include_usage": True}
    assert completion.text == "Heads up!" and completion.finish_reason == "stop"
    assert completion.model == "gpt-4o-mini" and completion.system_fingerprint == "fp_s1"
    assert [p.token for p in completion.positions] == ["Heads", " up", "!"]
    assert [p.logprob_text for p in completion.positions] == [lp for _, lp in TOKENS]
    assert texts(completion) == [t for _, lp in TOKENS for t in (lp, lp, "-1.3132617")]
    assert completion.positions[0].bytes == list(b"Heads")
    assert completion.extra["stream_chunks"] == len(TOKENS) + 3
    # raw: every chunk as received, as one JSON list ([DONE] is no chunk)
    chunks = json.loads(completion.raw)
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * (len(TOKENS) + 3)
    assert completion.raw == "[" + ",".join(e.decode()[6:-2] for e in chat_events(TOKENS)) + "]"


def test_a_completions_stream_is_assembled(sse):
    sse.answers = [Answer(completions_events(TOKENS) + [DONE])]
    probe = parse_probe('name = "legacy"\napi = "completions"\n[request]\nprompt = "Flip:"\n'
                        'max_tokens = 3\nlogprobs = true\ntop_logprobs = 1\nstream = true\n'
                        '[track]\noutcomes = ["Heads"]\n', "<test>")
    completion = send(sse.url, probe)
    assert isinstance(completion, Completion), completion
    assert sse.received[0]["logprobs"] == 1 and sse.received[0]["stream"] is True
    assert completion.text == "Heads up!" and completion.finish_reason == "length"
    assert [(p.token, p.logprob_text) for p in completion.positions] == TOKENS
    assert [[t.logprob_text for t in p.top] for p in completion.positions] == [[lp] for _, lp in TOKENS]


def test_sse_framing_follows_the_spec(sse):
    """CR LF and lone CR line ends, comments, a field without a space, a data field over
    two lines, a U+2028 inside a token (a line end to str.splitlines, not to SSE), and a
    body written one byte per HTTP chunk: the same completion."""
    tokens = [("Heads\u2028", "-0.5"), (" x", "-2.5")]
    good = chat_events(tokens)
    framed = [b": hello\r\n\r\n", good[0].replace(b"\n", b"\r\n"), good[1].replace(b"\n", b"\r"),
              good[2].replace(b"data: ", b"data:"), b"event: message\nid: 7\n" + good[3],
              good[4], DONE]
    body = b"".join(framed)
    sse.answers = [Answer([body[i:i + 1] for i in range(len(body))])]
    completion = send(sse.url, streamed())
    assert isinstance(completion, Completion), completion
    assert completion.text == "Heads\u2028 x"
    assert [p.logprob_text for p in completion.positions] == ["-0.5", "-2.5"]


def test_a_data_field_over_several_lines_is_joined_with_a_line_feed(sse):
    good = chat_events([("Heads", "-0.25")])
    # JSON allows a line feed between tokens: split the token chunk over two data lines
    split = good[1].replace(b',"logprobs"', b'\ndata: ,"logprobs"', 1)
    sse.answers = [Answer([good[0], split, *good[2:], DONE])]
    completion = send(sse.url, streamed())
    assert isinstance(completion, Completion), completion
    assert completion.positions[0].logprob_text == "-0.25"


def error_event(message: str, kind: str, code: int) -> bytes:
    return event(json.dumps({"error": {"message": message, "type": kind, "code": code}}))


BROKEN = [
    # (what the server sends, error kind, retryable, words in the message)
    (Answer(chat_events(TOKENS)[:3], end="cut"), "connection", True, "broke off (3 chunks had come)"),
    (Answer(chat_events(TOKENS)), "bad_response", True, "without data: [DONE]"),
    (Answer(chat_events(TOKENS)[:2] + [error_event("engine fell over", "server_error", 500), DONE]),
     "server_error", True, "an error event after 2 chunks: 'engine fell over'"),
    (Answer(chat_events(TOKENS)[:2] + [error_event("slow down", "rate_limit_error", 429), DONE]),
     "rate_limit", True, "slow down"),
    (Answer(chat_events(TOKENS)[:2] + [error_event("bad top_k", "BadRequestError", 400), DONE]),
     "bad_request", False, "bad top_k"),
    (Answer(chat_events(TOKENS)[:1] + [b"event: error\ndata: overloaded, try later\n\n", DONE]),
     "server_error", True, "overloaded, try later"),
    (Answer(chat_events(TOKENS)[:1] + [b"data: <html><body>502 Bad Gateway</body></html>\n\n", DONE]),
     "bad_response", True, "chunk 2 is not JSON"),
    (Answer(chat_events(TOKENS)[:1] + [b'data: ["a", "list"]\n\n', DONE]),
     "bad_response", True, "not a JSON object"),
    (Answer(chat_events(TOKENS)[:1] + [b"data: \xff\xfe\n\n", DONE]), "bad_response", True, "not UTF-8"),
    (Answer(chat_events(TOKENS)[:1] + [event('{"choices":[{"index":0,"delta":{"content":5}}]}'), DONE]),
     "bad_response", False, "unexpected chunk shape"),
    (Answer([event('{"id":"x","choices":[],"usage":null}'), DONE]), "bad_response", True, "no choices"),
    (Answer([b'{"choices":[{"message":{"content":"Heads"}}]}'], content_type="application/json"),
     "bad_response", False, "it does not stream"),
]


@pytest.mark.parametrize("answer, kind, retryable, words", BROKEN,
                         ids=[f"{b[1]}-{i}" for i, b in enumerate(BROKEN)])
def test_a_broken_stream_is_its_error_kind(sse, answer, kind, retryable, words):
    sse.answers = [answer]
    error = send(sse.url, streamed())
    assert isinstance(error, BackendError), error
    assert (error.kind, error.retryable) == (kind, retryable), error.message
    assert words in error.message and sse.url in error.message, error.message


def test_a_stream_without_logprobs_when_asked_is_no_logprobs(sse):
    chunks = [c.replace(b'"logprobs":{"content":', b'"logprobs":null,"x":{"content":')
              for c in chat_events(TOKENS)]
    sse.answers = [Answer(chunks + [DONE])]
    error = send(sse.url, streamed())
    assert isinstance(error, BackendError) and error.kind == "no_logprobs"


def test_a_stream_past_the_body_cap_stops_reading(sse):
    sse.answers = [Answer(chat_events(TOKENS * 200) + [DONE])]
    error = send(sse.url, streamed(), max_body_bytes=64 * 1024)
    assert isinstance(error, BackendError), error
    assert error.kind == "bad_response" and not error.retryable and "MiB" in error.message


def test_a_stream_that_never_ends_meets_the_request_timeout(sse):
    sse.answers = [Answer(chat_events(TOKENS)[:2], end="hang", delay=0.05)]
    error = send(sse.url, streamed(), timeout=1.0)
    assert isinstance(error, BackendError), error
    assert error.kind == "timeout" and error.retryable
    assert "within 1 s" in error.message and "(2 chunks had come)" in error.message


def test_a_cut_stream_is_retried_and_stored_with_what_came(sse, tmp_path):
    """The runner retries a cut stream; the failed attempt keeps the chunks that came."""
    sse.answers = [Answer(chat_events(TOKENS)[:3], end="cut"), Answer(chat_events(TOKENS) + [DONE])]
    probe_file = tmp_path / "stream.toml"
    probe_file.write_text(_coin_flip_text())
    run = detaudit.run(str(probe_file), model="gpt-4o-mini", base_url=sse.url, n=1,
                       out=tmp_path / "results", api_key_env="DETAUDIT_NO_KEY_SET",
                       max_attempts=2)
    with RunStore.open_read_only(run.path) as store:
        [sample] = store.samples()
        [failed] = store.failed_attempts()
    assert sample.status == "ok" and sample.attempts == 2
    assert sample.completion.text == "Heads up!"
    assert json.loads(sample.completion.raw)[1]["choices"][0]["delta"]["content"] == "Heads"
    assert failed["error_kind"] == "connection"
    assert [c["object"] for c in json.loads(failed["raw"])] == ["chat.completion.chunk"] * 3


def _coin_flip_text() -> str:
    from importlib import resources
    text = resources.files("probes").joinpath("coin-flip.toml").read_text()
    return text.replace("[request]", "[request]\nstream = true", 1)


def test_no_key_reaches_the_store_from_an_error_event(sse, tmp_path, monkeypatch):
    """The server echoes the Authorization header in its error event: neither the
    message nor the raw chunks the store keeps show the key."""
    monkeypatch.setenv("DETAUDIT_STREAM_KEY", KEY)
    sse.answers = [Answer(chat_events(TOKENS)[:2] + [
        event('{"error":{"message":"bad auth {AUTH}","type":"server_error","code":500}}'), DONE])]
    probe_file = tmp_path / "stream.toml"
    probe_file.write_text(_coin_flip_text())
    with pytest.raises(detaudit.RunFailed) as failed:
        detaudit.run(str(probe_file), model="gpt-4o-mini", base_url=sse.url, n=2,
                     out=tmp_path / "results", api_key_env="DETAUDIT_STREAM_KEY", max_attempts=2)
    assert sse.headers[0]["authorization"] == f"Bearer {KEY}"  # it was sent, and echoed
    stored = b"".join(p.read_bytes() for p in failed.value.run.path.rglob("*") if p.is_file())
    assert b"bad auth" in stored and b"error event" in stored
    assert KEY.encode() not in stored and KEY[-12:].encode() not in stored


# ---- the request side -----------------------------------------------------------------


def test_stream_is_a_probe_switch_and_asks_for_usage():
    probe = load_probe("coin-flip")
    on = probe.with_overrides(stream=True)
    body, _ = request_body(on.request, "chat", "m")
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    off = on.with_overrides(stream=False)
    assert "stream_options" not in request_body(off.request, "chat", "m")[0]
    own = parse_probe(_coin_flip_text().replace("stream = true", "stream = true\n"
                                                "stream_options = { include_usage = false }"), "<t>")
    assert request_body(own.request, "chat", "m")[0]["stream_options"] == {"include_usage": False}
    assert "stream_options" not in own.with_overrides(stream=False).request


@pytest.mark.parametrize("line, key", [
    ('stream = "yes"', "request.stream"),
    ("stream_options = { include_usage = true }", "request.stream_options"),
    ("stream = true\nstream_options = { include_usage = 1 }", "request.stream_options")])
def test_bad_stream_settings_name_the_key(line, key):
    from detaudit.probes import ProbeError
    text = _coin_flip_text().replace("stream = true", line)
    with pytest.raises(ProbeError, match=key):
        parse_probe(text, "<t>")


def test_the_in_process_engine_refuses_stream_before_it_starts(tmp_path):
    probe_file = tmp_path / "stream.toml"
    probe_file.write_text(_coin_flip_text())
    with pytest.raises(UsageProblem, match="needs an HTTP endpoint"):
        detaudit.run(str(probe_file), n=1, out=tmp_path)
    with pytest.raises(UsageProblem, match="needs an HTTP endpoint"):
        detaudit.run("coin-flip", n=1, out=tmp_path, stream=True)
