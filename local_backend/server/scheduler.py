"""The bridge between async HTTP handlers and the engine's one step thread.

Handlers call ``await scheduler.generate(requests)``; the requests join the engine's
waiting queue and enter the running batch at its next step (continuous batching), so
whatever else is in flight shares their forward passes, as on vLLM or SGLang. One
background thread runs ``engine.step()`` while anything is unfinished and hands each
finished ``Result`` back to the event loop that waits for it.

Backpressure: at most ``max_batch`` sequences run and ``max_queue`` more wait; beyond
that ``QueueFull`` (HTTP 429 with Retry-After). Each call has a deadline
(``ServerTimeout``, HTTP 504). On shutdown, new work is refused (``ShuttingDown``) and
what is still in flight after the grace period gets that error too.

The engine cannot drop a sequence it has started: a request that timed out keeps its
slot until it ends, and keeps counting against the queue bound while it does.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from local_backend.engine import Engine, Request, Result


class SchedulerError(Exception):
    """A request that cannot be served now; the app maps each kind to an HTTP status."""


class QueueFull(SchedulerError):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServerTimeout(SchedulerError):
    pass


class ShuttingDown(SchedulerError):
    pass


class EngineFailed(SchedulerError):
    pass


def fingerprint(engine: Engine) -> str:
    """system_fingerprint: what decides the numbers (weights, kernels, dtype, device)."""
    return engine.fingerprint()


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of choice ``i`` of an n > 1 request: choice 0 keeps the request's seed
    (so n=1 and n=k agree on it); the others get distinct seeds fixed by (seed, i)."""
    if seed is None or choice == 0:
        return seed
    digest = hashlib.sha256(f"detaudit-choice:{seed}:{choice}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 256, request_timeout_s: float = 600.0):
        self.engine = engine
        self.max_batch = engine.max_slots
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.steps = 0
        self.failure: str | None = None  # set when a forward pass raised: the engine is unusable
        self._waiters: dict[str, _Waiter] = {}
        self._in_engine = 0  # sequences the engine holds (running or waiting), timed out ones too
        self._lock = threading.Lock()  # _waiters and _in_engine
        self._wake = threading.Event()
        self._stop = False
        self._accepting = True
        self._latency_ema_s = 1.0
        self._thread = threading.Thread(target=self._loop, name="engine-steps", daemon=True)

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    # ---- called from the event loop ----------------------------------------------------

    async def generate(self, requests: list[Request]) -> list[Result]:
        """Run the requests (the n choices of one HTTP request) in the shared batch."""
        self._admit(len(requests))
        loop = asyncio.get_running_loop()
        futures = []
        started = time.monotonic()
        try:
            for request in requests:
                future = loop.create_future()
                with self._lock:
                    self._waiters[request.request_id] = _Waiter(loop, future)
                    self._in_engine += 1
                try:
                    self.engine.add_request(request)  # validates; RequestError -> 400
                except BaseException:
                    with self._lock:
                        self._waiters.pop(request.request_id, None)
                        self._in_engine -= 1
                    raise
                futures.append(future)
                self._wake.set()
            try:
                results = await asyncio.wait_for(asyncio.gather(*futures), self.request_timeout_s)
            except asyncio.TimeoutError:
                raise ServerTimeout(f"no answer within the server's request timeout of "
                                    f"{self.request_timeout_s:g} s; send fewer max_tokens or "
                                    "retry when the server is less busy") from None
        finally:
            with self._lock:
                for request in requests:
                    self._waiters.pop(request.request_id, None)
        self._latency_ema_s = 0.8 * self._latency_ema_s + 0.2 * (time.monotonic() - started)
        return list(results)

    def _admit(self, count: int) -> None:
        if self.failure is not None:
            raise EngineFailed(f"the engine failed and is not serving: {self.failure}")
        if not self._accepting:
            raise ShuttingDown("the server is shutting down; retry against another instance")
        with self._lock:
            free = self.max_batch + self.max_queue - self._in_engine
        if count > free:
            raise QueueFull(f"the server is at capacity ({self.max_batch} running, "
                            f"{self.max_queue} queued); retry after the Retry-After interval",
                            self.retry_after_s())

    def retry_after_s(self) -> int:
        """A hint for 429s: about one request latency per full batch waiting ahead."""
        with self._lock:
            batches_ahead = self._in_engine / max(1, self.max_batch)
        return max(1, math.ceil(self._latency_ema_s * max(1.0, batches_ahead)))

    def stats(self) -> dict:
        with self._lock:
            in_engine = self._in_engine
        return {"in_flight": in_engine, "max_batch": self.max_batch, "max_queue": self.max_queue,
                "steps": self.steps, "accepting": self._accepting and self.failure is None}

    def stop_accepting(self) -> None:
        self._accepting = False

    def fail_pending(self, reason: str) -> None:
        """Answer every waiting handler with ShuttingDown (shutdown grace period over)."""
        with self._lock:
            waiters = list(self._waiters.values())
        for waiter in waiters:
            _deliver(waiter, ShuttingDown(reason))

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the step thread (after its current step) and fail what is left."""
        self._accepting = False
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.fail_pending("the server shut down before this request finished")

    # ---- the step thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop:
            self._wake.clear()
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                continue
            try:
                finished = self.engine.step()
            except Exception as exc:  # a bug or a device fault: say so, never hang handlers
                traceback.print_exc(file=sys.stderr)
                self.failure = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    waiters = list(self._waiters.values())
                for waiter in waiters:
                    _deliver(waiter, EngineFailed(f"the engine failed: {self.failure}"))
                return
            self.steps += 1
            for result in finished:
                with self._lock:
                    self._in_engine -= 1
                    waiter = self._waiters.pop(result.request_id, None)
                if waiter is not None:  # None: its handler timed out or went away
                    _deliver(waiter, result)


def _deliver(waiter: _Waiter, outcome: Result | Exception) -> None:
    def settle() -> None:
        if waiter.future.done():
            return
        if isinstance(outcome, Exception):
            waiter.future.set_exception(outcome)
        else:
            waiter.future.set_result(outcome)

    try:
        waiter.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass
