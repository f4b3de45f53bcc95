"""Run the app under uvicorn on one host and port, with a clean shutdown.

Start-up: bind the port (a taken port fails before any slow step), warm the engine up
(``Engine.warm_up``: on a GPU every matmul kernel compiled and every decode graph
captured, so no request pays for either), freeze the start-up objects out of the
collector (``gc_tuning``), then listen and say so. /health's ``warm_up`` tells what the
warm-up did.

SIGTERM or Ctrl-C: stop accepting connections and new requests, let in-flight
requests finish for up to ``shutdown_grace_s``, answer the rest with 503, stop the
engine thread, exit. SIGTERM exits 0 (a supervisor asked for it); Ctrl-C raises
KeyboardInterrupt afterwards, for the usual 130. A second Ctrl-C forces the exit.

Connections go through ``connections.GuardedProtocol`` (bounded count, header
deadline); uvicorn's and asyncio's error logs go through one rate limiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import socket
import sys
import time
from typing import Callable

import uvicorn

from local_backend.engine import Engine
from local_backend.gc_tuning import freeze_startup_objects
from local_backend.server.app import create_app
from local_backend.server.connections import (ACCEPT_BATCH, LISTEN_QUEUE, ConnectionGuard,
                                                GuardedProtocol, fit_to_file_limit)
from local_backend.server.logs import RateLimiter
from local_backend.server.scheduler import fingerprint


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None], grace_s: float,
                 log: RateLimiter):
        super().__init__(config)
        self.on_ready = on_ready
        self.grace_s = grace_s
        self.log = log
        self.signals: list[int] = []

    @contextlib.contextmanager
    def capture_signals(self):
        """Like uvicorn's, but a SIGTERM is not raised again after the clean shutdown."""
        def handle(sig, frame):
            self.signals.append(sig)
            self.handle_exit(sig, frame)

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        self.log.install(asyncio.get_running_loop(), ("uvicorn.error", "asyncio"))
        await super().startup(sockets=sockets)
        for sock in sockets or ():  # asyncio set the kernel's queue to its accept batch: lengthen it
            sock.listen(LISTEN_QUEUE)
        if not self.should_exit:
            self.on_ready()

    async def shutdown(self, sockets=None) -> None:
        scheduler = self.config.app.state.scheduler
        scheduler.stop_accepting()
        asyncio.get_running_loop().call_later(
            self.grace_s, scheduler.fail_pending,
            f"the server is shutting down and this request did not finish within {self.grace_s:g} s")
        await super().shutdown(sockets=sockets)


def warm_up(engine: Engine, log: Callable[[str], None]) -> dict:
    """``Engine.warm_up`` and what it did (for /health): matmul launches, decode graphs
    captured, seconds. One line of log where it did something; on a CPU it does nothing
    (nothing is compiled ahead there) and says nothing."""
    start = time.perf_counter()
    launches = engine.warm_up()
    graphs = len(engine.decode.captured) if engine.decode is not None else 0
    seconds = time.perf_counter() - start
    if launches or graphs:
        log(f"warmed up in {seconds:.1f} s: {launches} matmul kernels, {graphs} decode graphs")
    return {"matmul_launches": launches, "decode_graphs": graphs, "seconds": round(seconds, 3)}


def serve(engine: Engine, model_id: str, host: str = "127.0.0.1", port: int = 8000, *,
          max_queue: int = 256, max_body_bytes: int = 1 << 20, request_timeout_s: float = 600.0,
          header_timeout_s: float = 20.0, body_timeout_s: float = 60.0, max_connections: int = 1024,
          shutdown_grace_s: float = 10.0, log: Callable[[str], None] = print) -> None:
    """Serve until SIGTERM/Ctrl-C; ``log`` gets the URL once the engine is warm and the
    server accepts requests (port 0 picks a free port: the URL says which)."""
    max_connections, note = fit_to_file_limit(max_connections)
    if note:
        log(note)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port "
                      "(0 chooses a free one)") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/v1"
    try:  # bound, not listening: a client meanwhile is refused, as before start-up
        warmed = warm_up(engine, log)
    except BaseException:
        sock.close()
        raise
    freeze_startup_objects()  # collections skip the model and the warm-up's objects
    limiter = RateLimiter()
    guard = ConnectionGuard(max_connections, header_timeout_s, limiter)
    app = create_app(engine, model_id, max_queue=max_queue, max_body_bytes=max_body_bytes,
                     request_timeout_s=request_timeout_s, body_timeout_s=body_timeout_s,
                     log=limiter, connection_stats=guard.stats, warm_up=warmed)

    def ready() -> None:
        log(f"serving {model_id} at {url} (system_fingerprint {fingerprint(engine)})")

    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False, ws="none",
                            http=functools.partial(GuardedProtocol, guard=guard),  # type: ignore[arg-type]
                            backlog=ACCEPT_BATCH,
                            timeout_graceful_shutdown=shutdown_grace_s + 5)
    server = _Server(config, ready, shutdown_grace_s, limiter)
    server.run(sockets=[sock])
    if signal.SIGINT in server.signals:
        raise KeyboardInterrupt
    if server.started is False and not server.signals:
        sys.exit(1)
