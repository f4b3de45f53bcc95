"""A streamed answer (``stream = true``) read back into the body of a whole answer.

The SDK sends the request (``client.post(..., stream=True)``: auth, headers, and HTTP
error statuses as for a whole answer) and hands back the raw response; its
server-sent events are read here, line by line from the bytes. The SDK's own stream
parser would build typed chunks with every number re-rendered as a float, and
detaudit keeps each logprob's JSON text as received: ``loads`` is the backend's JSON
reader that keeps number texts.

``StreamReader.read`` collects the chunks up to ``data: [DONE]``; ``body`` merges
choice 0 of them into the shape of a whole answer (chat: ``message.content`` and
``logprobs.content``; completions: ``text`` and the ``logprobs`` lists), which the
backend reads with the parser of whole bodies; ``raw`` is the chunks as received,
written as one JSON list. What is no good stream raises ``StreamFault`` with the
error kind and whether another attempt may help: an error event (``server_error``,
``rate_limit`` for a 429, ``bad_request`` for another 4xx), a chunk that is not JSON,
not UTF-8 or not an object (``bad_response``, retried as a transport fault), a stream
that ended without ``[DONE]`` (the same), chunks of an unexpected shape
(``bad_response``).
"""

from __future__ import annotations

import re
from typing import Any, AsyncIterator, Callable

from detaudit.redact import redact

DONE = "[DONE]"
_EOL = re.compile(rb"\r\n|\r|\n")  # SSE line ends; not str.splitlines', which splits U+2028 too


class StreamFault(Exception):
    """The stream is not a completion; ``kind`` and ``retryable`` as for BackendError."""

    def __init__(self, kind: str, message: str, retryable: bool):
        super().__init__(message)
        self.kind, self.retryable = kind, retryable


async def lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The lines of a byte stream, split at CR LF, LF or CR only (the SSE rule)."""
    pending = bytearray()
    async for chunk in chunks:
        scan = max(0, len(pending) - 1)  # pending holds no line end, but maybe a last CR
        pending += chunk
        start = 0
        for match in _EOL.finditer(pending, scan):
            if match.group() == b"\r" and match.end() == len(pending):
                break  # a CR LF may be cut between two reads
            yield bytes(pending[start:match.start()])
            start = match.end()
        del pending[:start]
    if pending:
        yield bytes(pending.removesuffix(b"\r"))


async def events(raw_lines: AsyncIterator[bytes]) -> AsyncIterator[tuple[str | None, str]]:
    """(event name, data) of each server-sent event: data lines joined by LF; comments,
    ids and retry hints skipped; a last event without its blank line still counts."""
    name: str | None = None
    data: list[str] = []
    first = True
    async for raw in raw_lines:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise StreamFault("bad_response", f"a line of the stream is not UTF-8: {_short(raw)}",
                              retryable=True) from None
        if first:
            line, first = line.removeprefix("\ufeff"), False
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
    if data:
        yield name, "\n".join(data)


class StreamReader:
    """The chunks of one streamed answer, as they arrive (so a failure can say how far
    it got and keep what came)."""

    def __init__(self, loads: Callable[[str], Any]):
        self._loads = loads
        self.texts: list[str] = []  # each event's data, as received
        self.chunks: list[dict[str, Any]] = []

    def raw(self) -> str:
        """The events' data as one JSON list (each chunk is one JSON text)."""
        return "[" + ",".join(self.texts) + "]"

    async def read(self, byte_chunks: AsyncIterator[bytes]) -> None:
        async for name, data in events(lines(byte_chunks)):
            if data.strip() == DONE:
                return
            self.texts.append(data)
            try:
                chunk = self._loads(data)
            except ValueError:
                if name == "error":
                    raise _error_event(data, self._got()) from None
                raise StreamFault("bad_response", f"chunk {len(self.texts)} is not JSON: "
                                  f"{_short(data)}", retryable=True) from None
            if name == "error" or (isinstance(chunk, dict) and "error" in chunk
                                   and not chunk.get("choices")):
                raise _error_event(chunk.get("error", chunk) if isinstance(chunk, dict) else chunk,
                                   self._got())
            if not isinstance(chunk, dict):
                raise StreamFault("bad_response", f"chunk {len(self.texts)} is not a JSON "
                                  f"object: {_short(data)}", retryable=True)
            self.chunks.append(chunk)
        raise StreamFault("bad_response", f"the stream ended after {self._got()} without "
                          "data: [DONE] (cut off?)", retryable=True)

    def _got(self) -> str:
        count = len(self.chunks)
        return f"{count} chunk{'s' if count != 1 else ''}"

    def fingerprints(self) -> list[str]:
        """Every distinct system_fingerprint the chunks named, in order."""
        seen: list[str] = []
        for chunk in self.chunks:
            value = chunk.get("system_fingerprint")
            if value is not None and str(value) not in seen:
                seen.append(str(value))
        return seen

    def body(self, api: str) -> dict[str, Any]:
        """Choice 0 of the chunks as the body of a whole answer."""
        try:
            return _merge(self.chunks, api)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise StreamFault("bad_response", f"unexpected chunk shape ({type(exc).__name__}: "
                              f"{exc})", retryable=False) from None


def _merge(chunks: list[dict[str, Any]], api: str) -> dict[str, Any]:
    chat = api == "chat"
    body: dict[str, Any] = {"object": "chat.completion" if chat else "text_completion"}
    text: list[str] = []
    finish = None
    seen = False
    content: list[Any] | None = None  # chat logprobs.content
    lists: dict[str, list[Any]] | None = None  # completions logprobs
    for chunk in chunks:
        for key in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(key) is not None:
                body.setdefault(key, chunk[key])
        if chunk.get("usage") is not None:
            body["usage"] = chunk["usage"]
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise TypeError(f"choices is {type(choices).__name__}, not a list")
        for choice in choices:
            if str(choice.get("index", 0)) != "0":
                continue  # the backend reads choice 0, as of a whole answer
            seen = True
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if piece is not None:
                if type(piece) is not str:  # noqa: E721 (a number is read as a str subclass)
                    raise TypeError(f"a text delta is {piece!r}, not a JSON string")
                text.append(piece)
            logprobs = choice.get("logprobs")
            if chat and isinstance(logprobs, dict) and logprobs.get("content") is not None:
                content = content if content is not None else []
                content.extend(logprobs["content"])
            elif not chat and isinstance(logprobs, dict) and logprobs.get("tokens") is not None:
                lists = lists or {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                  "text_offset": []}
                tokens = list(logprobs["tokens"])
                for key in lists:
                    values = logprobs.get(key)
                    lists[key] += list(values) if values is not None else [None] * len(tokens)
            if choice.get("finish_reason") is not None:
                finish = choice["finish_reason"]
    if not seen:
        body["choices"] = []
        return body
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                  "logprobs": None if content is None else {"content": content}}
    else:
        choice = {"index": 0, "text": "".join(text), "logprobs": lists}
    body["choices"] = [{**choice, "finish_reason": finish}]
    return body


def _error_event(error: Any, got: str) -> StreamFault:
    """An error sent mid-stream: its kind from its code (an HTTP status) or type."""
    message = error.get("message") if isinstance(error, dict) else error
    code = str(error.get("code")) if isinstance(error, dict) else ""
    kind_of = str(error.get("type")) if isinstance(error, dict) else ""
    text = f"an error event after {got}: {_short(str(message or error))}"
    if code == "429" or "rate_limit" in code or "rate_limit" in kind_of:
        return StreamFault("rate_limit", text, retryable=True)
    if code.isdigit() and 400 <= int(code) < 500 and int(code) not in (408, 409):
        return StreamFault("bad_request", text + "; the server rejected the request parameters",
                           retryable=False)
    return StreamFault("server_error", text, retryable=True)


def _short(text: str | bytes, limit: int = 160) -> str:
    """A piece of what came, for a message: redacted before it is cut."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = " ".join(redact(text).split())
    return repr(text if len(text) <= limit else text[:limit] + "...")
