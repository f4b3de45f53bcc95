"""The load-sweep probe: one target request repeated while other requests share the batch.

Sample ``index`` belongs to load level ``levels[index // per_level]`` and is stored in
group ``"load=<level>"``, so the analysis reports distinct logprobs and outputs of the
target per level, and a resumed run puts every index at its level again.

- Against an endpoint (``HttpLoadSweep``): ``level`` filler requests (prompts of
  ``filler_min_tokens``..``filler_max_tokens`` words, a few generated tokens each) are
  kept in flight by a pool of tasks while the targets are sent one at a time. On a
  server that batches dynamically (vLLM, SGLang, ``detaudit serve``) they land in
  the target's forward passes, and their varied lengths vary the batch shape.
- In process (``LocalLoadSweep``, the bundled engine): level L is a batch of L
  fillers plus the target, built reproducibly by the local backend.

Fillers are real requests: against a paid API they cost tokens too. Their number is
bounded, so ``--dry-run``, ``--max-cost`` and ``--max-errors`` can count them before
anything is sent: each target at level L brings at most ``L * filler_rounds(probe)``
filler requests (enough to hold the level through the target's generation; if fillers
end sooner, the level sags and the target's stored ``fillers_in_flight`` says so), and
no level gets more than its targets brought. Levels above ``MAX_LEVEL`` (256) are
refused unless ``--max-level`` raises the cap: level L keeps L requests in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from typing import Any

from detaudit.backends.base import Backend, BackendError
from detaudit.defaults import MAX_LEVEL
from detaudit.probes import LoadSpec, Probe, ProbeError
from detaudit.records import Completion

FILLER_MAX_NEW_TOKENS = 8  # short generations: the load changes often and drains fast
SETTLE_S = 0.05  # after a level change, time for the fillers to reach the server
_WORDS = ("the sea is wide and grey a lighthouse keeper lived alone by the shore heads tails "
          "coin flip red green blue story wind night light boat rope storm morning").split()


def group_label(level: int) -> str:
    return f"load={level}"


def level_of(index: int, levels: list[int], per_level: int) -> tuple[int, int]:
    """(position in ``levels``, level) of sample ``index``."""
    slot = min(index // max(1, per_level), len(levels) - 1)
    return slot, levels[slot]


def local_batch_sizes(levels: list[int]) -> list[int]:
    """Batch sizes for the in-process engine: L fillers plus the target."""
    return [level + 1 for level in levels]


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or any(level < 0 for level in levels):
        raise ProbeError("--levels", f"{text!r}: give non-negative integers separated by commas, "
                         "e.g. 0,1,4,16")
    return levels


def check_levels(levels: list[int], max_level: int = MAX_LEVEL, what: str = "--levels") -> None:
    """Refuse levels above the cap: level L keeps L requests in flight (L fillers
    against an endpoint, a batch of L + 1 in process), so memory and spend grow with it."""
    high = max(levels)
    if high > max_level:
        raise ProbeError(what, f"{high:,} requests in flight beside the target is above the "
                         f"cap of {max_level:,}; lower it, or raise the cap with --max-level "
                         f"{high} (against an endpoint each filler is a real request; in "
                         "process, memory grows with the batch)")


def configure(probe: Probe, config: dict[str, Any], levels: str | list[int] | None,
              batch_sizes: str | None, per_level: int,
              max_level: int = MAX_LEVEL) -> tuple[Probe, dict[str, Any], int]:
    """A fresh load-sweep run: the probe with its final levels (they go into the
    manifest, so a resume finds them), the backend config (for the local engine, a
    copy whose batch sizes stand for the levels; ``config`` itself is left as it is),
    and the total sample count."""
    if probe.kind != "load-sweep":
        raise ProbeError(probe.source or probe.name, "--levels applies only to load-sweep probes "
                         "(try --probe load-sweep)")
    spec = _spec(probe)
    if levels is not None:
        spec = dataclasses.replace(spec, levels=parse_levels(levels) if isinstance(levels, str)
                                   else list(levels))
    check_levels(spec.levels, max_level, "--levels" if levels is not None else
                 f"{probe.source or probe.name}: load.levels")
    probe = dataclasses.replace(probe, load=spec)
    if config.get("backend") == "local":
        if batch_sizes is not None:
            raise ProbeError("--batch-sizes", "a load-sweep sets the local batch sizes from its "
                             "levels (level L = L fillers + the target); use --levels")
        config = {**config, "batch_sizes": local_batch_sizes(spec.levels)}
    return probe, config, per_level * len(spec.levels)


def per_level_of(probe: Probe, n_total: int) -> int:
    return max(1, n_total // len(_spec(probe).levels))


def level_ranges(probe: Probe, n_total: int) -> list[tuple[int, int, int]]:
    """(first index, end index, level) of each level's targets in ``range(n_total)``;
    the last level takes any remainder, as ``level_of`` does."""
    levels, per_level = _spec(probe).levels, per_level_of(probe, n_total)
    ranges = []
    for slot, level in enumerate(levels):
        start = min(slot * per_level, n_total)
        stop = n_total if slot == len(levels) - 1 else min((slot + 1) * per_level, n_total)
        ranges.append((start, stop, level))
    return ranges


def filler_rounds(probe: Probe) -> int:
    """Filler requests each filler slot may send per target: one to be in flight when
    the target arrives, and enough more to outlast its ``max_tokens`` steps."""
    return 1 + math.ceil(max(1, probe.max_tokens) / FILLER_MAX_NEW_TOKENS)


def fillers_per_target(probe: Probe, level: int, remote: bool = True) -> int:
    """Filler requests a target at ``level`` brings at most; in process (``remote``
    False) fillers are batch-mates, not requests."""
    return level * filler_rounds(probe) if remote else 0


def largest_filler(probe: Probe, count=len) -> Probe:
    """A filler request at its largest (its most costly word under ``count``, most
    words, most new tokens), for the cost estimate; no filler sent is bigger."""
    spec = _spec(probe)
    word = max(_WORDS, key=lambda w: count(" " + w))
    return _filler_request(probe.api, " ".join([word] * spec.filler_max_tokens),
                           FILLER_MAX_NEW_TOKENS, 0)


def _filler_request(api: str, text: str, max_tokens: int, seed: int) -> Probe:
    request: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.8, "seed": seed}
    if api == "chat":
        request["messages"] = [{"role": "user", "content": text}]
    else:
        request["prompt"] = text
    return Probe(name="load-filler", kind="outcome", request=request, api=api)


def wrap(backend: Any, probe: Probe, n_total: int,
         filler_caps: list[int] | None = None) -> "HttpLoadSweep | LocalLoadSweep":
    """The backend that applies the probe's load levels around ``backend``.
    ``filler_caps``: filler requests allowed per level in this session (default:
    what every target of ``range(n_total)`` brings)."""
    per_level = per_level_of(probe, n_total)
    if getattr(backend, "name", None) == "local":
        return LocalLoadSweep(backend, probe, per_level)
    if filler_caps is None:
        filler_caps = [(stop - start) * fillers_per_target(probe, level)
                       for start, stop, level in level_ranges(probe, n_total)]
    return HttpLoadSweep(backend, probe, per_level, filler_caps)


def _spec(probe: Probe) -> LoadSpec:
    return probe.load or LoadSpec()


class _Sweep:
    """What both load sweeps share: the Backend interface around an inner backend."""

    def __init__(self, inner: Backend, probe: Probe, per_level: int):
        self.inner, self.levels, self.per_level = inner, list(_spec(probe).levels), per_level
        self.name = inner.name

    def first_token(self, text: str) -> str | None:
        return self.inner.first_token(text)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "load_levels": self.levels, "per_level": self.per_level}

    @staticmethod
    def _mark(completion: Completion, level: int, **facts: Any) -> Completion:
        completion.extra = {**completion.extra, "group": group_label(level), "load_level": level,
                            **facts}
        return completion


class LocalLoadSweep(_Sweep):
    """Level L -> a batch of L + 1 in the local backend, whose batch sizes must be
    ``local_batch_sizes(levels)``: index i runs as backend index i * len(levels) + slot,
    which picks that size and is still unique and reproducible per i."""

    def __init__(self, inner: Backend, probe: Probe, per_level: int):
        super().__init__(inner, probe, per_level)
        expected = local_batch_sizes(self.levels)
        if list(getattr(inner, "batch_sizes", expected)) != expected:
            raise ValueError(f"the local backend's batch sizes must be {expected} for levels {self.levels}")

    async def complete(self, probe: Probe, index: int) -> Completion:
        slot, level = level_of(index, self.levels, self.per_level)
        completion = await self.inner.complete(probe, index * len(self.levels) + slot)
        return self._mark(completion, level)

    async def aclose(self) -> None:
        await self.inner.aclose()


class HttpLoadSweep(_Sweep):
    """Targets one at a time, with a pool of filler tasks holding the level.

    Fillers draw on credits: each target request at level L adds ``fillers_per_target``
    of them, and level slot s never gets more than ``filler_caps[s]`` in all, so the
    fillers sent never exceed what the budget counted."""

    def __init__(self, inner: Backend, probe: Probe, per_level: int,
                 filler_caps: list[int] | None = None, seed: int = 0):
        super().__init__(inner, probe, per_level)
        self.spec = _spec(probe)
        self.api = probe.api
        self.probe = probe
        self.rng = random.Random(f"detaudit-load:{seed}")
        self.filler_caps = list(filler_caps) if filler_caps is not None else None
        self.level = 0
        self.in_flight = 0
        self.filler_requests = 0  # started
        self.filler_cancelled = 0  # in flight when the sweep closed (may not have arrived)
        self.filler_errors: dict[str, int] = {}
        self._granted = [0] * len(self.levels)  # credits given per level slot
        self._credits = 0  # filler requests the current level may still send
        self._slot = 0
        self._workers: list[asyncio.Task] = []
        self._target_lock = asyncio.Lock()
        self._wake = asyncio.Condition()

    @property
    def filler_failures(self) -> int:
        """Filler requests that failed so far (they count against --max-errors)."""
        return sum(self.filler_errors.values())

    def filler_stats(self) -> dict[str, Any]:
        return {"sent": self.filler_requests, "cancelled": self.filler_cancelled,
                "failed": self.filler_failures, "failed_by_kind": dict(self.filler_errors)}

    async def complete(self, probe: Probe, index: int) -> Completion:
        slot, level = level_of(index, self.levels, self.per_level)
        async with self._target_lock:  # one target at a time: the level is the load
            await self._grant(slot, level)
            await self.set_level(level)
            completion = await self.inner.complete(probe, index)
            return self._mark(completion, level, fillers_in_flight=self.in_flight)

    async def _grant(self, slot: int, level: int) -> None:
        """Credits for one target request; they do not carry over to another level."""
        if slot != self._slot:
            self._slot, self._credits = slot, 0
        credits = fillers_per_target(self.probe, level)
        if self.filler_caps is not None:  # a level the caps do not name gets none
            cap = self.filler_caps[slot] if slot < len(self.filler_caps) else 0
            credits = max(0, min(credits, cap - self._granted[slot]))
        self._granted[slot] += credits
        async with self._wake:
            self._credits += credits
            self._wake.notify_all()

    async def set_level(self, level: int) -> None:
        """Keep ``level`` fillers in flight; a drop waits for the extra fillers to end,
        so a lower level is not measured under the previous level's leftovers."""
        if level == self.level and len(self._workers) == level:
            return
        self.level = level
        extra, self._workers = self._workers[level:], self._workers[:level]
        async with self._wake:
            self._wake.notify_all()  # idle extra fillers see the drop and end
        if extra:
            await asyncio.gather(*extra, return_exceptions=True)
        while len(self._workers) < level:
            self._workers.append(asyncio.create_task(self._filler(len(self._workers))))
        await asyncio.sleep(SETTLE_S if level else 0)

    async def _filler(self, slot: int) -> None:
        while slot < self.level:
            async with self._wake:  # wait for a credit, or for the level to drop
                await self._wake.wait_for(lambda: self._credits > 0 or slot >= self.level)
                if slot >= self.level:
                    return
                self._credits -= 1
            self.in_flight += 1
            self.filler_requests += 1
            try:
                await self.inner.complete(self._filler_probe(), -1)
            except BackendError as exc:
                self.in_flight -= 1
                self.filler_errors[exc.kind] = self.filler_errors.get(exc.kind, 0) + 1
                await asyncio.sleep(min(5.0, exc.retry_after or 0.2))  # no hot loop on errors
                continue
            except asyncio.CancelledError:
                self.in_flight -= 1
                self.filler_cancelled += 1
                raise
            self.in_flight -= 1

    def _filler_probe(self) -> Probe:
        length = self.rng.randint(self.spec.filler_min_tokens, self.spec.filler_max_tokens)
        text = " ".join(self.rng.choice(_WORDS) for _ in range(length))
        return _filler_request(self.api, text, self.rng.randint(1, FILLER_MAX_NEW_TOKENS),
                               self.rng.randrange(1 << 31))

    async def aclose(self) -> None:
        self.level = 0
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        await self.inner.aclose()
