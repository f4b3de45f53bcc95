"""Connection limits for a server that faces clients it does not trust.

uvicorn's h11 protocol, plus:

- at most ``max_connections`` connections open at once; a connection beyond that gets
  a canned 503 and is closed before a byte of it is parsed (one write, one close),
  so a flood cannot exhaust the process's file handles;
- a request's headers must have arrived ``header_timeout_s`` after the connection
  opened (or after the previous response on a kept-alive connection), else a 408
  and the connection is closed. Bytes that trickle in do not move the deadline.

The body has its own deadline, in the app that reads it. Warnings about refused
and timed-out connections go through the server's rate limiter.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
from dataclasses import dataclass, field

from uvicorn.protocols.http.h11_impl import H11Protocol

from local_backend.server.logs import RateLimiter

FD_RESERVE = 64  # handles kept for everything else: model files, pipes, the listening socket
# asyncio accepts up to its "backlog" connections in one go, and a refused one holds its
# handle for a few loop iterations until it is closed: the file budget keeps room for
# three such batches. The kernel's queue of connections not yet accepted holds no handle
# of ours, so it is longer (a burst waits there instead of losing its SYNs).
ACCEPT_BATCH = 64
IN_CLOSING = 3 * ACCEPT_BATCH
LISTEN_QUEUE = 2048


def _canned(status: str, message: str, code: str, extra: str = "") -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                 "code": code}}).encode()
    head = (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra}"
            f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n")
    return head.encode() + body


@dataclass
class ConnectionGuard:
    """The limits, shared by every connection, and what they did (for /health)."""

    max_connections: int = 1024
    header_timeout_s: float = 20.0
    log: RateLimiter = field(default_factory=RateLimiter)
    refused: int = 0
    header_timeouts: int = 0
    open: set = field(default_factory=set)

    def stats(self) -> dict:
        return {"connections": len(self.open), "max_connections": self.max_connections,
                "connections_refused": self.refused, "header_timeouts": self.header_timeouts}

    def refusal(self) -> bytes:
        return _canned("503 Service Unavailable",
                       f"this server has {self.max_connections} connections open, its limit "
                       "(--max-connections); retry shortly", "too_many_connections",
                       "retry-after: 1\r\n")

    def timeout(self) -> bytes:
        return _canned("408 Request Timeout",
                       f"the request headers did not arrive within {self.header_timeout_s:g} s "
                       "(--header-timeout)", "header_timeout")


class GuardedProtocol(H11Protocol):
    """One connection; created by uvicorn with ``functools.partial(..., guard=guard)``."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.refused = False
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.guard.open) >= self.guard.max_connections:
            self.refused = True
            self.guard.refused += 1
            transport.write(self.guard.refusal())
            transport.close()
            self.guard.log.log("connection refused", f"refused a connection: "
                               f"{self.guard.max_connections} open (--max-connections)")
            return
        self.guard.open.add(self)
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self.guard.open.discard(self)
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers arrived: the app has it now
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # before: a pipelined request that starts now disarms it again
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self.header_timer = self.loop.call_later(self.guard.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        self.guard.header_timeouts += 1
        self.transport.write(self.guard.timeout())
        self.transport.close()


def fit_to_file_limit(max_connections: int) -> tuple[int, str | None]:
    """Raise the soft limit on open files as far as the hard limit allows; when even
    that cannot hold ``max_connections`` sockets, lower the bound to what fits
    (with a note saying so) rather than fail at accept() under load."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 32
    except (OSError, ValueError):
        return max_connections, None
    needed = max_connections + IN_CLOSING + in_use + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        fits = max(1, soft - IN_CLOSING - in_use - FD_RESERVE)
        return fits, (f"--max-connections {max_connections} lowered to {fits}: this process may "
                      f"open {soft} files (ulimit -n); raise it to serve more")
    return max_connections, None
