"""A real HTTP/1.1 server on 127.0.0.1 that answers every POST with a scripted stream of
server-sent events: good streams written byte by byte as a test says, and the broken
ones real servers and proxies send (cut mid-body, no ``[DONE]``, an error event, a
chunk that is not JSON, JSON where a stream was asked for, a stream that never ends).

    with SSEServer() as server:
        server.answers = [Answer(chat_events([("Heads", "-0.3132617")])[:2], end="cut"),
                          Answer(chat_events([("Heads", "-0.3132617")]) + [DONE])]
        ...                     # request k gets answers[k] (the last one repeats)
        server.received[0]      # the parsed request body
        server.headers[0]       # its headers (lower-case names)

Each piece of an answer is written as one HTTP chunk, ``delay`` seconds apart; the
bytes ``{AUTH}`` in a piece are replaced by the request's Authorization header, as a
careless server would echo it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

DONE = b"data: [DONE]\n\n"


@dataclass
class Answer:
    """``end``: ``done`` (the body ends cleanly), ``cut`` (the connection closes
    mid-body), ``hang`` (a comment line every ``delay`` seconds, for ever)."""

    pieces: list[bytes] = field(default_factory=list)
    end: str = "done"
    status: int = 200
    content_type: str = "text/event-stream"
    delay: float = 0.0


def event(text: str) -> bytes:
    return b"data: " + text.encode() + b"\n\n"


def _head(model: str, fingerprint: str | None, kind: str) -> str:
    fp = "null" if fingerprint is None else json.dumps(fingerprint)
    return (f'"id":"chatcmpl-s1","object":"{kind}","created":1700000000,'
            f'"model":{json.dumps(model)},"system_fingerprint":{fp}')


def chat_events(tokens: list[tuple[str, str]], *, model: str = "gpt-4o-mini",
                fingerprint: str | None = "fp_s1", finish: str = "stop", alternative: str = "T",
                alternative_logprob: str = "-1.3132617", usage: bool = True) -> list[bytes]:
    """A good chat stream without its [DONE]: the role chunk, one chunk per (token,
    logprob text) with top_logprobs (the token and ``alternative``), the finish chunk,
    the usage chunk. Logprob texts go out exactly as given."""
    head = _head(model, fingerprint, "chat.completion.chunk")
    out = [event('{' + head + ',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                 '"logprobs":null,"finish_reason":null}]}')]
    for token, logprob in tokens:
        entry = (f'{{"token":{json.dumps(token)},"logprob":{logprob},"bytes":'
                 f'{json.dumps(list(token.encode()))},"top_logprobs":['
                 f'{{"token":{json.dumps(token)},"logprob":{logprob},"bytes":null}},'
                 f'{{"token":{json.dumps(alternative)},"logprob":{alternative_logprob},"bytes":null}}]}}')
        out.append(event('{' + head + ',"choices":[{"index":0,"delta":{"content":'
                         + json.dumps(token, ensure_ascii=False) + '},"logprobs":{"content":['
                         + entry + ']},"finish_reason":null}]}'))
    out.append(event('{' + head + f',"choices":[{{"index":0,"delta":{{}},"logprobs":null,'
                     f'"finish_reason":"{finish}"}}]}}'))
    if usage:
        out.append(event('{' + head + f',"choices":[],"usage":{{"prompt_tokens":9,'
                         f'"completion_tokens":{len(tokens)},"total_tokens":{9 + len(tokens)}}}}}'))
    return out


def completions_events(tokens: list[tuple[str, str]], *, model: str = "gpt-4o-mini",
                       finish: str = "length") -> list[bytes]:
    """A good legacy-completions stream without its [DONE]: one chunk per token, the
    finish chunk, the usage chunk."""
    head = _head(model, "fp_s1", "text_completion")
    out, offset = [], 0
    for token, logprob in tokens:
        out.append(event('{' + head + f',"choices":[{{"index":0,"text":{json.dumps(token)},'
                         f'"logprobs":{{"tokens":[{json.dumps(token)}],"token_logprobs":[{logprob}],'
                         f'"top_logprobs":[{{{json.dumps(token)}:{logprob}}}],'
                         f'"text_offset":[{offset}]}},"finish_reason":null}}]}}'))
        offset += len(token)
    out.append(event('{' + head + f',"choices":[{{"index":0,"text":"","logprobs":null,'
                     f'"finish_reason":"{finish}"}}]}}'))
    out.append(event('{' + head + ',"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":'
                     f'{len(tokens)},"total_tokens":{3 + len(tokens)}}}}}'))
    return out


class SSEServer:
    def __init__(self):
        self.answers: list[Answer] = [Answer(chat_events([("Heads", "-0.3132617")]) + [DONE])]
        self.received: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._started.wait(10)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip()
                           for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.received.append(json.loads(body))
                self.headers.append(headers)
                answer = self.answers[min(len(self.received), len(self.answers)) - 1]
                if not await self._answer(answer, headers, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._tasks.discard(asyncio.current_task())

    async def _answer(self, answer: Answer, headers: dict[str, str],
                      writer: asyncio.StreamWriter) -> bool:
        """Write one answer; False when the connection is to close."""
        writer.write(f"HTTP/1.1 {answer.status} X\r\ncontent-type: {answer.content_type}\r\n"
                     "transfer-encoding: chunked\r\n\r\n".encode())
        auth = headers.get("authorization", "").encode()
        for piece in answer.pieces:
            piece = piece.replace(b"{AUTH}", auth)
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            if answer.delay:
                await asyncio.sleep(answer.delay)
        if answer.end == "cut":
            return False
        while answer.end == "hang":
            writer.write(b"%x\r\n%s\r\n" % (len(b": waiting\n\n"), b": waiting\n\n"))
            await writer.drain()
            await asyncio.sleep(answer.delay or 0.05)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "SSEServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
