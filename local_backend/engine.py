"""The engine: continuous batching over a preallocated KV cache, greedy and seeded
sampling, and OpenAI-style logprobs.

``add_request`` queues a request; each ``step`` runs ONE forward pass over the
prompt tokens of newly admitted requests plus one decode token of every running
request, samples one token per request, and returns the requests that finished
(their slots are freed for the next step); a caller that streams gets each new token
as well (``step(on_token)``). With ``prefill_chunk`` C (chunked prefill, as vLLM's
per-request long-prefill threshold) a prompt enters at most C tokens a pass; its first
token is sampled in the pass that computes its last one. ``generate`` is that loop, run
to the end.
With ``overlap`` (on by default on a GPU), a step launches the next decode pass before
it reads the last pass's picks: the tokens chosen on the device are fed straight to the
next pass, and the host's bookkeeping runs while the GPU computes. Results (and streamed
tokens) then come one step later; their bits are the same (tests/local/test_overlap.py).
A server drives ``step`` from one background thread while other threads call
``add_request`` and ``abort``: the queue has its own lock, so neither waits for a
forward pass. An aborted request leaves at the start of the next step, slot and all.

Logprobs are ``ops.log_softmax`` in fp32 of the logits the token was sampled from,
before temperature (as OpenAI reports them).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from local_backend.config import ModelConfig, ModelLoadError, parse_dtype, resolve_model_dir
from local_backend.decode_graphs import MODES as DECODE_MODES
from local_backend.decode_graphs import DecodeRunner
from local_backend.kernels import Ops, get_ops, resolve_implementation
from local_backend.kernels.revision import KERNELS_REVISION
from local_backend.kv_cache import KVCache
from local_backend.loader import load_model
from local_backend.model import RotaryTable, Transformer
from local_backend.overlap import PicksInFlight, to_device
from local_backend.prefix_cache import PrefixCache
from local_backend.sampler import sample
from local_backend.tokenizer import TemplateError, Tokenizer

MAX_TOP_LOGPROBS = 20
SCORE_PACK_TOKENS = 4096  # about this many tokens per packed teacher-forcing pass (score_many)


class RequestError(ValueError):
    """A request the engine cannot run (too long, bad parameter); the message says why."""


@dataclass
class Request:
    """Exactly one of prompt_ids, messages (chat template) or prompt (text) is given."""

    prompt_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = 0
    ignore_eos: bool = False  # fillers and benchmarks: always run max_tokens steps
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class GeneratedToken:
    token_id: int
    text: str
    logprob: float  # fp32 value, exact as a Python float
    top: list[tuple[int, str, float]]  # (token id, text, logprob), most probable first


@dataclass
class Result:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    tokens: list[GeneratedToken]


@dataclass
class _Sequence:
    request: Request
    prompt_ids: list[int]
    slot: int = -1
    cached: int = 0  # tokens whose K/V are in the cache
    generated: list[int] = field(default_factory=list)
    tokens: list[GeneratedToken] = field(default_factory=list)
    finish_reason: str = ""

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.generated


@dataclass
class _Plan:
    """One forward pass to launch: its rows, and the sequences it samples (in row order).
    A pass fed from the device has ``feed`` = (the previous pass's token ids on the
    device, the row of that pass each of this pass's rows takes its token from)."""

    token_ids: list[int] | None
    slots: list[int]
    positions: list[int]
    rows: list[int]  # rows whose logits give a sequence's next token
    prefilling: list[_Sequence]
    sampled: list[_Sequence]
    feed: tuple[torch.Tensor, list[int]] | None = None
    split: tuple[int, int] | None = None  # (tokens, sampled rows) of a prefill pass run before the decode rows


@dataclass
class _Launched:
    """A pass on its way: the sequences it samples and their picks (None: it samples none)."""

    sampled: list[_Sequence]
    picks: PicksInFlight | None

    @property
    def deferred(self) -> bool:
        return self.picks is not None and self.picks.deferred


def encode_request(request: Request, tokenizer: Tokenizer | None, model_name: str) -> list[int]:
    """The prompt token ids of a request (chat template for messages): the one rule, for
    the engine and for anything that must rebuild its prompts (detaudit crosscheck)."""
    given = [x is not None for x in (request.prompt_ids, request.messages, request.prompt)]
    if sum(given) != 1:
        raise RequestError("give exactly one of prompt_ids, messages or prompt")
    if request.prompt_ids is not None:
        return list(request.prompt_ids)
    if tokenizer is None:
        raise RequestError(f"{model_name} has no tokenizer.json; send prompt_ids")
    try:
        if request.messages is not None:
            return tokenizer.encode_chat(request.messages)
    except TemplateError as exc:
        raise RequestError(str(exc)) from None
    return tokenizer.encode(request.prompt, add_special_tokens=True)


class Engine:
    def __init__(self, model: Transformer, config: ModelConfig, ops: Ops, tokenizer: Tokenizer | None,
                 device: torch.device, dtype: torch.dtype, weights_sha256: str,
                 max_slots: int, max_len: int, path: Path | None = None, decode_graphs: str = "auto",
                 prefix_cache: bool = False, prefill_chunk: int | None = None, overlap: bool | None = None):
        self.model, self.config, self.ops, self.tokenizer = model, config, ops, tokenizer
        self.device, self.dtype, self.weights_sha256, self.path = device, dtype, weights_sha256, path
        self.max_slots, self.max_len = max_slots, max_len
        if model.rope is None or model.rope.cos.shape[0] < max_len:  # a model shared by engines
            model.rope = RotaryTable(config, max_len, dtype, device)
        if decode_graphs not in DECODE_MODES:
            raise ValueError(f"decode_graphs must be one of {', '.join(DECODE_MODES)}, got {decode_graphs!r}")
        graphs = decode_graphs == "on" or (decode_graphs == "auto" and device.type == "cuda")
        padded = graphs or decode_graphs == "buckets"  # one more slot: the padding rows' scratch slot
        self.cache = KVCache(config.num_layers, max_slots + padded, max_len, config.num_kv_heads,
                             config.head_dim, dtype, device)
        # Decode steps at fixed batch-size buckets, replayed from CUDA graphs on a GPU (decode_graphs.py).
        self.decode = DecodeRunner(model, ops, self.cache, self.cache.reserve(), max_slots, device,
                                   graphs) if padded else None
        self.prefix = PrefixCache(self.cache) if prefix_cache else None  # prefix_cache.py
        self.prefill_chunk = check_prefill_chunk(prefill_chunk)  # None: a whole prompt per pass
        if overlap is not None and not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True, False or None (on for CUDA), got {overlap!r}")
        self.overlap = device.type == "cuda" if overlap is None else overlap
        self._in_flight: _Launched | None = None  # overlap: the pass launched, its picks not read yet
        # With a queue, requests join in groups of this many (see _should_admit).
        self.admit_group = max(1, max_slots // 8) if graphs else 1
        # A pass with prompts and decode tokens both: run it as a prefill pass, then the decode
        # rows as a decode step (a graph replay), rather than as one eager pass? (bench_e2e measures.)
        self.split_mixed = False
        eos = set(config.eos_token_ids)
        if tokenizer is not None and (eos_id := tokenizer.token_id(tokenizer.eos_token)) is not None:
            eos.add(eos_id)
        self.eos_ids = eos
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._lock = threading.RLock()  # the running batch and the cache
        self._queue_lock = threading.Lock()  # the waiting queue, _aborted, membership of _running
        self._aborted: set[str] = set()  # running requests to drop at the next step

    @classmethod
    def load(cls, model: str | Path = "tiny", kernels: str = "batch-invariant",
             device: str | None = None, dtype: str | torch.dtype | None = None,
             max_slots: int = 8, max_len: int = 2048, kernel_impl: str = "auto",
             decode_graphs: str = "auto", prefix_cache: bool = False,
             prefill_chunk: int | None = None, overlap: bool | None = None) -> "Engine":
        """A model folder (or "tiny") on a device, with one kernel mode for every op.

        ``kernel_impl`` picks how batch-invariant ops run (kernels.IMPLEMENTATIONS):
        by default the Triton kernels on a GPU and the exact-order torch ops on a CPU.
        ``decode_graphs`` (decode_graphs.MODES): CUDA graphs per batch-size bucket for
        decode steps; by default on a GPU only. ``prefix_cache``: reuse the K/V of prompt
        prefixes already computed (prefix_cache.py). ``prefill_chunk``: prompt tokens of one
        sequence per forward pass at most (None: the whole prompt in one pass). ``overlap``:
        launch each decode step before reading the last one's picks (None: on a GPU only)."""
        torch_device = _pick_device(device)
        try:  # bad names fail before anything loads
            resolve_implementation(kernels, torch_device.type, kernel_impl)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        folder = resolve_model_dir(model)
        config = ModelConfig.from_folder(folder)
        torch_dtype = parse_dtype(dtype, "dtype") if dtype is not None else config.dtype
        ops = get_ops(kernels, torch_device.type, kernel_impl)
        tokenizer = Tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
        max_len = min(max_len, config.max_position_embeddings)
        if config.sliding_window:  # within the window, full attention is exact
            max_len = min(max_len, config.sliding_window)
        net, sha = load_model(folder, config, torch_dtype, torch_device)
        return cls(net, config, ops, tokenizer, torch_device, torch_dtype, sha,
                   max_slots=max_slots, max_len=max_len, path=folder, decode_graphs=decode_graphs,
                   prefix_cache=prefix_cache, prefill_chunk=prefill_chunk, overlap=overlap)

    # ---- requests -------------------------------------------------------------

    def encode(self, request: Request) -> list[int]:
        """The prompt token ids of a request (chat template for messages)."""
        return encode_request(request, self.tokenizer, self.config.name)

    def add_request(self, request: Request) -> str:
        """Queue a request; it joins the batch at the next step with a free slot."""
        ids = self.encode(request)
        self._validate(request, ids)
        with self._queue_lock:
            self._waiting.append(_Sequence(request, ids))
        return request.request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request whose client went away or timed out: at once if it is still
        waiting, at the start of the next step if it runs (its slot is freed before new
        requests are admitted). False when the engine does not hold it (finished, or
        never added). Safe to call from any thread, during a step too."""
        with self._queue_lock:
            for seq in self._waiting:
                if seq.request.request_id == request_id:
                    self._waiting.remove(seq)
                    return True
            if any(seq.request.request_id == request_id for seq in self._running):
                self._aborted.add(request_id)
                return True
        return False

    def backlog(self) -> tuple[int, int, int]:
        """(running, waiting, tokens still to generate for all of them, at most): what a
        server needs to estimate how long new work would wait."""
        with self._queue_lock:
            running = [s for s in self._running if s.request.request_id not in self._aborted]
            tokens = sum(s.request.max_tokens - len(s.generated) for s in running)
            tokens += sum(s.request.max_tokens for s in self._waiting)
            return len(running), len(self._waiting), tokens

    def has_unfinished(self) -> bool:
        with self._queue_lock:
            return bool(self._waiting or self._running)

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run requests to completion, batched; results in the order given. For
        callers that own the engine; a server calls ``step`` from its own loop instead."""
        ids = [self.add_request(r) for r in requests]
        done: dict[str, Result] = {}
        while len(done) < len(ids):
            for result in self.step():
                done[result.request_id] = result
        return [done[i] for i in ids]

    # ---- one step -------------------------------------------------------------

    @torch.inference_mode()
    def step(self, on_token: Callable[[str, GeneratedToken], None] | None = None) -> list[Result]:
        """One forward pass over every running request; returns those that finished.
        ``on_token(request_id, token)`` is called for each token this step generated
        (before the finished are returned): what a streaming server sends as it comes."""
        with self._lock:
            if self.overlap:
                return self._step_overlapped(on_token)
            self._admit()
            if not self._running:
                return []
            return self._finish(self._launch(self._plan(), defer=False), on_token)

    def _step_overlapped(self, on_token) -> list[Result]:
        """Launch the next pass, then read the one before it. When the next pass can be a
        decode step fed from the device (every running sequence was sampled by the pass in
        flight, and no admission or abort is due), it is launched before the pass in flight
        is read; otherwise that pass is read first and this step runs as ``step`` does, its
        picks left in flight when it samples greedily."""
        results: list[Result] = []
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            fed = self._plan_fed(previous)
            if fed is not None:
                self._in_flight = self._launch(fed, defer=True)
                return self._finish(previous, on_token)
            results = self._finish(previous, on_token)
        self._admit()
        if self._running:
            launched = self._launch(self._plan(), defer=True)
            if launched.deferred:
                self._in_flight = launched
            else:
                results += self._finish(launched, on_token)
        return results

    def _admit(self) -> None:
        """Drop the aborted, then admit waiting requests into free slots (_should_admit)."""
        with self._queue_lock:
            if self._aborted:
                for seq in [s for s in self._running if s.request.request_id in self._aborted]:
                    self._running.remove(seq)
                    self.cache.free(seq.slot)
                self._aborted.clear()  # ids that finished meanwhile are simply gone
            admit = self._should_admit()
            while admit and self._waiting and self.cache.free_slots:
                seq = self._waiting.popleft()
                if self.prefix is None:
                    seq.slot = self.cache.allocate()
                else:  # the cached part of the prompt is copied in, not prefilled
                    seq.slot, seq.cached = self.prefix.admit(seq.prompt_ids)
                self._running.append(seq)

    def _plan(self) -> _Plan:
        """The pass over every running sequence: prompt tokens (a chunk at most) of those
        still prefilling, the last sampled token of the others."""
        token_ids, slots, positions, last_rows = [], [], [], []
        prefilling, sampled = [], []  # sequences given prompt tokens / to sample this pass
        chunk = self.prefill_chunk
        order, first_decode, cut = self._running, -1, None
        if self.split_mixed and self.decode is not None:  # prompts first, then the decode rows
            prompts = [s for s in self._running if s.cached < len(s.prompt_ids)]
            if 0 < len(prompts) < len(self._running):
                order = prompts + [s for s in self._running if s.cached >= len(s.prompt_ids)]
                first_decode = len(prompts)
        for i, seq in enumerate(order):
            if i == first_decode:  # the prefill pass ends here (_forward_split)
                cut = (len(token_ids), len(sampled))
            prompt = len(seq.prompt_ids)  # the (uncached part of the) prompt, or the last sampled token
            if seq.cached < prompt:
                prefilling.append(seq)
                end = prompt if chunk is None else min(prompt, seq.cached + chunk)
                new = seq.prompt_ids[seq.cached:end]
            else:
                new = seq.generated[seq.cached - prompt:]
            token_ids += new
            slots += [seq.slot] * len(new)
            positions += range(seq.cached, seq.cached + len(new))
            seq.cached += len(new)
            if seq.cached == prompt + len(seq.generated):  # its last token's logits give the next
                last_rows.append(len(token_ids) - 1)
                sampled.append(seq)
        return _Plan(token_ids, slots, positions, last_rows, prefilling, sampled, split=cut)

    def _plan_fed(self, previous: _Launched) -> _Plan | None:
        """The decode step after ``previous`` (whose picks are still on the device), or None
        when the next pass must see them first: an abort or an admission is due (predicted
        as ``step`` would decide it once they are read), a running sequence is still
        prefilling, or nothing would be left to run. A sequence that the pass in flight
        brings to max_tokens gets no row; one that it ends by EOS or a stop string does
        (not knowable yet): that row's token is dropped when read."""
        if not previous.deferred:
            return None
        with self._queue_lock:
            row_of = {id(seq): row for row, seq in enumerate(previous.sampled) if not seq.finish_reason}
            if self._aborted or len(row_of) != len(self._running) or any(
                    id(seq) not in row_of for seq in self._running):
                return None
            live = [(row_of[id(seq)], seq) for seq in self._running]  # the running order, as ``_plan``'s
            going = [(row, seq) for row, seq in live if len(seq.generated) + 1 < seq.request.max_tokens]
            free = self.cache.free_slots + len(live) - len(going)
            if not going or (self._waiting and free and free >= min(len(self._waiting), self.admit_group)):
                return None
        source, slots, positions = [], [], []
        for row, seq in going:
            source.append(row)
            slots.append(seq.slot)
            positions.append(seq.cached)
            seq.cached += 1
        return _Plan(None, slots, positions, list(range(len(going))), [], [seq for _, seq in going],
                     feed=(previous.picks.tokens, source))

    def _launch(self, plan: _Plan, defer: bool) -> _Launched:
        """Run the pass (queued on the device) and start its picks' way to the host."""
        if plan.feed is not None:
            logits, logprobs = self._forward_fed(*plan.feed, plan.slots, plan.positions)
        elif plan.split is not None:
            logits, logprobs = self._forward_split(plan)
        else:
            logits, logprobs = self._forward(plan.token_ids, plan.slots, plan.positions, plan.rows)
        if self.prefix is not None:  # their prompts' K/V (so far) are written now
            for seq in plan.prefilling:
                self.prefix.record(seq.slot, seq.prompt_ids[:seq.cached])
        picks = self._pick_launch(plan.sampled, logits, logprobs, defer) if plan.sampled else None
        return _Launched(plan.sampled, picks)

    def _finish(self, launched: _Launched, on_token) -> list[Result]:
        """Read a pass's picks, record each sequence's token, free the finished."""
        picks = self._pick_read(launched.sampled, launched.picks) if launched.picks is not None else []
        finished = []
        for seq, (token, logprob, top) in zip(launched.sampled, picks):
            if seq.finish_reason:  # it ended at the pass before (overlap): a spare row
                continue
            generated = len(seq.tokens)
            if self._advance(seq, token, logprob, top):
                finished.append(seq)
            if on_token is not None and len(seq.tokens) > generated:  # EOS adds none
                on_token(seq.request.request_id, seq.tokens[-1])
        if not finished:
            return []
        spare = {id(seq) for seq in self._in_flight.sampled} if self._in_flight is not None else set()
        with self._queue_lock:
            for seq in finished:
                self._running.remove(seq)
                if id(seq) in spare:  # the pass in flight writes its last token's K/V: not a prefix
                    seq.cached -= 1
                if self.prefix is not None:  # generated tokens' K/V are a prefix too
                    self.prefix.record(seq.slot, seq.all_ids[:seq.cached])
                self.cache.free(seq.slot)
        return [self._result(seq) for seq in finished]

    def _should_admit(self) -> bool:
        """Admit the next waiting request now? A pass that prefills runs eagerly, while a
        pure decode step replays a CUDA graph, so with a queue, new requests join in groups
        of ``admit_group`` (once that many slots are free) rather than one per step. A lone
        request joins at once. Scheduling only: no request's bits depend on it."""
        return not self._running or self.cache.free_slots >= min(len(self._waiting), self.admit_group)

    def _forward(self, token_ids, slots, positions, rows):
        if self.decode is not None and len(rows) == len(token_ids) == len(set(slots)):
            return self.decode.run(token_ids, slots, positions)  # one token per sequence: a decode step
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        with _cpu_threads(getattr(self.ops, "cpu_threads", None) if self.device.type == "cpu" else None):
            hidden = self.model(as_tensor(token_ids), as_tensor(slots), as_tensor(positions), self.cache, self.ops)
            if not rows:  # every sequence is still prefilling (chunked): K/V only
                return None, None
            logits = self.model.logits(hidden[as_tensor(rows)], self.ops).float()
            return logits, self.ops.log_softmax(logits)

    def _forward_split(self, plan: _Plan):
        """A mixed pass as a prefill pass of the prompts, then a decode step of the rest; the
        rows of both, in the plan's order (prompts first)."""
        t, r = plan.split
        first = self._forward(plan.token_ids[:t], plan.slots[:t], plan.positions[:t], plan.rows[:r])
        second = self._forward(plan.token_ids[t:], plan.slots[t:], plan.positions[t:], [x - t for x in plan.rows[r:]])
        parts = [p for p in (first, second) if p[0] is not None]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _forward_fed(self, tokens: torch.Tensor, source: list[int], slots: list[int], positions: list[int]):
        """A decode step whose row i takes token ``tokens[source[i]]`` (on the device)."""
        if self.decode is not None:
            return self.decode.run_fed(tokens, source, slots, positions)
        index = to_device(torch.tensor([source, slots, positions], dtype=torch.long),
                          torch.empty((3, len(source)), dtype=torch.long, device=self.device))
        with _cpu_threads(getattr(self.ops, "cpu_threads", None) if self.device.type == "cpu" else None):
            hidden = self.model(tokens.index_select(0, index[0]), index[1], index[2], self.cache, self.ops)
            logits = self.model.logits(hidden, self.ops).float()  # every row is a sequence's last
            return logits, self.ops.log_softmax(logits)

    def _pick(self, sequences: list[_Sequence], logits: torch.Tensor,
              logprobs: torch.Tensor) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """(token, its logprob, top (id, logprob) pairs) for each sequence's row, read now."""
        return self._pick_read(sequences, self._pick_launch(sequences, logits, logprobs, defer=False))

    def _pick_launch(self, sequences: list[_Sequence], logits: torch.Tensor, logprobs: torch.Tensor,
                     defer: bool) -> PicksInFlight:
        """Start the picks of each sequence's row (see ``_pick_read``) on their way to the host.
        ``defer`` (greedy rows only): the copy does not wait for the device, and the token ids
        stay on the device for the next pass to read.

        Greedy picks, the chosen logprobs and the top-k run on the device for the whole
        batch and come back in ONE copy (a float64 tensor: token ids and fp32 values are
        exact in it), so a step waits on the device once, not once per row or per field.
        Each is a selection, with no arithmetic, so a row's picks are the same whatever
        the batch: argmax takes the first (lowest-id) maximum, like ``sampler.greedy``;
        top-k ties are ordered by id, and a row whose tie crosses the k-th place (its
        k-th and (k+1)-th values are equal) is re-sorted exactly on the host."""
        requests = [seq.request for seq in sequences]
        tokens = None
        if any(req.temperature > 0 for req in requests):  # seeded draws: one row at a time
            tokens = torch.argmax(logprobs, dim=-1).tolist()
            for row, (seq, req) in enumerate(zip(sequences, requests)):
                if req.temperature > 0:
                    tokens[row] = sample(logits[row], logprobs[row], self.ops, req.temperature, req.top_p,
                                         req.seed, position=len(seq.generated))
            index, tokens = torch.tensor(tokens, dtype=torch.long, device=logprobs.device), None
        else:
            index = torch.argmax(logprobs, dim=-1)
            if defer:
                tokens = F.pad(index, (0, 1))  # and a 0 for padding rows
        parts = [index[:, None].double(), logprobs.gather(1, index[:, None]).double()]
        k = max(req.top_logprobs for req in requests)
        width = min(k + 1, logprobs.shape[-1])  # one past k: does a tie cross the k-th place?
        if k:
            values, ids = torch.topk(logprobs, width, dim=-1)
            parts += [values.double(), ids.double()]
        tie_rows = logprobs.clone() if tokens is not None and k else logprobs
        return PicksInFlight(torch.cat(parts, dim=1), width, k, tie_rows, tokens)  # the step's one copy

    def _pick_read(self, sequences: list[_Sequence],
                   flight: PicksInFlight) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """(token, its logprob, top (id, logprob) pairs) of each row, once they are on the host."""
        k, width = flight.k, flight.width
        picks = []
        for row, (seq, packed) in enumerate(zip(sequences, flight.rows())):
            req = seq.request
            top: list[tuple[int, float]] = []
            if req.top_logprobs:
                values, ids = packed[2:2 + width], packed[2 + width:]
                if width > k and values[k - 1] == values[k]:  # ties at the k-th place: exact order
                    v, i = torch.sort(flight.tie_rows[row].cpu(), descending=True, stable=True)
                    pairs = list(zip(i[:k].tolist(), v[:k].tolist()))
                else:
                    pairs = sorted(zip(map(int, ids[:k]), values[:k]), key=lambda p: (-p[1], p[0]))
                top = pairs[:req.top_logprobs]
            picks.append((int(packed[0]), packed[1], top))
        return picks

    def _advance(self, seq: _Sequence, token: int, logprob: float, top: list[tuple[int, float]]) -> bool:
        """Record the sampled token of ``seq``; True when it has finished."""
        req = seq.request
        if token in self.eos_ids and not req.ignore_eos:
            seq.finish_reason = "stop"  # EOS ends the text and is not reported
            return True
        seq.generated.append(token)
        seq.tokens.append(GeneratedToken(token, self._text(token), logprob,
                                         [(i, self._text(i), v) for i, v in top]))
        if req.stop and self._stop_index(seq) is not None:
            seq.finish_reason = "stop"
            return True
        if len(seq.generated) >= req.max_tokens:
            seq.finish_reason = "length"
            return True
        return False

    def _stop_index(self, seq: _Sequence) -> int | None:
        text = self.tokenizer.decode(seq.generated)
        hits = [i for s in seq.request.stop if (i := text.find(s)) >= 0]
        return min(hits) if hits else None

    def _result(self, seq: _Sequence) -> Result:
        text = self.tokenizer.decode(seq.generated) if self.tokenizer else ""
        if seq.request.stop and (cut := self._stop_index(seq)) is not None:
            text = text[:cut]
        return Result(seq.request.request_id, seq.prompt_ids, list(seq.generated), text,
                      seq.finish_reason, seq.tokens)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id) if self.tokenizer else ""

    def _validate(self, request: Request, ids: list[int]) -> None:
        if not ids:
            raise RequestError("the prompt is empty")
        if not all(0 <= i < self.config.vocab_size for i in ids):
            raise RequestError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        if not isinstance(request.max_tokens, int) or request.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {request.max_tokens!r}")
        if len(ids) + request.max_tokens > self.max_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({request.max_tokens}) "
                               f"exceeds the engine's max_len {self.max_len}; shorten the prompt, "
                               "lower max_tokens, or load the engine with a larger max_len")
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be 0..{MAX_TOP_LOGPROBS}, got {request.top_logprobs}")
        if request.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {request.temperature}")
        if not 0 < request.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {request.top_p}")
        if request.stop and self.tokenizer is None:
            raise RequestError("stop strings need the model's tokenizer.json")

    # ---- whole-sequence scoring (tests, echo, teacher forcing) ------------------------

    def forward_logits(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Logits [len, vocab] (fp32) at every position of each sequence, all of them
        packed into one forward pass, as a prefill of that batch would compute them."""
        return [logits for logits, _ in self._prefill(sequences, [0] * len(sequences))]

    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """log_softmax rows [len, vocab]: row i is the distribution of token i + 1."""
        return self.ops.log_softmax(self.forward_logits([token_ids])[0])

    def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        """Teacher forcing: the logprob of each completion token given the prompt and the
        completion tokens before it, from ONE prefill pass over prompt + completion[:-1].
        The rows go through the same ops, dtype and fp32 ``ops.log_softmax`` as a decode
        step's logprobs (``_forward``), so with batch-invariant kernels each value is
        bitwise the one generation reported (prefill = decode)."""
        return self.score_many(prompt_ids, [completion_ids])[0]

    def score_many(self, prompt_ids: list[int], completions: list[list[int]],
                   pack_tokens: int = SCORE_PACK_TOKENS) -> list[list[float]]:
        """``score`` of several completions of one prompt, packed into few forward passes
        (as many sequences as there are free slots, about ``pack_tokens`` tokens a pass).
        With batch-invariant kernels each value is bitwise what ``score`` gives alone;
        with other kernels the packing may change the last bits, as a batch does."""
        for completion in completions:
            if not prompt_ids or not completion:
                raise RequestError("score needs a non-empty prompt and a non-empty completion")
            if not all(0 <= i < self.config.vocab_size for i in list(prompt_ids) + list(completion)):
                raise RequestError(f"token ids must be in [0, {self.config.vocab_size})")
        sequence_length = [len(prompt_ids) + len(c) - 1 for c in completions]  # prompt + c[:-1]
        scores: list[list[float]] = []
        start = 0
        while start < len(completions):
            stop, tokens = start + 1, sequence_length[start]  # one at least, however long
            room = max(1, self.cache.free_slots)
            while (stop < len(completions) and stop - start < room
                   and tokens + sequence_length[stop] <= pack_tokens):
                tokens += sequence_length[stop]
                stop += 1
            chunk = completions[start:stop]
            passes = self._prefill([list(prompt_ids) + list(c[:-1]) for c in chunk],
                                   [len(prompt_ids) - 1] * len(chunk))
            for (_, logprobs), completion in zip(passes, chunk):
                index = torch.tensor(completion, dtype=torch.long, device=logprobs.device)
                scores.append(logprobs.gather(1, index[:, None])[:, 0].tolist())
            start = stop
        return scores

    @torch.inference_mode()
    def _prefill(self, sequences: list[list[int]], first_rows: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, logprobs) of each sequence from row ``first_rows[i]`` to its end, all of
        them packed into one forward pass in slots of their own (freed after)."""
        with self._lock:
            if len(sequences) > self.cache.free_slots:
                raise RequestError(f"{len(sequences)} sequences but {self.cache.free_slots} free slots")
            for ids in sequences:
                if not 0 < len(ids) <= self.max_len:
                    raise RequestError(f"sequence length {len(ids)} not in 1..{self.max_len}")
            held = [self.cache.allocate() for _ in sequences]
            for slot in held if self.prefix is not None else ():
                self.prefix.forget(slot)
            try:
                token_ids = [t for ids in sequences for t in ids]
                slots = [s for s, ids in zip(held, sequences) for _ in ids]
                positions = [p for ids in sequences for p in range(len(ids))]
                rows, starts = [], 0
                for ids, first in zip(sequences, first_rows):
                    rows += range(starts + first, starts + len(ids))
                    starts += len(ids)
                logits, logprobs = self._forward(token_ids, slots, positions, rows)
            finally:
                for slot in held:
                    self.cache.free(slot)
            sizes = [len(ids) - first for ids, first in zip(sequences, first_rows)]
            return list(zip(logits.split(sizes), logprobs.split(sizes)))

    def warm_up(self) -> int:
        """Compile before serving: every matmul kernel the tile table can pick for this
        model's weights (an eager pass of prompts and decode rows can meet row counts that
        no warm-up pass had; on a GPU with Triton kernels only) and, with CUDA graphs, every
        decode bucket's graph. The number of matmul launches it took (0 elsewhere)."""
        launched = 0
        if self.device.type == "cuda" and hasattr(self.ops, "warm_up"):
            with self._lock:
                launched = self.ops.warm_up(self.model.linear_layers())
                torch.cuda.synchronize(self.device)
        if self.decode is not None and self.decode.graphs:
            self.decode.capture_all()
        return launched

    def fingerprint(self) -> str:
        """system_fingerprint: what decides the numbers (weights, kernels, how they run and
        their revision, dtype, device), e.g. ``local-8ac27644e391-batch-invariant-cpu-exact-
        k2026.12-float32-cpu``. The one format, in process and served."""
        return "local-{}-{}-{}-k{}-{}-{}".format(self.weights_sha256[:12], self.ops.name,
                                                self.ops.implementation, KERNELS_REVISION,
                                                str(self.dtype).removeprefix("torch."), self.device)

    def describe(self) -> dict[str, Any]:
        from importlib import metadata
        try:  # the installed version, without importing Triton where it does not run
            triton_version = metadata.version("triton")
        except metadata.PackageNotFoundError:
            triton_version = None
        return {
            "engine": "local_backend",
            "model": self.config.name,
            "architecture": self.config.architecture,
            "model_path": str(self.path) if self.path else None,
            "weights_sha256": self.weights_sha256,
            "kernels": self.ops.name,
            "kernel_impl": self.ops.implementation,
            "kernels_revision": KERNELS_REVISION,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "triton": triton_version,
            "triton_interpret": self.ops.implementation == "triton-interpreter",
            "max_slots": self.max_slots,
            "max_len": self.max_len,
            "prefix_cache": self.prefix is not None,
            "prefill_chunk": self.prefill_chunk,
            "overlap": self.overlap,
        }


def check_prefill_chunk(chunk: int | None) -> int | None:
    """A prefill chunk size: None (whole prompts) or a positive whole number of tokens."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive number of tokens or None, got {chunk!r}")
    return chunk


@contextlib.contextmanager
def _cpu_threads(threads: int | None):
    """torch's CPU thread count for one forward pass (ops that ask for one), then back."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"device {device!r} is not a torch device; use 'cpu' or 'cuda'") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
    return chosen
