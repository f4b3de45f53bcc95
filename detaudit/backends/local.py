"""The bundled engine as a backend: each repeat runs inside a batch of its own size.

Repeat ``index`` runs in a batch of ``batch_sizes[index % len(batch_sizes)]`` requests:
the probe's request plus filler requests of other lengths, drawn from an RNG seeded
by (seed, index), with the probe at a random place in the batch. The batch an index
runs in is therefore the same on every run and after a resume, and the only thing
that varies between repeats is what batch-invariant kernels are meant to make
irrelevant.
"""

from __future__ import annotations

import asyncio
import random
import threading
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


class LocalBackend:
    name = "local"

    def __init__(self, model: str = LOCAL_MODEL, kernels: str = DEFAULT_KERNELS,
                 batch_sizes: list[int] | tuple[int, ...] = DEFAULT_BATCH_SIZES,
                 device: str | None = None, seed: int = 0, dtype: str | None = None,
                 max_len: int = 2048, kernel_impl: str = DEFAULT_KERNEL_IMPL):
        sizes = list(batch_sizes)
        if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
            raise ValueError(f"batch_sizes must be a non-empty list of positive integers, got {batch_sizes!r}")
        self.batch_sizes = sizes
        self.seed = seed
        self.engine = Engine.load(model, kernels=kernels, device=device, dtype=dtype,
                                  max_slots=max(sizes), max_len=max_len, kernel_impl=kernel_impl)
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
        size = self.batch_sizes[index % len(self.batch_sizes)]
        rng = random.Random(f"detaudit-batch:{self.seed}:{index}")
        try:
            target = self._request(probe)
            prompt_len = len(self.engine.encode(target))
            position = rng.randrange(size)
            fillers = [self._filler(rng, probe, target.max_tokens) for _ in range(size - 1)]
            batch = fillers[:position] + [target] + fillers[position:]
            with self._lock:
                result = self.engine.generate(batch)[position]
        except RequestError as exc:
            raise BackendError("bad_request", f"local engine: {exc}") from None
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
                          model=self.model, system_fingerprint=self.system_fingerprint,
                          extra={"batch_size": size, "batch_position": position,
                                 "prompt_tokens": prompt_len})

    def _request(self, probe: Probe) -> Request:
        """The probe's request as the engine runs it: the OpenAI wire body that the OpenAI
        backend would send, read by the parser that `detaudit serve` runs."""
        body, _ = request_body(probe.request, probe.api, self.model)
        try:
            parsed = parse(body, probe.api, self.engine, self.model)
        except InvalidRequest as exc:
            raise RequestError(exc.message) from None
        if parsed.stream:  # session.prepare refuses it first; a Probe built by hand gets here
            raise RequestError("stream = true needs an HTTP endpoint (detaudit serve); the "
                               "in-process engine answers whole")
        return parsed.requests[0]

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
