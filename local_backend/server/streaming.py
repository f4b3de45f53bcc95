"""Streamed answers (``stream: true``) as vLLM and OpenAI write them: server-sent events,
one ``data: {chunk}`` each, then ``data: [DONE]``.

Chat, per choice: a chunk with the role (``delta: {"role": "assistant", "content": ""}``);
one chunk per generated token, ``delta.content`` the text it adds and
``logprobs.content`` its one entry (``protocol.chat_logprob``, as in the whole answer);
then a chunk with ``delta: {}`` (or the text still held back) and ``finish_reason``.
Completions: the same without the role chunk, with ``text`` and ``logprobs`` of one
token (``protocol.completions_logprobs``, ``text_offset`` counted over the whole
answer). With ``stream_options.include_usage``, a last chunk with ``choices: []`` and
``usage``. Every chunk carries the response's ``id``, ``object``
(``chat.completion.chunk`` | ``text_completion``), ``created``, ``model`` and
``system_fingerprint``; each chunk holds one choice, named by its ``index`` (n > 1
interleaves them as the steps make them).

The deltas of a choice join to exactly the whole answer's text: a token adds the text
of the tokens so far, cut at a stop string, less what may still change (an unfinished
UTF-8 character; the start of a stop string), which the next tokens or the last chunk
send. An error after the first byte (the request timeout, a shutdown, an engine fault)
is a chunk ``{"error": {...}}`` (OpenAI's error body) before ``[DONE]``, as on vLLM.
"""

from __future__ import annotations

import json
import time
from typing import AsyncIterator, Callable

from local_backend.engine import Engine, GeneratedToken, Result
from local_backend.server.protocol import (Parsed, chat_logprob, completions_logprobs, error_body,
                                           response_id, usage)
from local_backend.server.scheduler import (EngineFailed, ServerTimeout, ShuttingDown,
                                            TokenStream)

DONE = b"data: [DONE]\n\n"
_REPLACEMENT = "\ufffd"  # what decoding writes for bytes that may yet become a character


class TextDeltas:
    """The text each new token of one choice adds to what was sent."""

    def __init__(self, decode: Callable[[list[int]], str] | None, stops: list[str]):
        self._decode = decode  # the engine's: how the whole answer's text is made
        self._stops = stops
        self._ids: list[int] = []
        self.sent = ""

    def add(self, token_id: int) -> str:
        if self._decode is None:
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        cuts = [i for stop in self._stops if (i := text.find(stop)) >= 0]
        if cuts:  # the engine ends the answer here: this much is final
            return self._advance(text[:min(cuts)])
        text = text.rstrip(_REPLACEMENT)
        return self._advance(text[:len(text) - _stop_prefix(text, self._stops)])

    def finish(self, text: str) -> str:
        """The rest of the whole answer's ``text``."""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def _stop_prefix(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` may be the start of a stop string."""
    return max((k for stop in stops for k in range(len(stop) - 1, 0, -1) if text.endswith(stop[:k])),
               default=0)


class _Chunks:
    """The envelope every chunk of one response shares."""

    def __init__(self, parsed: Parsed, fingerprint: str):
        chat = parsed.api == "chat"
        self.head = {"id": response_id("chatcmpl" if chat else "cmpl"),
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": parsed.model,
                     "system_fingerprint": fingerprint}

    def __call__(self, choices: list[dict], **more: object) -> bytes:
        return event({**self.head, "choices": choices, **more})


def event(body: dict) -> bytes:
    """One server-sent event, written as Starlette writes JSON bodies."""
    text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


async def answer(parsed: Parsed, stream: TokenStream, engine: Engine, fingerprint: str,
                 on_internal_error: Callable[[Exception], None]) -> AsyncIterator[bytes]:
    """The events of one streamed response. Closing it (the client went away) or its end
    closes ``stream``, which aborts whatever the engine still runs for it."""
    chat = parsed.api == "chat"
    chunk = _Chunks(parsed, fingerprint)
    n = len(parsed.requests)
    decode = engine.tokenizer.decode if engine.tokenizer is not None else None
    deltas = [TextDeltas(decode, request.stop) for request in parsed.requests]
    offsets = [0] * n  # completions: where the next token starts in the token texts
    results: list[Result | None] = [None] * n
    failure = None
    try:
        if chat:
            for index in range(n):
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
        async for index, outcome in stream.events():
            if isinstance(outcome, GeneratedToken):
                text = deltas[index].add(outcome.token_id)
                if chat:
                    logprobs = ({"content": [chat_logprob(engine, outcome)], "refusal": None}
                                if parsed.logprobs else None)
                    choice = {"index": index, "delta": {"content": text}, "logprobs": logprobs,
                              "finish_reason": None}
                else:
                    logprobs = (completions_logprobs([outcome], offsets[index])
                                if parsed.logprobs else None)
                    offsets[index] += len(outcome.text)
                    choice = {"index": index, "text": text, "logprobs": logprobs,
                              "finish_reason": None}
                yield chunk([choice])
            else:
                results[index] = outcome
                rest = deltas[index].finish(outcome.text)
                if chat:
                    choice = {"index": index, "delta": {"content": rest} if rest else {},
                              "logprobs": None, "finish_reason": outcome.finish_reason}
                else:
                    choice = {"index": index, "text": rest, "logprobs": None,
                              "finish_reason": outcome.finish_reason}
                yield chunk([choice])
        if parsed.include_usage:
            yield chunk([], usage=usage(parsed, results))
    except ServerTimeout as exc:
        failure = error_body(str(exc), "timeout_error", code="timeout")
    except (ShuttingDown, EngineFailed) as exc:
        failure = error_body(str(exc), "server_error", code="unavailable")
    except Exception as exc:  # a bug: logged by the app; the client still hears of it
        on_internal_error(exc)
        failure = error_body(f"internal server error ({type(exc).__name__}); the server "
                             "logged it", "server_error")
    finally:
        stream.close()
    if failure is not None:
        yield event(failure)
    yield DONE
