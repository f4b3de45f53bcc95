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

Fillers are real requests: against a paid API they cost tokens too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from typing import Any

from detaudit.backends.base import Backend, BackendError
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


def configure(probe: Probe, config: dict[str, Any], levels: str | list[int] | None,
              batch_sizes: str | None, per_level: int) -> tuple[Probe, int]:
    """A fresh load-sweep run: the probe with its final levels (they go into the
    manifest, so a resume finds them), the total sample count, and, for the local
    engine, the batch sizes in ``config`` that stand for the levels."""
    if probe.kind != "load-sweep":
        raise ProbeError(probe.source or probe.name, "--levels applies only to load-sweep probes "
                         "(try --probe load-sweep)")
    spec = _spec(probe)
    if levels is not None:
        spec = dataclasses.replace(spec, levels=parse_levels(levels) if isinstance(levels, str)
                                   else list(levels))
    probe = dataclasses.replace(probe, load=spec)
    if config.get("backend") == "local":
        if batch_sizes is not None:
            raise ProbeError("--batch-sizes", "a load-sweep sets the local batch sizes from its "
                             "levels (level L = L fillers + the target); use --levels")
        config["batch_sizes"] = local_batch_sizes(spec.levels)
    return probe, per_level * len(spec.levels)


def wrap(backend: Any, probe: Probe, n_total: int) -> "HttpLoadSweep | LocalLoadSweep":
    """The backend that applies the probe's load levels around ``backend``."""
    per_level = max(1, n_total // len(_spec(probe).levels))
    if getattr(backend, "name", None) == "local":
        return LocalLoadSweep(backend, probe, per_level)
    return HttpLoadSweep(backend, probe, per_level)


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
    """Targets one at a time, with a pool of filler tasks holding the level."""

    def __init__(self, inner: Backend, probe: Probe, per_level: int, seed: int = 0):
        super().__init__(inner, probe, per_level)
        self.spec = _spec(probe)
        self.api = probe.api
        self.rng = random.Random(f"detaudit-load:{seed}")
        self.level = 0
        self.in_flight = 0
        self.filler_requests = 0
        self.filler_errors: dict[str, int] = {}
        self._workers: list[asyncio.Task] = []
        self._target_lock = asyncio.Lock()

    async def complete(self, probe: Probe, index: int) -> Completion:
        _, level = level_of(index, self.levels, self.per_level)
        async with self._target_lock:  # one target at a time: the level is the load
            await self.set_level(level)
            completion = await self.inner.complete(probe, index)
            return self._mark(completion, level, fillers_in_flight=self.in_flight)

    async def set_level(self, level: int) -> None:
        """Keep ``level`` fillers in flight; a drop waits for the extra fillers to end,
        so a lower level is not measured under the previous level's leftovers."""
        if level == self.level and len(self._workers) == level:
            return
        self.level = level
        extra, self._workers = self._workers[level:], self._workers[:level]
        if extra:
            await asyncio.gather(*extra, return_exceptions=True)
        while len(self._workers) < level:
            self._workers.append(asyncio.create_task(self._filler(len(self._workers))))
        await asyncio.sleep(SETTLE_S if level else 0)

    async def _filler(self, slot: int) -> None:
        while slot < self.level:
            self.in_flight += 1
            self.filler_requests += 1
            try:
                await self.inner.complete(self._filler_probe(), -1)
            except BackendError as exc:
                self.filler_errors[exc.kind] = self.filler_errors.get(exc.kind, 0) + 1
                await asyncio.sleep(min(5.0, exc.retry_after or 0.2))  # no hot loop on errors
            finally:
                self.in_flight -= 1

    def _filler_probe(self) -> Probe:
        length = self.rng.randint(self.spec.filler_min_tokens, self.spec.filler_max_tokens)
        text = " ".join(self.rng.choice(_WORDS) for _ in range(length))
        request: dict[str, Any] = {"max_tokens": self.rng.randint(1, FILLER_MAX_NEW_TOKENS),
                                   "temperature": 0.8, "seed": self.rng.randrange(1 << 31)}
        if self.api == "chat":
            request["messages"] = [{"role": "user", "content": text}]
        else:
            request["prompt"] = text
        return Probe(name="load-filler", kind="outcome", request=request, api=self.api)

    async def aclose(self) -> None:
        self.level = 0
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        await self.inner.aclose()
