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

from local_backend.config import ModelConfig, ModelLoadError, parse_dtype, resolve_model_dir
from local_backend.decode_graphs import MODES as DECODE_MODES
from local_backend.decode_graphs import DecodeRunner
from local_backend.kernels import Ops, get_ops, resolve_implementation
from local_backend.kv_cache import KVCache
from local_backend.loader import load_model
from local_backend.model import RotaryTable, Transformer
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
                 prefix_cache: bool = False, prefill_chunk: int | None = None):
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
        # With a queue, requests join in groups of this many (see _should_admit).
        self.admit_group = max(1, max_slots // 8) if graphs else 1
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
             prefill_chunk: int | None = None) -> "Engine":
        """A model folder (or "tiny") on a device, with one kernel mode for every op.

        ``kernel_impl`` picks how batch-invariant ops run (kernels.IMPLEMENTATIONS):
        by default the Triton kernels on a GPU and the exact-order torch ops on a CPU.
        ``decode_graphs`` (decode_graphs.MODES): CUDA graphs per batch-size bucket for
        decode steps; by default on a GPU only. ``prefix_cache``: reuse the K/V of prompt
        prefixes already computed (prefix_cache.py). ``prefill_chunk``: prompt tokens of one
        sequence per forward pass at most (None: the whole prompt in one pass)."""
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
                   prefix_cache=prefix_cache, prefill_chunk=prefill_chunk)

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
            if not self._running:
                return []
            token_ids, slots, positions, last_rows = [], [], [], []
            prefilling, sampled = [], []  # sequences given prompt tokens / to sample this pass
            chunk = self.prefill_chunk
            for seq in self._running:
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
            logits, logprobs = self._forward(token_ids, slots, positions, last_rows)
            if self.prefix is not None:  # their prompts' K/V (so far) are written now
                for seq in prefilling:
                    self.prefix.record(seq.slot, seq.prompt_ids[:seq.cached])
            picks = self._pick(sampled, logits, logprobs) if sampled else []
            finished = []
            for seq, (token, logprob, top) in zip(sampled, picks):
                generated = len(seq.tokens)
                if self._advance(seq, token, logprob, top):
                    finished.append(seq)
                if on_token is not None and len(seq.tokens) > generated:  # EOS adds none
                    on_token(seq.request.request_id, seq.tokens[-1])
            with self._queue_lock:
                for seq in finished:
                    self._running.remove(seq)
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

    def _pick(self, sequences: list[_Sequence], logits: torch.Tensor,
              logprobs: torch.Tensor) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """(token, its logprob, top (id, logprob) pairs) for each sequence's row.

        Greedy picks, the chosen logprobs and the top-k run on the device for the whole
        batch and come back in ONE copy (a float64 tensor: token ids and fp32 values are
        exact in it), so a step waits on the device once, not once per row or per field.
        Each is a selection, with no arithmetic, so a row's picks are the same whatever
        the batch: argmax takes the first (lowest-id) maximum, like ``sampler.greedy``;
        top-k ties are ordered by id, and a row whose tie crosses the k-th place (its
        k-th and (k+1)-th values are equal) is re-sorted exactly on the host."""
        requests = [seq.request for seq in sequences]
        if any(req.temperature > 0 for req in requests):  # seeded draws: one row at a time
            tokens = torch.argmax(logprobs, dim=-1).tolist()
            for row, (seq, req) in enumerate(zip(sequences, requests)):
                if req.temperature > 0:
                    tokens[row] = sample(logits[row], logprobs[row], self.ops, req.temperature, req.top_p,
                                         req.seed, position=len(seq.generated))
            index = torch.tensor(tokens, dtype=torch.long, device=logprobs.device)
        else:
            index = torch.argmax(logprobs, dim=-1)
        parts = [index[:, None].double(), logprobs.gather(1, index[:, None]).double()]
        k = max(req.top_logprobs for req in requests)
        width = min(k + 1, logprobs.shape[-1])  # one past k: does a tie cross the k-th place?
        if k:
            values, ids = torch.topk(logprobs, width, dim=-1)
            parts += [values.double(), ids.double()]
        rows = torch.cat(parts, dim=1).cpu().tolist()  # the step's one device -> host copy
        picks = []
        for row, (req, packed) in enumerate(zip(requests, rows)):
            top: list[tuple[int, float]] = []
            if req.top_logprobs:
                values, ids = packed[2:2 + width], packed[2 + width:]
                if width > k and values[k - 1] == values[k]:  # ties at the k-th place: exact order
                    v, i = torch.sort(logprobs[row].cpu(), descending=True, stable=True)
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
        scores: list[list[float]] = []
        start = 0
        while start < len(completions):
            stop, tokens = start, 0
            room = max(1, self.cache.free_slots)
            while stop < len(completions) and stop - start < room and (
                    stop == start or tokens + len(prompt_ids) + len(completions[stop]) <= pack_tokens):
                tokens += len(prompt_ids) + len(completions[stop]) - 1
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

    def fingerprint(self) -> str:
        """system_fingerprint: what decides the numbers (weights, kernels and how they
        run, dtype, device). The one format, in process and served."""
        return "local-{}-{}-{}-{}-{}".format(self.weights_sha256[:12], self.ops.name,
                                            self.ops.implementation, str(self.dtype).removeprefix("torch."),
                                            self.device)

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
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "triton": triton_version,
            "triton_interpret": self.ops.implementation == "triton-interpreter",
            "max_slots": self.max_slots,
            "max_len": self.max_len,
            "prefix_cache": self.prefix is not None,
            "prefill_chunk": self.prefill_chunk,
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
