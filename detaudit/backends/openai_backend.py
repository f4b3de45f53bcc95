"""Any OpenAI-compatible API (OpenAI, vLLM, SGLang, llama.cpp, Ollama, hosted providers).

Requests go through the official SDK (``AsyncOpenAI``) with its retries off: the
runner retries, and counts attempts. Bodies are posted as built (``client.post``),
responses read raw and parsed here with ``json.loads``, keeping every number's JSON
text as received, so two logprobs are "distinct" only if the server really sent
distinct numbers, and so no pydantic model is built per response (the runner is meant
to keep up with a bare SDK loop). Nothing is cached: every call is a new request.

``timeout`` is an overall deadline per attempt (connect, send and every read), not
httpx's per-read timeout, so a server that dribbles a byte every few seconds cannot
hold a request for ever. A 200 whose body is not a completion at all (not JSON, cut
off, an ``{"error": ...}``, no choices) is a transport fault, retried like a 502.

A probe with ``stream = true`` is sent with ``stream_options.include_usage``
(``detaudit/wire.py``) and read as server-sent events (``openai_stream.py``): the
chunks' texts, logprobs (number texts as received), finish_reason, model and
fingerprint are assembled into the same Completion a whole answer gives, whose
``raw`` is the chunks as a JSON list. A stream cut off mid-way is a ``connection``
error, one that ends without ``[DONE]`` or sends a chunk that is not JSON a
``bad_response``, an error event a ``server_error`` (all retried).
"""

from __future__ import annotations

import asyncio
import email.utils
from dataclasses import replace
import ipaddress
import json
import os
import re
import time
from typing import Any
from urllib.parse import urlsplit

import openai

try:  # the HTTP stack the SDK sends with: httpx2 in openai >= 3, httpx before
    import httpx2 as _http
    _HttpClient = openai.DefaultAsyncHttpx2Client
except (ImportError, AttributeError):
    import httpx as _http
    _HttpClient = openai.DefaultAsyncHttpxClient

from detaudit.defaults import SENTINEL_LOGPROB
from detaudit import tokenization
from detaudit.backends.base import DEFAULT_REQUEST_TIMEOUT_S, BackendError
from detaudit.backends.openai_stream import StreamFault, StreamReader
from detaudit.probes import Probe
from detaudit.records import Completion, Position, TokenLogprob
from detaudit.redact import api_key_env_problem, redact, register
from detaudit.urls import BadBaseURL, check_base_url
from detaudit.wire import request_body

DEFAULT_BASE_URL = "https://api.openai.com/v1"
NO_KEY = "not-needed"  # what local servers get when no key is set; they ignore it
# The most of a response body that is read. 20 top logprobs for 4,096 tokens is about
# 9 MB; a body far beyond that is a broken proxy or server, and must not fill memory.
MAX_BODY_BYTES = 32 * 1024 * 1024
# How much of a body that was not a completion is kept in the failed-attempt log.
MAX_RAW_KEPT = 64 * 1024
NO_LOGPROBS_HINT = ("this server (or model) does not return logprobs; audit its text only "
                    "with --no-logprobs (or logprobs = false in the probe's [request])")


class OpenAIBackend:
    """One model behind one OpenAI-compatible base URL, via chat or legacy completions."""

    name = "openai"

    def __init__(self, model: str, base_url: str | None = None, *, api: str = "chat",
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
                 max_body_bytes: int = MAX_BODY_BYTES):
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', not {api!r}")
        self.model = model
        self.api = api
        url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        try:
            self.base_url = check_base_url(url)  # what messages and the manifest show
        except BadBaseURL as exc:
            raise BackendError("bad_request", str(exc)) from None
        if not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.timeout = float(timeout)
        self._key = _api_key(api_key_env, self.base_url)
        self.max_body_bytes = max_body_bytes
        http = _HttpClient(event_hooks={"response": [_body_cap(max_body_bytes)]})
        self._client = openai.AsyncOpenAI(base_url=url, api_key=self._key, max_retries=0,
                                          timeout=timeout, http_client=http)
        self._path = "/chat/completions" if api == "chat" else "/completions"

    # -- Backend -------------------------------------------------------------------------

    async def complete(self, probe: Probe, index: int) -> Completion:
        return (await self._send(probe, all_choices=False))[0]

    async def complete_choices(self, probe: Probe, index: int) -> list[Completion]:
        """Every choice of one request (the probe's ``n``), in the order the server sent them."""
        return await self._send(probe, all_choices=True)

    async def _send(self, probe: Probe, all_choices: bool) -> list[Completion]:
        if probe.api != self.api:
            raise BackendError("bad_request", f"probe {probe.name!r} uses the {probe.api} API "
                               f"but this backend was set up for {self.api}; create the "
                               "backend with api=probe.api")
        body, wants_logprobs = self._body(probe)
        top_k = _asked_top_k(body, self.api)
        if body.get("stream"):  # the chunks of choice 0
            return [await self._complete_streamed(body, wants_logprobs, top_k)]
        try:
            async with asyncio.timeout(self.timeout):  # the whole attempt, not each read
                response = await self._client.post(self._path, cast_to=_http.Response, body=body)
                content = response.content
        except Exception as exc:
            raise self._failure(exc) from None
        try:
            if not all_choices:
                return [parse_body(content, self.api, wants_logprobs, self.base_url, top_k=top_k)]
            return parse_choices(content, self.api, wants_logprobs, self.base_url, top_k)
        except BackendError as exc:
            if exc.retryable:  # a transport fault: its wait hint counts, as a 502's does
                exc.retry_after = retry_after_seconds(response.headers)
            raise

    async def _complete_streamed(self, body: dict[str, Any], wants_logprobs: bool,
                                 top_k: int) -> Completion:
        """``stream = true``: the SDK posts, the events are read raw (``openai_stream``),
        and choice 0 of the chunks is read as a whole body would be. ``raw`` keeps the
        chunks as received (a JSON list); a failure keeps the ones that came."""
        reader = StreamReader(read_json)
        try:
            async with asyncio.timeout(self.timeout):  # the whole stream, not each read
                response = await self._client.post(self._path, cast_to=_http.Response,
                                                   body=body, stream=True)
                try:
                    await self._read_stream(response, reader)
                finally:
                    await response.aclose()
            merged = reader.body(self.api)
        except StreamFault as fault:
            raise BackendError(fault.kind, f"bad stream from {self.base_url}: {fault}",
                               retryable=fault.retryable, status=200,
                               raw=_kept(reader.raw())) from None
        except BackendError:
            raise
        except Exception as exc:
            got = len(reader.chunks)
            raise self._failure(exc, f" ({got} chunk{'s' if got != 1 else ''} had come)",
                                _kept(reader.raw()) if reader.texts else None) from None
        completion = completion_of(merged, self.api, wants_logprobs, self.base_url, top_k,
                                   reader.raw())
        completion.extra["stream_chunks"] = len(reader.chunks)
        fingerprints = reader.fingerprints()
        if len(fingerprints) > 1:  # one answer, computed by more than one configuration
            completion.extra["stream_system_fingerprints"] = fingerprints
        return completion

    async def _read_stream(self, response: Any, reader: StreamReader) -> None:
        kind = response.headers.get("content-type", "")
        if kind.split(";")[0].strip().endswith("json"):  # a whole answer: no stream here
            await response.aread()
            raise BackendError("bad_response", f"{self.base_url} answered stream = true with "
                               f"{kind}, not text/event-stream: it does not stream; drop "
                               "stream from the probe's [request]", status=response.status_code,
                               raw=_kept(response.text))
        await reader.read(response.aiter_bytes())

    def _failure(self, exc: Exception, got: str = "", raw: str | None = None) -> BackendError:
        """The BackendError for what the SDK or its HTTP stack raised; ``got`` says how
        much of a stream had come, ``raw`` is what it was."""
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, (TimeoutError, openai.APITimeoutError, _http.TimeoutException)):
            return BackendError("timeout", f"no complete answer from {self.base_url} within "
                                f"{self.timeout:g} s (--request-timeout){got}", retryable=True,
                                raw=raw)
        cause = (exc.__cause__ or exc) if isinstance(exc, openai.APIConnectionError) else exc
        if isinstance(cause, BodyTooLarge):
            return _bad(self.base_url, str(cause))
        if isinstance(exc, openai.APIConnectionError):
            return BackendError("connection", f"could not reach {self.base_url}: "
                                f"{type(cause).__name__}: {cause}", retryable=True)
        if isinstance(exc, _http.TransportError):  # while a stream was read
            return BackendError("connection", f"the stream from {self.base_url} broke off{got}: "
                                f"{type(exc).__name__}: {exc}", retryable=True, raw=raw)
        if isinstance(exc, openai.APIStatusError):
            return self._status_error(exc)
        if isinstance(exc, openai.OpenAIError):
            return BackendError("bad_response",
                                f"{self.base_url}: {type(exc).__name__}: {exc}")
        raise exc

    def first_token(self, text: str) -> str | None:
        return tokenization.first_token(text, self.model)

    def describe(self) -> dict[str, Any]:
        return {"type": "openai", "base_url": self.base_url, "api": self.api,
                "model": self.model, "sdk_version": openai.__version__}

    async def aclose(self) -> None:
        await self._client.close()

    # -- requests ------------------------------------------------------------------------

    def _body(self, probe: Probe) -> tuple[dict[str, Any], bool]:
        """The request body, and whether logprobs were asked for.

        The body is ``wire.request_body`` (the in-process engine reads the same), posted
        as it is through the SDK's client (auth, headers, errors as for ``create``):
        it is already the wire format, so the SDK's per-call walk of its typed
        parameters (the largest client cost per request) is skipped. Parameters the
        SDK does not name (e.g. vLLM's ``top_k``) are sent like any other."""
        return request_body(probe.request, self.api, self.model)

    def _status_error(self, exc: openai.APIStatusError) -> BackendError:
        status = exc.status_code
        server_says, code = _server_message(exc.response)
        where = f"HTTP {status} from {self.base_url}"
        retry_after = retry_after_seconds(exc.response.headers)
        raw = _kept(exc.response.text)

        def error(kind: str, message: str, **kwargs: Any) -> BackendError:
            # BackendError redacts message and body; the body goes to the failed-attempt log
            return BackendError(kind, message, status=status, raw=raw, **kwargs)

        if status == 429:
            if code == "insufficient_quota":
                return error("rate_limit", f"{where}: quota exhausted ({server_says}); "
                             "check the account's billing")
            return error("rate_limit", f"{where}: rate limited ({server_says})",
                         retryable=True, retry_after=retry_after)
        if status in (408, 409) or status >= 500:
            return error("server_error", f"{where}: {server_says}", retryable=True,
                         retry_after=retry_after)
        if status in (401, 403):
            return error("auth", f"{where}: {server_says}; check the API key "
                         "(or that this key may use this model)")
        if status == 404:
            if code == "model_not_found" or "model" in server_says.lower():
                hint = (f"model {self.model!r} is not served there "
                        f"(GET {self.base_url}/models lists the ones that are)")
            else:
                hint = "is the base URL right? OpenAI-compatible servers usually end in /v1"
            return error("not_found", f"{where}: {server_says}; {hint}")
        return error("bad_request", f"{where}: {server_says}; the server rejected the "
                     "request parameters (check the probe's [request] table)")


# -- responses -----------------------------------------------------------------------------


class BodyTooLarge(Exception):
    """A response body passed the size cap; reading stopped there."""


def _body_cap(limit: int):
    """An httpx response hook that stops reading a body past ``limit`` bytes: at once
    when Content-Length says so, else while the body streams in."""

    async def hook(response: Any) -> None:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(_too_large(int(declared), limit))
        response.stream = _CappedStream(response.stream, limit)

    return hook


def _too_large(size: int, limit: int) -> str:
    return (f"the response body is over {limit / 2**20:g} MiB ({size:,} bytes or more); "
            "not a completion (a broken proxy or server?)")


class _CappedStream(_http.AsyncByteStream):
    def __init__(self, stream: Any, limit: int):
        self._stream, self._limit = stream, limit

    async def __aiter__(self):
        total = 0
        async for chunk in self._stream:
            total += len(chunk)
            if total > self._limit:
                raise BodyTooLarge(_too_large(total, self._limit))
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


def _asked_top_k(params: dict[str, Any], api: str) -> int:
    """How many top logprobs the request asked for per position."""
    if api == "completions":
        k = params.get("logprobs")
    else:
        k = params.get("top_logprobs") if params.get("logprobs") else 0
    return k if isinstance(k, int) and not isinstance(k, bool) else 0


class _NumberText(str):
    """A JSON number, kept as the exact text the server sent."""


def parse_choices(content: bytes, api: str, wants_logprobs: bool, source: str,
                  top_k: int = 0) -> list[Completion]:
    """Every choice of a response body (an ``n > 1`` request), as ``parse_body`` reads one."""
    first = parse_body(content, api, wants_logprobs, source, top_k)
    body, raw = read_json(content), content.decode("utf-8", errors="replace")
    return [first] + [completion_of(body, api, wants_logprobs, source, top_k, raw, choice=i)
                      for i in range(1, len(body["choices"]))]


def parse_body(content: bytes, api: str, wants_logprobs: bool, source: str,
               top_k: int = 0, choice: int = 0) -> Completion:
    """A response body -> Completion; BackendError("bad_response") if it is not a
    completion (HTML page, truncated JSON, no choices, no logprobs when asked).
    A body that is no completion at all (not JSON, not an object, an error, no
    choices) is a transport fault: retryable, its text kept in ``raw``.

    Top-k entries sent as the -9999.0 sentinel are not logprobs: they are left out of
    ``top`` (the token then counts as missing) and counted in
    ``extra["sentinel_logprobs"]``; ``raw`` keeps them. Fewer top entries than the
    ``top_k`` asked for are noted in ``extra["top_logprobs_short"]`` (the fewest).
    ``choice``: which of the response's choices to read (an ``n > 1`` request)."""
    raw = content.decode("utf-8", errors="replace")
    try:
        body = read_json(content)
    except ValueError:
        raise _transport_fault(source, f"the body is not JSON: {_snippet(raw)!r}", raw) from None
    return completion_of(body, api, wants_logprobs, source, top_k, raw, choice)


def read_json(content: bytes | str) -> Any:
    """JSON with every number kept as the exact text the server sent (``_number``)."""
    return json.loads(content, parse_float=_NumberText, parse_int=_NumberText,
                      parse_constant=_NumberText)


def completion_of(body: Any, api: str, wants_logprobs: bool, source: str, top_k: int,
                  raw: str, choice: int = 0) -> Completion:
    """A body read by ``read_json`` (a whole answer, or a stream's chunks merged into
    one) -> Completion of its choice ``choice``; ``raw`` is what is stored as received."""
    if not isinstance(body, dict):
        raise _transport_fault(source, f"the body is not a JSON object: {_snippet(raw)!r}", raw)
    if "error" in body and "choices" not in body:
        raise _transport_fault(source, f"an error came back with status 200: {_snippet(raw)!r}",
                               raw)
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _transport_fault(source, "the response has no choices", raw)
    if choice >= len(choices):
        raise _bad(source, f"choice {choice} was asked for, but the response has {len(choices)}")
    picked = choices[choice]
    try:
        if api == "chat":
            text = (picked.get("message") or {}).get("content") or ""
            positions = _chat_positions(picked.get("logprobs"), wants_logprobs, source)
        else:
            text = picked.get("text") or ""
            positions = _completions_positions(picked.get("logprobs"), wants_logprobs, source)
        finish_reason = picked.get("finish_reason")
        model, fingerprint = body.get("model"), body.get("system_fingerprint")
        if not isinstance(text, str):
            raise TypeError(f"the answer text is {type(text).__name__}, not a string")
    except (AttributeError, KeyError, TypeError, IndexError, ValueError) as exc:
        raise _bad(source, f"unexpected response shape ({type(exc).__name__}: {exc})") from None
    extra: dict[str, Any] = {}
    fewest = min((len(p.top) for p in positions), default=top_k)
    if fewest < top_k:
        extra["top_logprobs_short"] = fewest
    floor = sum(t.logprob == SENTINEL_LOGPROB for pos in positions for t in pos.top)
    if floor:
        extra["sentinel_logprobs"] = floor  # top-k entries sent as -9999.0, not real values
        positions = [replace(pos, top=[t for t in pos.top if t.logprob != SENTINEL_LOGPROB])
                     for pos in positions]
    return Completion(text=text, finish_reason=_text_or_none(finish_reason), positions=positions,
                      model=_text_or_none(model), system_fingerprint=_text_or_none(fingerprint),
                      extra=extra, raw=raw)


def _text_or_none(value: Any) -> str | None:
    """A string field of the body; anything else (a number read as text...) as text."""
    return None if value is None else str(value)


def _chat_positions(logprobs: Any, wanted: bool, source: str) -> list[Position]:
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if content is None:
        if wanted:
            raise _missing_logprobs(source)
        return []
    positions = []
    for item in content:
        top = [TokenLogprob(_token(t["token"], source), *_number(t["logprob"], source),
                            _bytes(t.get("bytes")))
               for t in item.get("top_logprobs") or []]
        value, text = _number(item["logprob"], source)
        positions.append(Position(_token(item["token"], source), value, text, top,
                                  _bytes(item.get("bytes"))))
    return positions


def _completions_positions(logprobs: Any, wanted: bool, source: str) -> list[Position]:
    if not isinstance(logprobs, dict) or logprobs.get("tokens") is None:
        if wanted:
            raise _missing_logprobs(source)
        return []
    tops = logprobs.get("top_logprobs") or []
    positions = []
    for i, (token, value) in enumerate(zip(logprobs["tokens"], logprobs["token_logprobs"])):
        top = tops[i] if i < len(tops) and tops[i] else {}
        positions.append(Position(_token(token, source), *_number(value, source), [
            TokenLogprob(t, *_number(v, source)) for t, v in top.items()]))
    return positions


def _number(value: Any, source: str) -> tuple[float, str]:
    """(logprob, logprob_text): the float, and the JSON text it was read from."""
    if value.__class__ is not _NumberText:
        raise _bad(source, f"a logprob is {value!r}, not a JSON number")
    return float(value), str.__str__(value)


def _token(value: Any, source: str) -> str:
    if not isinstance(value, str) or isinstance(value, _NumberText):
        raise _bad(source, f"a token is {value!r}, not a JSON string")
    return value


def _bytes(value: Any) -> list[int] | None:
    """A token's UTF-8 bytes (every JSON number was read as text, these included)."""
    return None if value is None else list(map(int, value))


def _missing_logprobs(source: str) -> BackendError:
    """Its own kind: not a broken body but a server without logprobs, which every
    further request would meet too (the runner stops at once; see ``runner.FATAL_KINDS``)."""
    return BackendError("no_logprobs", f"{source} returned no logprobs though the request asked "
                        f"for them: {NO_LOGPROBS_HINT}")


def _bad(source: str, message: str) -> BackendError:
    return BackendError("bad_response", f"bad response from {source}: {message}")


def _transport_fault(source: str, message: str, raw: str) -> BackendError:
    """A 200 that is not a completion: a proxy's page, a cut-off body. Retried like a 502."""
    return BackendError("bad_response", f"bad response from {source}: {message}",
                        retryable=True, status=200, raw=_kept(raw))


def _kept(raw: str) -> str:
    """The part of a body that the failed-attempt log keeps."""
    if len(raw) <= MAX_RAW_KEPT:
        return raw
    return raw[:MAX_RAW_KEPT] + f"... ({len(raw):,} characters in all)"


def _snippet(text: str, limit: int = 160) -> str:
    text = redact(text)  # before cutting, so no piece of a secret survives the cut
    text = re.sub(r"<[^>]*>", " ", text)  # an HTML error page reads better as its text
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _server_message(response: Any) -> tuple[str, str | None]:
    """What the server said went wrong (OpenAI error body, or the page's text), and its code."""
    try:
        error = json.loads(response.content).get("error")
        if isinstance(error, dict):
            return str(error.get("message") or "(no message)"), error.get("code")
        if isinstance(error, str):
            return error, None
    except (ValueError, AttributeError):
        pass
    return _snippet(response.text) or "(empty body)", None


def retry_after_seconds(headers: Any) -> float | None:
    """The server's wait hint: ``retry-after-ms``, or ``Retry-After`` in seconds or as
    an HTTP date; None if absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# -- configuration -------------------------------------------------------------------------


def _api_key(env_name: str, base_url: str) -> str:
    problem = api_key_env_problem(env_name)
    if problem:
        raise BackendError("auth", problem)
    key = os.environ.get(env_name, "").strip()
    if key:
        register(key)  # from here on, no message can show it
        return key
    if is_local(base_url):
        return NO_KEY
    raise BackendError("auth", f"no API key for {base_url}: the environment variable "
                       f"{env_name} is not set. Set it (export {env_name}=...) or name "
                       "another variable that holds the key.")


def is_local(base_url: str) -> bool:
    """Loopback, private-network or single-label hosts: servers that need no key."""
    host = urlsplit(base_url).hostname or ""
    if host == "localhost" or host.endswith(".localhost") or "." not in host and ":" not in host:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.endswith(".local")
    return address.is_loopback or address.is_private or address.is_unspecified
