"""A real OpenAI-compatible HTTP server on 127.0.0.1, for tests and benchmarks.

It speaks ``POST /v1/chat/completions``, ``POST /v1/completions`` and
``GET /v1/models`` over HTTP/1.1 keep-alive, on raw asyncio streams in a background
thread (thousands of requests per second on loopback). What it answers is set per
test with ``configure``; everything it received and sent is logged, so a test can
check that every stored logprob is one the server really sent.

    with FakeOpenAI() as fake:
        fake.configure(states=outcome_states("Heads", [(-0.3132617, 3), (-0.31326166, 1)],
                                             alternatives={"T": -1.3132617}),
                       fingerprints=["fp_a", "fp_b"],
                       faults=[Fault("status", status=429, headers={"Retry-After": "2"}, on={0})])
        client = AsyncOpenAI(base_url=fake.url, api_key="sk-test")
        ...
        fake.sent[1]["logprobs"]    # the JSON number texts of every logprob it sent
        fake.received[0]["body"]    # the parsed request body

Answers: the server holds a list of ``State``s (candidate tokens and logprobs per
position); request number k gets the state at k in a weighted cycle (weights 3 and 1:
A A A B A A A B ...), so counts are exact, not random. The chosen token at each
position is the most likely candidate, as at temperature 0. Logprob numbers are
written in varied but valid JSON text (repr, 17 significant digits, exponent form),
all parsing to the same float, so that text preservation is tested.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any, Collection

FAULT_KINDS = ("status", "malformed_json", "html", "no_logprobs", "empty_choices", "slow", "drop",
               "huge", "error_200", "dribble")
SENTINEL = -9999.0  # what OpenAI sends for some tokens outside the top 20


@dataclass
class State:
    """One way the server can answer: candidates (token -> logprob) per position."""

    positions: list[dict[str, float]]
    weight: int = 1
    fingerprint: str | None = None  # overrides the fingerprint cycle for this state
    finish_reason: str = "stop"

    @property
    def chosen(self) -> list[str]:
        return [max(c, key=c.get) for c in self.positions]


@dataclass
class Fault:
    """An injected failure, for the request numbers in ``on`` (0-based, counting
    completion requests only) and/or a seeded random ``rate`` of requests.

    kinds: status (HTTP ``status`` with ``headers``, OpenAI error body with ``code``),
    malformed_json (truncated body, 200), html (an HTML error page with ``status``),
    no_logprobs (``logprobs: null``), empty_choices, slow (``delay`` seconds, then a
    normal answer), drop (the connection is closed without an answer), huge (a 200
    body of ``size`` bytes, announced by Content-Length, or streamed in chunks
    without it when ``chunked``), error_200 (an OpenAI error body with status 200),
    dribble (a normal answer, status line included, written one byte every ``delay``
    seconds: every read gets a byte in time, the whole answer takes for ever).
    ``echo_auth``: the error text (status, html, malformed_json, error_200) repeats
    the Authorization header the request carried, as careless proxies do."""

    kind: str
    on: Collection[int] | None = None
    rate: float = 0.0
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    code: str | None = None
    message: str = "injected fault"
    delay: float = 0.0
    size: int = 64 * 1024 * 1024
    chunked: bool = False
    echo_auth: bool = False

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; use one of {FAULT_KINDS}")


@dataclass
class Config:
    states: list[State]
    fingerprints: list[str | None] = field(default_factory=lambda: ["fp_fake0001"])
    models: list[str] = field(default_factory=lambda: ["gpt-4o-mini", "test-model"])
    faults: list[Fault] = field(default_factory=list)
    api_key: str | None = None  # when set, requests must carry it (401 otherwise)
    echo_key_in_errors: bool = True  # a 401 repeats the key it got, as careless servers do
    number_style: str = "varied"  # varied | repr
    floor_from: int | None = None  # top-k entries from this rank on are sent as -9999.0
    top_cap: int | None = None  # send at most this many top-k entries, whatever was asked
    delay: float = 0.0  # added to every answer
    seed: int = 0


def outcome_states(token: str, logprobs: list[tuple[float, int]],
                   alternatives: dict[str, float] | None = None) -> list[State]:
    """One-position states where ``token`` is chosen with each (logprob, weight)."""
    return [State([{token: value, **(alternatives or {})}], weight=weight)
            for value, weight in logprobs]


def default_states() -> list[State]:
    return outcome_states("Heads", [(-0.31326166, 3), (-0.3132617, 1)],
                          alternatives={"T": -1.3132617, "heads": -6.25})


class FakeOpenAI:
    """Start with ``start()`` (or ``with``); ``url`` is the base URL to give a client."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.port: int | None = None
        self.config = Config(states=default_states())
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self._count = itertools.count()
        self._rng = random.Random(0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def configure(self, **changes: Any) -> "FakeOpenAI":
        """Replace config fields (see ``Config``); logs and request numbers restart."""
        unknown = set(changes) - set(Config.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}")
        self.config = replace(self.config, **changes)
        self.reset()
        return self

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()
        self._count = itertools.count()
        self._rng = random.Random(self.config.seed)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "FakeOpenAI":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve_connection, self.host, 0, backlog=1024))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fake-openai", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def close(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- HTTP --------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, _version = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                response = await self._respond(method, target.split("?", 1)[0], headers, body)
                if response is None:  # fault "drop"
                    writer.transport.abort()
                    return
                if isinstance(response, (_Huge, _Dribble)):
                    await response.write(writer)
                    continue
                writer.write(response)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                asyncio.CancelledError, ValueError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _respond(self, method: str, path: str, headers: dict[str, str],
                       raw: bytes) -> bytes | None:
        config = self.config
        if method == "GET" and path.rstrip("/") == "/v1/models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                    for m in config.models]
            return _http(200, json.dumps({"object": "list", "data": data}).encode())
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            return _error(404, f"no route {method} {path}", "invalid_request_error", None)

        n = next(self._count)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.received.append({"n": n, "method": method, "path": path, "headers": headers,
                              "body": body, "raw": raw.decode("utf-8", "replace"),
                              "at": time.monotonic()})
        fault = self._fault_for(n, config)
        delay = config.delay + (fault.delay if fault and fault.kind == "slow" else 0.0)
        if delay:
            await asyncio.sleep(delay)

        problem = _check_request(body, path, headers, config)
        if problem is not None:
            return self._log(n, problem, [], None)
        if fault is not None and fault.kind not in ("slow",):
            return self._log(n, _fault_response(fault, body, path, headers), [], fault.kind)

        state_index = self._state_index(n, config)
        state = config.states[state_index]
        fingerprint = state.fingerprint or config.fingerprints[n % len(config.fingerprints)]
        numbers = _Numbers(config.number_style, n)
        if path == "/v1/chat/completions":
            text = _chat_body(body, state, fingerprint, config, numbers)
        else:
            text = _completions_body(body, state, fingerprint, config, numbers)
        self.sent.append({"n": n, "status": 200, "body": text, "logprobs": numbers.texts,
                          "fingerprint": fingerprint, "state": state_index, "fault": None})
        return _http(200, text.encode())

    def _log(self, n: int, response: Any, texts: list[str], fault: str | None):
        if isinstance(response, (_Huge, _Dribble)):
            self.sent.append({"n": n, "status": 200, "logprobs": [], "fault": fault,
                              "body": f"<{response.size:,} bytes>"})
            return response
        status = None if response is None else int(response.split(b" ", 2)[1])
        self.sent.append({"n": n, "status": status, "logprobs": texts, "fault": fault,
                          "body": None if response is None
                          else response.split(b"\r\n\r\n", 1)[1].decode("utf-8", "replace")})
        return response

    def _fault_for(self, n: int, config: Config) -> Fault | None:
        for fault in config.faults:
            if fault.on is not None and n in fault.on:
                return fault
            if fault.rate and self._rng.random() < fault.rate:
                return fault
        return None

    @staticmethod
    def _state_index(n: int, config: Config) -> int:
        cumulative = list(itertools.accumulate(s.weight for s in config.states))
        return bisect_right(cumulative, n % cumulative[-1])


# -- bodies ------------------------------------------------------------------------------


class _Numbers:
    """Writes logprobs as JSON number text, varying the form, and remembers each text."""

    def __init__(self, style: str, seed: int):
        self.style = style
        self.seed = seed
        self.texts: list[str] = []

    def __call__(self, value: float) -> str:
        if self.style == "repr" or not math.isfinite(value):
            text = json.dumps(value)  # repr, or -Infinity / NaN as Python's json writes them
        else:
            form = (self.seed + len(self.texts)) % 3
            text = repr(value) if form == 0 else format(value, ".17g") if form == 1 \
                else format(value, ".16e")
        self.texts.append(text)
        return text


def _top(candidates: dict[str, float], k: int, config: Config) -> list[tuple[str, float]]:
    """The k most likely candidates, padded with unlikely filler tokens."""
    if config.top_cap is not None:
        k = min(k, config.top_cap)
    ranked = sorted(candidates.items(), key=lambda kv: kv[1], reverse=True)[:k]
    lowest = ranked[-1][1] if ranked else 0.0
    ranked += [(f"alt{i}", lowest - 5.0 - i) for i in range(k - len(ranked))]
    if config.floor_from is not None:
        ranked = [(t, v if r < config.floor_from else SENTINEL) for r, (t, v) in enumerate(ranked)]
    return ranked


def _generated(body: dict[str, Any], state: State) -> tuple[list[int], str]:
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    count = min(limit, len(state.positions))
    return list(range(count)), "length" if count < len(state.positions) else state.finish_reason


def _chat_body(body: dict[str, Any], state: State, fingerprint: str | None, config: Config,
               numbers: _Numbers) -> str:
    chosen = state.chosen
    kept, finish = _generated(body, state)
    logprobs = "null"
    if body.get("logprobs"):
        k = int(body.get("top_logprobs") or 0)
        entries = []
        for p in kept:
            token = chosen[p]
            top = ",".join(
                f'{{"token":{json.dumps(t)},"logprob":{numbers(v)},"bytes":{list(t.encode())}}}'
                for t, v in _top(state.positions[p], k, config))
            entries.append(f'{{"token":{json.dumps(token)},"logprob":'
                           f'{numbers(state.positions[p][token])},'
                           f'"bytes":{list(token.encode())},"top_logprobs":[{top}]}}')
        logprobs = f'{{"content":[{",".join(entries)}],"refusal":null}}'
    text = "".join(chosen[p] for p in kept)
    message = f'{{"role":"assistant","content":{json.dumps(text)},"refusal":null}}'
    choice = (f'{{"index":0,"message":{message},"logprobs":{logprobs},'
              f'"finish_reason":"{finish}"}}')
    return (f'{{"id":"chatcmpl-fake","object":"chat.completion",'
            f'"created":{int(time.time())},"model":{json.dumps(body["model"])},'
            f'"choices":[{choice}],"usage":{{"prompt_tokens":12,"completion_tokens":{len(kept)},'
            f'"total_tokens":{12 + len(kept)}}},"system_fingerprint":{json.dumps(fingerprint)}}}')


def _completions_body(body: dict[str, Any], state: State, fingerprint: str | None,
                      config: Config, numbers: _Numbers) -> str:
    chosen = state.chosen
    kept, finish = _generated(body, state)
    text = "".join(chosen[p] for p in kept)
    logprobs = "null"
    k = body.get("logprobs")
    if k is not None and k is not False:
        tokens = [chosen[p] for p in kept]
        values = [numbers(state.positions[p][chosen[p]]) for p in kept]
        tops = ["{" + ",".join(f"{json.dumps(t)}:{numbers(v)}"
                               for t, v in _top(state.positions[p], int(k), config)) + "}"
                for p in kept]
        offsets = list(itertools.accumulate([0] + [len(t) for t in tokens[:-1]])) if tokens else []
        logprobs = (f'{{"tokens":{json.dumps(tokens)},"token_logprobs":[{",".join(values)}],'
                    f'"top_logprobs":[{",".join(tops)}],"text_offset":{offsets}}}')
    choice = (f'{{"text":{json.dumps(text)},"index":0,"logprobs":{logprobs},'
              f'"finish_reason":"{finish}"}}')
    return (f'{{"id":"cmpl-fake","object":"text_completion","created":{int(time.time())},'
            f'"model":{json.dumps(body["model"])},"choices":[{choice}],'
            f'"system_fingerprint":{json.dumps(fingerprint)}}}')


def _check_request(body: Any, path: str, headers: dict[str, str], config: Config) -> bytes | None:
    """The checks a real server makes; an error response, or None if the request is fine."""
    if config.api_key is not None:
        given = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if given != config.api_key:
            shown = given if config.echo_key_in_errors else "***"
            return _error(401, f"Incorrect API key provided: {shown}.",
                          "invalid_request_error", "invalid_api_key")
    if not isinstance(body, dict):
        return _error(400, "We could not parse the JSON body of your request.",
                      "invalid_request_error", None)
    model = body.get("model")
    if model not in config.models:
        return _error(404, f"The model `{model}` does not exist or you do not have access to it.",
                      "invalid_request_error", "model_not_found")
    if body.get("stream"):
        return _error(400, "this fake server does not stream", "invalid_request_error", None)
    if path == "/v1/chat/completions":
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "'messages' must be a non-empty array", "invalid_request_error", None)
        top = body.get("top_logprobs")
        if top is not None and (not isinstance(top, int) or not 0 <= top <= 20):
            return _error(400, "'top_logprobs' must be an integer from 0 to 20",
                          "invalid_request_error", None)
        if top and not body.get("logprobs"):
            return _error(400, "'logprobs' must be true when 'top_logprobs' is set",
                          "invalid_request_error", None)
    else:
        if not isinstance(body.get("prompt"), str):
            return _error(400, "'prompt' must be a string", "invalid_request_error", None)
        k = body.get("logprobs")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 20):
            return _error(400, "'logprobs' must be an integer from 0 to 20",
                          "invalid_request_error", None)
    return None


class _Huge:
    """A body too big to build in memory at once: written in 1 MiB pieces."""

    PIECE = b" " * (1 << 20)

    def __init__(self, fault: Fault):
        self.size, self.chunked = fault.size, fault.chunked

    async def write(self, writer: asyncio.StreamWriter) -> None:
        head = ["HTTP/1.1 200 OK", "content-type: application/json"]
        head.append("transfer-encoding: chunked" if self.chunked
                    else f"content-length: {self.size}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        left = self.size
        while left > 0:
            piece = self.PIECE[:min(left, len(self.PIECE))]
            left -= len(piece)
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if self.chunked else piece)
            await writer.drain()
        if self.chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()


class _Dribble:
    """A whole response written one byte at a time, ``delay`` seconds apart."""

    def __init__(self, response: bytes, delay: float):
        self.response, self.delay, self.size = response, delay, len(response)

    async def write(self, writer: asyncio.StreamWriter) -> None:
        for i in range(self.size):
            if writer.is_closing():
                return
            writer.write(self.response[i:i + 1])
            await writer.drain()
            await asyncio.sleep(self.delay)


def _fault_response(fault: Fault, body: dict[str, Any], path: str,
                    headers: dict[str, str]) -> bytes | _Huge | _Dribble | None:
    if fault.kind == "drop":
        return None
    if fault.kind == "huge":
        return _Huge(fault)
    message = fault.message
    if fault.echo_auth:
        auth = headers.get("authorization", "")
        message += f" (request had Authorization: {auth}; key {auth.removeprefix('Bearer ')})"
    if fault.kind == "status":
        return _error(fault.status, message, "server_error", fault.code, fault.headers)
    if fault.kind == "error_200":
        return _error(200, message, "server_error", fault.code, fault.headers)
    if fault.kind == "html":
        page = (f"<html><head><title>{fault.status} Error</title></head><body>"
                f"<h1>{fault.status} {message}</h1><hr><center>nginx</center></body></html>")
        return _http(fault.status, page.encode(), "text/html", fault.headers)
    state = State([{"Heads": -0.5}])
    numbers = _Numbers("repr", 0)
    good = (_chat_body if path == "/v1/chat/completions" else _completions_body)(
        body, state, "fp_fault", Config(states=[state]), numbers)
    if fault.kind == "dribble":
        return _Dribble(_http(200, good.encode()), fault.delay)
    if fault.kind == "malformed_json":
        cut = good[: len(good) // 2]
        if fault.echo_auth:  # a proxy's debug line, then the cut-off body
            cut = f"{message}\n{cut}"
        return _http(200, cut.encode(), headers=fault.headers)
    parsed = json.loads(good)
    if fault.kind == "no_logprobs":
        parsed["choices"][0]["logprobs"] = None
    else:  # empty_choices
        parsed["choices"] = []
    return _http(200, json.dumps(parsed).encode())


def _error(status: int, message: str, kind: str, code: str | None,
           headers: dict[str, str] | None = None) -> bytes:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return _http(status, json.dumps(body).encode(), headers=headers)


def _http(status: int, body: bytes, content_type: str = "application/json",
          headers: dict[str, str] | None = None) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", f"content-type: {content_type}",
             f"content-length: {len(body)}", "connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def same_text_states(tokens: list[str], vectors: int, at: int = 0, logprob: float = -0.25,
                     step: float = 2.0 ** -40) -> list[State]:
    """A server whose text never varies while its logprobs do: ``vectors`` states that
    all choose ``tokens``; the chosen token's logprob at position ``at`` moves by
    ``step`` from one state to the next (a last-bits change, as batch-dependent
    kernels make), every other number stays the same."""
    return [State([{token: logprob - (k * step if p == at else 0.0), f"alt{p}": logprob - 3.0}
                   for p, token in enumerate(tokens)]) for k in range(vectors)]
