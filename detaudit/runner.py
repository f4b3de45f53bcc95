"""Send one probe many times with bounded concurrency, storing every sample as it lands.

A fixed pool of ``concurrency`` workers pulls indices from the ones still missing in
the store, so a fresh run and a resumed run are the same loop. Each index gets up to
``max_attempts`` tries (exponential backoff with full jitter, or the server's
Retry-After); a sample that still fails is stored as an error, never dropped.
Nothing is cached: every attempt is a real request.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, \
    TextColumn, TimeRemainingColumn
from rich.text import Text

from detaudit.backends.base import Backend, BackendError
from detaudit.probes import Probe
from detaudit.ratelimit import RateLimits
from detaudit.records import Completion, Sample
from detaudit.redact import redact
from detaudit.store import RunStore, utc_now

# Errors that every further request would hit too: stop at once instead of
# sending thousands of requests that cannot succeed.
FATAL_KINDS = ("auth", "not_found", "no_logprobs")


@dataclass
class RunResult:
    n: int
    ok: int  # stored with status ok, all sessions together
    errors: int  # stored as errors
    sent: int  # samples finished in this session
    elapsed_s: float
    status: str  # complete | interrupted | failed
    reason: str | None = None  # why a run failed


class RunFailed(Exception):
    """The run stopped early (endpoint down, bad key...); the store stays resumable."""


@dataclass
class RetryPolicy:
    max_attempts: int = 5
    base_s: float = 0.5  # first backoff ceiling; doubles per attempt
    max_s: float = 30.0  # ceiling for backoff and for a server's Retry-After

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Full jitter (uniform in [0, base * 2^(attempt-1)]), or the server's hint."""
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_s)
        return rng.uniform(0.0, min(self.max_s, self.base_s * 2 ** (attempt - 1)))


def error_budget(max_errors: float, n: int) -> int:
    """How many error samples ``--max-errors`` allows in a run of ``n``: a count
    (0, 1, 2...) or, below 1, a fraction of n (0.05 = 5%)."""
    if max_errors < 0 or not math.isfinite(max_errors):
        raise ValueError(f"--max-errors {max_errors!r}: give a count (e.g. 20) or a fraction "
                         "between 0 and 1 (e.g. 0.05)")
    if max_errors == 0 or max_errors >= 1:
        return int(max_errors)
    return math.floor(max_errors * n)


class Runner:
    """One session of a run: workers, retries, group commits, progress."""

    def __init__(self, probe: Probe, backend: Backend, store: RunStore, n: int, concurrency: int,
                 retry: RetryPolicy | None = None, progress: Console | None = None,
                 abort_after: int = 20, seed: int | None = None,
                 limits: RateLimits | None = None, max_errors: float | None = None,
                 requests: int | None = None, side_failures: Callable[[], int] | None = None):
        self.probe, self.backend, self.store, self.n = probe, backend, store, n
        self.concurrency = max(1, concurrency)
        self.retry = retry or RetryPolicy()
        self.limits = limits if limits is not None and limits.active else None
        self.max_errors = max_errors
        # --max-errors counts every request: a fraction is of all requests the run
        # sends (``requests``, fillers included), and failed fillers count as errors.
        self.requests = n if requests is None else requests
        self.side_failures = side_failures
        self.error_budget = None if max_errors is None else error_budget(max_errors, self.requests)
        self.progress_console = progress
        self.abort_after = abort_after
        self.rng = random.Random(seed)
        self.sent = self.ok = self.errors = 0
        self.reason: str | None = None
        self._pending: list[Sample] = []
        self._flush_scheduled = False
        self._stop = False

    async def run(self) -> RunResult:
        already = self.store.count_done(0, self.n)
        self.store.update_manifest(status="running", ended_at=None)
        started = time.perf_counter()
        status = "interrupted"
        bar = _ProgressBar(self.progress_console, self.n, already) if self.progress_console else None
        try:
            indices = self.store.iter_missing(self.n)  # lazy: memory does not grow with n
            workers = [asyncio.create_task(self._worker(indices))
                       for _ in range(min(self.concurrency, self.n - already))]
            if bar:
                bar.start(lambda: (self.sent, self.errors))
            try:
                await asyncio.gather(*workers)
            except BaseException:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                raise
            status = "failed" if self.reason else "complete"
        finally:
            self._flush()
            if bar:
                bar.stop()
            counts = self._stored_counts()
            if status == "complete" and counts[0] + counts[1] < self.n:
                status = "failed"  # cannot happen unless the store was edited underneath
            self.store.update_manifest(status=status, ended_at=utc_now(),
                                       **({"failure": self.reason} if self.reason else {}))
        return RunResult(n=self.n, ok=counts[0], errors=counts[1], sent=self.sent,
                         elapsed_s=time.perf_counter() - started, status=status, reason=self.reason)

    async def _worker(self, indices) -> None:
        # All workers share one iterator; next() never awaits, so no index is taken twice.
        for index in indices:
            if self._stop:
                return
            sample = await self._sample(index)
            self._store(sample)
            if sample.status == "error":
                self._check_abort(sample)
            elif self.side_failures is not None:
                self._check_side_failures()

    async def _sample(self, index: int) -> Sample:
        started_at = time.time()
        for attempt in range(1, self.retry.max_attempts + 1):
            if self.limits:  # every attempt counts against --rpm / --tpm, retries too
                await self.limits.acquire()
            t0 = time.perf_counter()
            try:
                completion = await self.backend.complete(self.probe, index)
            except BackendError as exc:
                latency = time.perf_counter() - t0
                self.store.record_failed_attempt(index, attempt, exc.kind, exc.message,
                                                 exc.retry_after, raw=exc.raw)
                if exc.retryable and attempt < self.retry.max_attempts and not self._stop:
                    await asyncio.sleep(self.retry.delay(attempt, exc.retry_after, self.rng))
                    continue
                return Sample(index, "error", None, attempt, started_at, latency,
                              error_kind=exc.kind, error_message=exc.message)
            except Exception as exc:  # a backend bug: store it, do not lose the index
                latency = time.perf_counter() - t0
                message = redact(f"{type(exc).__name__}: {exc}")
                self.store.record_failed_attempt(index, attempt, "internal", message)
                return Sample(index, "error", None, attempt, started_at, latency,
                              error_kind="internal", error_message=message)
            return Sample(index, "ok", completion, attempt, started_at, time.perf_counter() - t0,
                          group=group_of(completion))
        raise AssertionError("unreachable: max_attempts >= 1")

    def _store(self, sample: Sample) -> None:
        """Queue the sample and commit everything that finished in this loop turn at once."""
        self.sent += 1
        if sample.status == "ok":
            self.ok += 1
        else:
            self.errors += 1
        self._pending.append(sample)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending:
            batch, self._pending = self._pending, []
            self.store.record_many(batch)

    def _check_abort(self, sample: Sample) -> None:
        why = None
        if sample.error_kind in FATAL_KINDS:
            why = "every request would fail the same way"
        elif self.ok == 0 and self.errors >= min(self.abort_after, self.n):
            why = f"the first {self.errors} samples all failed"
        elif self._over_error_budget():
            why = f"{self._failures_text()}; the last one"
        if why and not self._stop:
            self._stop = True
            self.reason = redact(f"{why}: {sample.error_kind}: {sample.error_message}")

    def _check_side_failures(self) -> None:
        if self._over_error_budget() and not self._stop:
            self._stop = True
            self.reason = self._failures_text()

    def _over_error_budget(self) -> bool:
        return self.error_budget is not None and self._failures() > self.error_budget

    def _failures(self) -> int:
        return self.errors + (self.side_failures() if self.side_failures else 0)

    def _failures_text(self) -> str:
        side = self.side_failures() if self.side_failures else 0
        what = (f"{self._failures()} requests failed ({self.errors} samples, {side} fillers)"
                if self.side_failures else f"{self.errors} samples failed")
        return (f"{what}, more than --max-errors {self.max_errors:g} allows "
                f"({self.error_budget} of {self.requests:,})")

    def _stored_counts(self) -> tuple[int, int]:
        done = len(self.store.done_indices())
        return done, self.store.count() - done


def group_of(completion: Completion) -> str | None:
    """The label the analysis splits by: an explicit group, a load level or a batch size."""
    extra = completion.extra
    if not extra:
        return None
    for key in ("group", "load_level", "batch_size"):
        if extra.get(key) is not None:
            return str(extra[key])
    return None


async def run(probe: Probe, backend: Backend, store: RunStore, n: int, concurrency: int, *,
              max_attempts: int = 5, backoff_base_s: float = 0.5, backoff_max_s: float = 30.0,
              progress: Console | None = None, seed: int | None = None,
              limits: RateLimits | None = None, max_errors: float | None = None,
              requests: int | None = None,
              side_failures: Callable[[], int] | None = None) -> RunResult:
    """Send the indices of ``range(n)`` that the store lacks; see ``Runner``."""
    retry = RetryPolicy(max_attempts=max_attempts, base_s=backoff_base_s, max_s=backoff_max_s)
    return await Runner(probe, backend, store, n, concurrency, retry=retry, progress=progress,
                        seed=seed, limits=limits, max_errors=max_errors, requests=requests,
                        side_failures=side_failures).run()


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} req/s" if speed else "- req/s", style="cyan")


class _ProgressBar:
    """A rich bar on the given console, fed from counters by a timer, not per sample."""

    def __init__(self, console: Console, total: int, already: int):
        self.already = already
        self.progress = Progress(
            TextColumn("[bold]sampling"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[errors]}"),
            console=console, transient=False, refresh_per_second=8)
        self.task = self.progress.add_task("run", total=total, completed=already, errors="")
        self._timer: asyncio.Task | None = None

    def start(self, counts) -> None:
        self.progress.start()

        async def tick():
            while True:
                self.update(*counts())
                await asyncio.sleep(0.1)

        self._counts = counts
        self._timer = asyncio.create_task(tick())

    def update(self, sent: int, errors: int) -> None:
        label = f"[red]{errors} errors" if errors else ""
        self.progress.update(self.task, completed=self.already + sent, errors=label)

    def stop(self) -> None:
        if self._timer:
            self._timer.cancel()
            self.update(*self._counts())
        self.progress.stop()


def resolve_tracked(probe: Probe, backend: Backend) -> list[dict]:
    """The manifest's ``tracked`` list, resolved once at run start.

    Explicit ``track.tokens`` win (paired with the outcome labels when there are as
    many); otherwise each outcome label is tracked by its first token under the
    backend's tokenizer, or ``None`` for the analysis to resolve from the data.
    ``positions = "all"`` probes get one entry that says so.
    """
    if probe.track_all_positions:
        return [{"label": "all positions", "token": None, "position": "all"}]
    position = probe.track_position
    if probe.track_tokens:
        labels = probe.outcomes if len(probe.outcomes) == len(probe.track_tokens) else probe.track_tokens
        return [{"label": label, "token": token, "position": position}
                for label, token in zip(labels, probe.track_tokens)]
    return [{"label": label, "token": backend.first_token(label), "position": position}
            for label in probe.outcomes]
