"""The ASGI app: OpenAI-compatible routes over one engine and its scheduler.

    POST /v1/chat/completions   POST /v1/completions
    GET  /v1/models             GET  /v1/models/{id}      GET /health

Every failure is an OpenAI-style error body ``{"error": {message, type, param, code}}``
with a 4xx/5xx status: bad JSON or parameters 400, unknown model 404, body not sent
within the body deadline 408, body too large 413, queue full 429 (with Retry-After),
request timeout 504, shutting down 503. Nothing a client sends reaches the engine
unvalidated, and no exception escapes a handler as anything but a 500 error body
(its traceback logged, rate-limited).

A client that disconnects while its request runs cancels it: the request leaves the
engine at the next step (``until_disconnected``). ``stream: true`` answers
``text/event-stream`` (the chunks: ``streaming.py``); refusals (bad parameters, a full
queue) are still error statuses, sent before the stream starts, and a client that
hangs up mid-stream aborts its requests the same way (``EventStream``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from local_backend.engine import Engine, RequestError
from local_backend.server import protocol, streaming
from local_backend.server.logs import RateLimiter
from local_backend.server.protocol import InvalidRequest, error_body
from local_backend.server.scheduler import (EngineFailed, QueueFull, Scheduler, ServerTimeout,
                                            ShuttingDown, fingerprint)


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


CLIENT_CLOSED = 499  # nginx's status for it; nobody reads the answer


async def until_disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Return when the client has gone. Called once the body is read, so the only
    message left for this request is ``http.disconnect``."""
    while (await receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # not expected; never spin


async def unless_disconnected(work: Awaitable[Any], receive: Callable[[], Awaitable[dict]]) -> Any:
    """``await work``, unless the client goes first: then ``work`` is cancelled (and has
    finished cancelling) and ClientGone is raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone()
    finally:
        task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


class EventStream(StreamingResponse):
    """Server-sent events, each sent as it comes, until the answer ends or the client
    hangs up: then the events are closed at once and ``on_close`` runs (it aborts their
    requests), also when the client left before the first event."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await unless_disconnected(self.stream_response(send), receive)
        except ClientGone:
            pass
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.on_close()


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


def create_app(engine: Engine, model_id: str, *, max_queue: int = 256, max_body_bytes: int = 1 << 20,
               request_timeout_s: float = 600.0, body_timeout_s: float = 60.0,
               log: RateLimiter | None = None,
               connection_stats: Callable[[], dict] | None = None,
               warm_up: dict | None = None) -> Starlette:
    """``warm_up``: what the start-up warm-up did (``main.warm_up``), shown by /health."""
    scheduler = Scheduler(engine, max_queue=max_queue, request_timeout_s=request_timeout_s)
    log = log or RateLimiter()
    system_fingerprint = fingerprint(engine)
    created = int(time.time())
    facts = engine.describe()

    async def read_json(request: HttpRequest):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise BodyTooLarge()
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise BodyTooLarge()
                chunks.append(chunk)

        await asyncio.wait_for(read(), body_timeout_s)  # a client that never finishes its body
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            raise InvalidRequest("We could not parse the JSON body of your request: send a "
                                 "JSON object (Content-Type: application/json)") from None

    async def complete(request: HttpRequest, api: str) -> Response:
        try:
            body = await read_json(request)
            parsed = protocol.parse(body, api, engine, model_id)
            if parsed.stream:  # admitted here: a refusal is still an error status
                stream = scheduler.open_stream(parsed.requests)
                return EventStream(streaming.answer(parsed, stream, engine, system_fingerprint,
                                                    log_internal_error), stream.close)
            results = await unless_disconnected(scheduler.generate(parsed.requests), request.receive)
        except (ClientGone, ClientDisconnect):
            return Response(status_code=CLIENT_CLOSED)
        except InvalidRequest as exc:
            return error(exc.status, exc.message, exc.kind, exc.param, exc.code)
        except RequestError as exc:  # the engine's own checks
            return error(400, str(exc))
        except BodyTooLarge:
            return error(413, f"the request body is larger than this server's limit of "
                              f"{max_body_bytes:,} bytes (--max-body-bytes)", code="request_too_large")
        except QueueFull as exc:
            return error(429, str(exc), "rate_limit_error", code="queue_full",
                         headers={"Retry-After": str(exc.retry_after_s)})
        except asyncio.TimeoutError:  # only the body read has this deadline
            return error(408, f"the request body did not arrive within {body_timeout_s:g} s "
                         "(--body-timeout)", "timeout_error", code="body_timeout",
                         headers={"connection": "close"})
        except ServerTimeout as exc:
            return error(504, str(exc), "timeout_error", code="timeout")
        except (ShuttingDown, EngineFailed) as exc:
            return error(503, str(exc), "server_error", code="unavailable")
        build = protocol.chat_response if api == "chat" else protocol.completions_response
        return JSONResponse(build(parsed, results, engine, system_fingerprint))

    async def chat_completions(request: HttpRequest) -> Response:
        return await complete(request, "chat")

    async def completions(request: HttpRequest) -> Response:
        return await complete(request, "completions")

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "detaudit",
                "system_fingerprint": system_fingerprint}

    async def models(request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: HttpRequest) -> Response:
        name = request.path_params["name"]
        if name != model_id:
            return error(404, f"The model `{name}` does not exist; this server serves `{model_id}`",
                         param="model", code="model_not_found")
        return JSONResponse(model_card())

    async def health(request: HttpRequest) -> Response:
        stats = scheduler.stats()
        status = 200 if stats["accepting"] else 503
        return JSONResponse({"status": "ok" if status == 200 else "unavailable",
                             "failure": scheduler.failure, "model": model_id,
                             "system_fingerprint": system_fingerprint,
                             "kernels": facts["kernels"], "dtype": facts["dtype"],
                             "device": facts["device"], "weights_sha256": facts["weights_sha256"],
                             "warm_up": warm_up,
                             **stats, **(connection_stats() if connection_stats else {})},
                            status_code=status)

    async def http_error(request: HttpRequest, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error(404, f"no route {request.method} {request.url.path}; this server has "
                         "/v1/chat/completions, /v1/completions, /v1/models and /health")
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    def log_internal_error(exc: Exception) -> None:
        if log.allow(f"internal error {type(exc).__name__}"):
            traceback.print_exception(exc, file=sys.stderr)

    async def internal_error(request: HttpRequest, exc: Exception) -> Response:
        log_internal_error(exc)
        return error(500, f"internal server error ({type(exc).__name__}); the server logged it",
                     "server_error")

    @asynccontextmanager
    async def lifespan(app: Starlette):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/completions", completions, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/v1/models/{name:path}", model, methods=["GET"]),
                Route("/health", health, methods=["GET"])],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan)
    app.state.scheduler = scheduler
    return app
