"""The ASGI app: OpenAI-compatible routes over one engine and its scheduler.

    POST /v1/chat/completions   POST /v1/completions
    GET  /v1/models             GET  /v1/models/{id}      GET /health

Every failure is an OpenAI-style error body ``{"error": {message, type, param, code}}``
with a 4xx/5xx status: bad JSON or parameters 400, unknown model 404, body too large
413, queue full 429 (with Retry-After), request timeout 504, shutting down 503.
Nothing a client sends reaches the engine unvalidated, and no exception escapes a
handler as anything but a 500 error body.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from local_backend.engine import Engine, RequestError
from local_backend.server import protocol
from local_backend.server.protocol import InvalidRequest, error_body
from local_backend.server.scheduler import (EngineFailed, QueueFull, Scheduler, ServerTimeout,
                                            ShuttingDown, fingerprint)


class BodyTooLarge(Exception):
    pass


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


def create_app(engine: Engine, model_id: str, *, max_queue: int = 256, max_body_bytes: int = 1 << 20,
               request_timeout_s: float = 600.0) -> Starlette:
    scheduler = Scheduler(engine, max_queue=max_queue, request_timeout_s=request_timeout_s)
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

        await asyncio.wait_for(read(), request_timeout_s)  # a client that never finishes its body
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            raise InvalidRequest("We could not parse the JSON body of your request: send a "
                                 "JSON object (Content-Type: application/json)") from None

    async def complete(request: HttpRequest, api: str) -> Response:
        try:
            body = await read_json(request)
            parsed = protocol.parse(body, api, engine, model_id)
            results = await scheduler.generate(parsed.requests)
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
        except (ServerTimeout, asyncio.TimeoutError) as exc:
            return error(504, str(exc) or f"the request body did not arrive within "
                         f"{request_timeout_s:g} s", "timeout_error", code="timeout")
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
                             **stats}, status_code=status)

    async def http_error(request: HttpRequest, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error(404, f"no route {request.method} {request.url.path}; this server has "
                         "/v1/chat/completions, /v1/completions, /v1/models and /health")
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    async def internal_error(request: HttpRequest, exc: Exception) -> Response:
        traceback.print_exception(exc, file=sys.stderr)
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
