"""The bridge between async HTTP handlers and the engine's one step thread.

Handlers call ``await scheduler.generate(requests)``; the requests join the engine's
waiting queue and enter the running batch at its next step (continuous batching), so
whatever else is in flight shares their forward passes, as on vLLM or SGLang. One
background thread runs ``engine.step()`` while anything is unfinished and hands each
finished ``Result`` back to the event loop that waits for it. A streamed request
(``open_stream``) gets each generated token as well, as the step makes it
(``TokenStream.events``).

Backpressure: at most ``max_batch`` sequences run and ``max_queue`` more wait; beyond
that ``QueueFull`` (HTTP 429), whose Retry-After is the queued work over the measured
throughput: tokens still to generate / tokens generated per second over the last
``THROUGHPUT_STEPS`` steps. Each call has a deadline (``ServerTimeout``, HTTP 504). On
shutdown, new work is refused (``ShuttingDown``) and what is still in flight after the
grace period gets that error.

A call that ends without its results (timeout, shutdown, or its task cancelled because
the client went away; for a stream, ``TokenStream.close`` before the last token) aborts
its requests in the engine: they stop at the next step and their slots are free for
the next request.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from local_backend.engine import Engine, GeneratedToken, Request, Result


THROUGHPUT_STEPS = 256  # steps over which the throughput behind Retry-After is measured


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
    """system_fingerprint: what decides the numbers (``Engine.fingerprint``)."""
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
    """Where one request's outcomes go: ``settle`` runs on ``loop`` with each of them
    (a GeneratedToken, for streams only; then the Result, or an error)."""

    loop: asyncio.AbstractEventLoop
    settle: Callable[[object], None]
    streams: bool = False


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 256, request_timeout_s: float = 600.0):
        self.engine = engine
        self.max_batch = engine.max_slots
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.steps = 0
        self.aborted = 0  # requests dropped because their call ended without them
        self.failure: str | None = None  # set when a forward pass raised: the engine is unusable
        self._waiters: dict[str, _Waiter] = {}
        self._live: set[str] = set()  # request ids the engine holds for a caller
        self._lock = threading.Lock()  # _waiters and _live
        self._wake = threading.Event()
        self._stop = False
        self._accepting = True
        self._recent: deque[tuple[int, float]] = deque(maxlen=THROUGHPUT_STEPS)  # (tokens, s)
        self._thread = threading.Thread(target=self._loop, name="engine-steps", daemon=True)

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    # ---- called from the event loop ----------------------------------------------------

    async def generate(self, requests: list[Request]) -> list[Result]:
        """Run the requests (the n choices of one HTTP request) in the shared batch."""
        self._admit(len(requests))
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        try:
            self._add(requests, [_Waiter(loop, _settler(f)) for f in futures])
            done, pending = await asyncio.wait(futures, timeout=self.request_timeout_s,
                                               return_when=asyncio.FIRST_EXCEPTION)
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors:
                raise errors[0]
            if pending:
                raise ServerTimeout(self._timeout_message())
            return [f.result() for f in futures]
        finally:  # results, an error, or cancelled: whatever has not finished is dropped
            for future in futures:
                future.cancel()  # a late outcome is then dropped, never logged as unretrieved
            self._release(requests)

    def open_stream(self, requests: list[Request]) -> "TokenStream":
        """Queue the requests (the n choices of one streamed HTTP request) and hand back
        their tokens as the steps make them. Admission and the engine's checks happen
        here, so a refusal is still an HTTP error status, before any byte is streamed."""
        self._admit(len(requests))
        stream = TokenStream(self, requests, asyncio.get_running_loop())
        try:
            self._add(requests, [_Waiter(stream.loop, functools.partial(stream.put, choice), True)
                                 for choice in range(len(requests))])
        except BaseException:
            stream.close()
            raise
        return stream

    def _add(self, requests: list[Request], waiters: list[_Waiter]) -> None:
        for request, waiter in zip(requests, waiters):
            with self._lock:
                self._waiters[request.request_id] = waiter
                self._live.add(request.request_id)
            try:
                self.engine.add_request(request)  # validates; RequestError -> 400
            except BaseException:
                with self._lock:
                    self._live.discard(request.request_id)
                raise
            self._wake.set()

    def _release(self, requests: list[Request]) -> None:
        """The call is over: forget its waiters, and abort what the engine still runs."""
        with self._lock:
            unfinished = [r.request_id for r in requests if r.request_id in self._live]
            self._live.difference_update(unfinished)
            for request in requests:
                self._waiters.pop(request.request_id, None)
        for request_id in unfinished:
            self.engine.abort(request_id)
        self.aborted += len(unfinished)

    def _timeout_message(self) -> str:
        return (f"no answer within the server's request timeout of {self.request_timeout_s:g} s; "
                "send fewer max_tokens or retry when the server is less busy")

    def _admit(self, count: int) -> None:
        if self.failure is not None:
            raise EngineFailed(f"the engine failed and is not serving: {self.failure}")
        if not self._accepting:
            raise ShuttingDown("the server is shutting down; retry against another instance")
        with self._lock:
            free = self.max_batch + self.max_queue - len(self._live)
        if count > free:
            raise QueueFull(f"the server is at capacity ({self.max_batch} running, "
                            f"{self.max_queue} queued); retry after the Retry-After interval",
                            self.retry_after_s())

    def retry_after_s(self) -> int:
        """Seconds until the work queued now is done: tokens still to generate over the
        measured throughput (one token per running sequence per step)."""
        _, _, tokens = self.engine.backlog()
        rate = self.tokens_per_s()
        return 1 if rate is None else max(1, min(3600, math.ceil(tokens / rate)))

    def tokens_per_s(self) -> float | None:
        """Tokens generated per second while busy (wall time from one step's end to the
        next, so the loop's own overhead counts), over the last THROUGHPUT_STEPS steps."""
        recent = list(self._recent)
        seconds = sum(s for _, s in recent)
        return sum(n for n, _ in recent) / seconds if seconds > 0 else None

    def stats(self) -> dict:
        with self._lock:
            in_flight = len(self._live)
        running, waiting, tokens = self.engine.backlog()
        return {"in_flight": in_flight, "running": running, "waiting": waiting,
                "free_slots": self.engine.cache.free_slots, "queued_tokens": tokens,
                "aborted": self.aborted, "max_batch": self.max_batch, "max_queue": self.max_queue,
                "steps": self.steps, "tokens_per_s": self.tokens_per_s(),
                "accepting": self._accepting and self.failure is None}

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
        previous_end: float | None = None  # of the step before, when no idle wait came between
        while not self._stop:
            self._wake.clear()
            if not self.engine.has_unfinished():
                previous_end = None
                self._wake.wait(0.5)
                continue
            running, waiting, _ = self.engine.backlog()
            started = time.monotonic() if previous_end is None else previous_end
            try:
                finished = self.engine.step(self._on_token)
            except Exception as exc:  # a bug or a device fault: say so, never hang handlers
                traceback.print_exc(file=sys.stderr)
                self.failure = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    waiters = list(self._waiters.values())
                for waiter in waiters:
                    _deliver(waiter, EngineFailed(f"the engine failed: {self.failure}"))
                return
            self.steps += 1
            previous_end = time.monotonic()
            if running + waiting:  # one token per sequence; wall time, overheads included
                self._recent.append((min(self.max_batch, running + waiting), previous_end - started))
            for result in finished:
                with self._lock:
                    if result.request_id not in self._live:  # aborted while it ran
                        continue
                    self._live.discard(result.request_id)
                    waiter = self._waiters.pop(result.request_id, None)
                if waiter is not None:
                    _deliver(waiter, result)


    def _on_token(self, request_id: str, token: GeneratedToken) -> None:
        """A token of a running request (step thread): on to its stream, if it streams."""
        with self._lock:
            waiter = self._waiters.get(request_id)
        if waiter is not None and waiter.streams:
            _deliver(waiter, token)


class TokenStream:
    """The n choices of one streamed request, as ``(choice, GeneratedToken | Result)``
    events in the order the steps made them; each choice ends with its Result. The
    call's deadline is the scheduler's request timeout, as for ``generate``. ``close``
    (always, when the caller is done or gone) aborts whatever has not finished."""

    def __init__(self, scheduler: Scheduler, requests: list[Request],
                 loop: asyncio.AbstractEventLoop):
        self.scheduler, self.requests, self.loop = scheduler, requests, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._deadline = loop.time() + scheduler.request_timeout_s
        self._closed = False

    def put(self, choice: int, outcome: object) -> None:
        if not self._closed:
            self._queue.put_nowait((choice, outcome))

    async def events(self) -> AsyncIterator[tuple[int, GeneratedToken | Result]]:
        """Raises what ended the call early: ServerTimeout, ShuttingDown, EngineFailed."""
        unfinished = len(self.requests)
        while unfinished:
            try:
                async with asyncio.timeout_at(self._deadline):
                    choice, outcome = await self._queue.get()
            except TimeoutError:
                raise ServerTimeout(self.scheduler._timeout_message()) from None
            if isinstance(outcome, Exception):
                raise outcome
            if isinstance(outcome, Result):
                unfinished -= 1
            yield choice, outcome

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.scheduler._release(self.requests)


def _settler(future: asyncio.Future) -> Callable[[object], None]:
    def settle(outcome: object) -> None:
        if future.done():
            return
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    return settle


def _deliver(waiter: _Waiter, outcome: object) -> None:
    try:
        waiter.loop.call_soon_threadsafe(waiter.settle, outcome)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass
