"""The bundled engine as a backend: each repeat runs inside a batch of its own size.

Repeat ``index`` runs in a batch of ``batch_sizes[index % len(batch_sizes)]`` requests:
the probe's request plus filler requests of other lengths, drawn from an RNG seeded
by (seed, index), with the probe at a random place in the batch. The batch an index
runs in is therefore the same on every run and after a resume, and the only thing
that varies between repeats is what batch-invariant kernels are meant to make
irrelevant.

``complete_in`` runs one repeat in a batch the caller plans (``BatchPlan``: its size,
where the target sits, the engine's prefill chunk for that batch), and
``complete_choices`` returns every choice of an ``n > 1`` request, run together in
one batch: what ``detaudit matrix`` varies one at a time. The fillers of an index
are drawn the same way whatever the plan, so two plans of one index differ only in
what the plan says.
"""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass
from typing import Any

from detaudit.backends.base import BackendError
from detaudit.defaults import DEFAULT_BATCH_SIZES, DEFAULT_KERNEL_IMPL, DEFAULT_KERNELS, LOCAL_MODEL
from detaudit.probes import Probe
from detaudit.records import Completion, Position, TokenLogprob
from detaudit.wire import request_body
# torch and friends are the optional [local] extras: importing this module without
# them raises ImportError, which the CLI turns into an install hint.
from local_backend.engine import Engine, Request, RequestError
from local_backend.server.protocol import InvalidRequest, parse

FILLER_TOKENS = (4, 64)  # filler prompt lengths when the probe names none
POSITIONS = ("random", "first", "last")


@dataclass(frozen=True)
class BatchPlan:
    """The batch one repeat runs in: ``size`` entries (the target and size - 1 fillers;
    the target's n choices count as one entry), the target's place in it, and the
    engine's prefill chunk for that batch (None: the engine's own setting)."""

    size: int = 1
    position: str = "random"  # one of POSITIONS
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"batch size must be a positive integer, got {self.size!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")


class LocalBackend:
    name = "local"

    def __init__(self, model: str = LOCAL_MODEL, kernels: str = DEFAULT_KERNELS,
                 batch_sizes: list[int] | tuple[int, ...] = DEFAULT_BATCH_SIZES,
                 device: str | None = None, seed: int = 0, dtype: str | None = None,
                 max_len: int = 2048, kernel_impl: str = DEFAULT_KERNEL_IMPL,
                 prefix_cache: bool = False, prefill_chunk: int | None = None):
        sizes = list(batch_sizes)
        if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
            raise ValueError(f"batch_sizes must be a non-empty list of positive integers, got {batch_sizes!r}")
        self.batch_sizes = sizes
        self.seed = seed
        self.engine = Engine.load(model, kernels=kernels, device=device, dtype=dtype,
                                  max_slots=max(sizes), max_len=max_len, kernel_impl=kernel_impl,
                                  prefix_cache=prefix_cache, prefill_chunk=prefill_chunk)
        self._lock = threading.Lock()  # one batch at a time: the engine is not re-entrant
        special = self.engine.tokenizer.special_ids if self.engine.tokenizer else set()
        self._filler_vocab = [t for t in range(self.engine.config.vocab_size)
                              if t not in special and t not in self.engine.eos_ids]
        facts = self.engine.describe()
        self.model = facts["model"]
        self.system_fingerprint = self.engine.fingerprint()

    # -- Backend -------------------------------------------------------------------------

    async def complete(self, probe: Probe, index: int) -> Completion:
        return await asyncio.to_thread(self._complete, probe, index)

    async def complete_in(self, probe: Probe, index: int, plan: BatchPlan) -> Completion:
        """One repeat in the batch ``plan`` describes (fillers drawn from ``index``)."""
        return (await asyncio.to_thread(self._run, probe, index, plan, False))[0]

    async def complete_choices(self, probe: Probe, index: int, plan: BatchPlan) -> list[Completion]:
        """Every choice of the probe's request (its ``n``), side by side in one batch."""
        return await asyncio.to_thread(self._run, probe, index, plan, True)

    def first_token(self, text: str) -> str | None:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            return None
        token = tokenizer.first_generated_token(text)
        return None if token is None else tokenizer.token_text(token)

    def describe(self) -> dict[str, Any]:
        return {"type": "local", **self.engine.describe(), "batch_sizes": self.batch_sizes,
                "batch_seed": self.seed}

    async def aclose(self) -> None:
        return None

    # -- one repeat ----------------------------------------------------------------------

    def _complete(self, probe: Probe, index: int) -> Completion:
        """``complete`` without the event loop (the thread it runs on)."""
        return self._run(probe, index, BatchPlan(self.batch_sizes[index % len(self.batch_sizes)]), False)[0]

    def _run(self, probe: Probe, index: int, plan: BatchPlan, choices: bool) -> list[Completion]:
        size = plan.size
        rng = random.Random(f"detaudit-batch:{self.seed}:{index}")
        try:
            targets = self._requests(probe)
            if not choices:
                targets = targets[:1]
            prompt_len = len(self.engine.encode(targets[0]))
            position = rng.randrange(size)  # drawn whatever the plan: the fillers stay the same
            position = {"first": 0, "last": size - 1}.get(plan.position, position)
            fillers = [self._filler(rng, probe, targets[0].max_tokens) for _ in range(size - 1)]
            batch = fillers[:position] + targets + fillers[position:]
            if len(batch) > self.engine.max_slots:
                raise RequestError(f"a batch of {len(batch)} needs {len(batch)} engine slots; "
                                   f"this backend has {self.engine.max_slots} (its largest batch size)")
            with self._lock:
                before = self.engine.prefill_chunk
                if plan.prefill_chunk is not None:
                    self.engine.prefill_chunk = plan.prefill_chunk
                try:
                    results = self.engine.generate(batch)[position:position + len(targets)]
                finally:
                    self.engine.prefill_chunk = before
        except RequestError as exc:
            raise BackendError("bad_request", f"local engine: {exc}") from None
        extra = {"batch_size": size, "batch_position": position, "prompt_tokens": prompt_len}
        if plan.prefill_chunk is not None:
            extra["prefill_chunk"] = plan.prefill_chunk
        return [self._completion(result, {**extra, **({"choice": i} if choices else {})})
                for i, result in enumerate(results)]

    def _completion(self, result: Any, extra: dict[str, Any]) -> Completion:
        tokenizer = self.engine.tokenizer
        positions = [
            Position(token=t.text, logprob=t.logprob, logprob_text=float.hex(t.logprob),
                     bytes=list(tokenizer.token_bytes(t.token_id)) if tokenizer else None,
                     top=[TokenLogprob(token=text, logprob=lp, logprob_text=float.hex(lp),
                                       bytes=list(tokenizer.token_bytes(i)) if tokenizer else None)
                          for i, text, lp in t.top])
            for t in result.tokens
        ]
        return Completion(text=result.text, finish_reason=result.finish_reason, positions=positions,
                          model=self.model, system_fingerprint=self.system_fingerprint, extra=extra)

    def _request(self, probe: Probe) -> Request:
        return self._requests(probe)[0]

    def _requests(self, probe: Probe) -> list[Request]:
        """The probe's request as the engine runs it, one Request per choice: the OpenAI
        wire body that the OpenAI backend would send, read by the parser that
        `detaudit serve` runs."""
        body, _ = request_body(probe.request, probe.api, self.model)
        try:
            parsed = parse(body, probe.api, self.engine, self.model)
        except InvalidRequest as exc:
            raise RequestError(exc.message) from None
        if parsed.stream:  # session.prepare refuses it first; a Probe built by hand gets here
            raise RequestError("stream = true needs an HTTP endpoint (detaudit serve); the "
                               "in-process engine answers whole")
        return parsed.requests

    def _filler(self, rng: random.Random, probe: Probe, max_tokens: int) -> Request:
        """Random tokens of a random length, generating as long as the probe so the batch
        keeps its size for the probe's whole life."""
        low, high = FILLER_TOKENS
        if probe.load is not None:
            low, high = probe.load.filler_min_tokens, probe.load.filler_max_tokens
        high = max(1, min(high, self.engine.max_len - max_tokens))
        length = rng.randint(min(low, high), high)
        ids = [rng.choice(self._filler_vocab) for _ in range(length)]
        return Request(prompt_ids=ids, max_tokens=max_tokens, ignore_eos=True)
