"""Teacher-forced logprobs of a stored run's sampled tokens under a reference model:
the other side of ``detaudit crosscheck``, what an RL trainer recomputes.

Each stored completion is rebuilt as token ids under the reference's tokenizer: the
prompt from the stored probe (its OpenAI wire body, read by the parser ``detaudit
serve`` runs, then the engine's own encoding rule: chat template for messages, the
text with special tokens for a completions prompt), the sampled tokens one by one
(``TokenMap``: exact matches only). One forward pass over prompt + completion then
gives the logprob of every sampled token. Two engines:

- ``local``: the bundled engine's ``Engine.score`` (the ops, dtype and fp32
  ``log_softmax`` of generation), so with batch-invariant kernels a served run's
  logprobs come back bitwise (prefill = decode, end to end);
- ``transformers``: ``AutoModelForCausalLM`` from the folder (float32 by default),
  ``torch.log_softmax`` of its logits in float32.

A sample that cannot be scored exactly is skipped and counted by reason (``SKIP_REASONS``),
never guessed. torch and transformers are imported when a reference is loaded.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from detaudit.analysis.frame import parse_logprob_text
from detaudit.probes import Probe
from detaudit.records import Position, Sample
from detaudit.session import UsageProblem
from detaudit.store import RunStore
from detaudit.wire import request_body

if TYPE_CHECKING:
    import pandas as pd

ENGINES = ("local", "transformers")
# why a stored sample was not scored
SKIP_REASONS = {
    "error": "the request failed (an error row)",
    "empty": "no generated token (the answer ended at once)",
    "no_logprobs": "a successful answer stored without logprobs",
    "unmapped_token": "a sampled token the reference's vocabulary does not have",
    "ambiguous_token": "a sampled token that several reference token ids spell",
    "prompt_mismatch": "the server counted another number of prompt tokens than the rebuilt prompt",
    "too_long": "prompt + completion longer than the reference's context",
}
PROBLEM_EXAMPLES = 5  # how many skipped samples are named, per run
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")  # vLLM's --return-tokens-as-token-ids


class Reference(Protocol):
    """A model that scores token ids; ``tokenizer`` is the bundled engine's Tokenizer
    of the reference folder (prompts and token ids are rebuilt with it)."""

    tokenizer: Any
    name: str
    max_len: int
    vocab_size: int

    def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]: ...

    def score_many(self, prompt_ids: list[int], completions: list[list[int]]) -> list[list[float]]:
        """``score`` of each completion; a reference may pack them where that keeps
        every value as it would be alone."""
        ...

    def describe(self) -> dict[str, Any]: ...


class TokenMap:
    """Sampled token -> reference token id, exactly or not at all.

    A stored position is matched by its bytes when the server sent them (chat
    logprobs: OpenAI, vLLM, ``detaudit serve``), else by its text: ``token_id:N``
    (vLLM's token-id mode), the token's own text under the reference tokenizer (bytes
    as UTF-8, a partial sequence as \\x escapes, as ``detaudit serve`` writes it), or
    ``bytes:\\xNN...`` (a partial UTF-8 sequence as some servers spell it). No match:
    ``unmapped``; several ids: ``ambiguous``."""

    def __init__(self, texts: Sequence[str], byte_strings: Sequence[bytes]):
        self.size = len(texts)
        self._by_text: dict[str, list[int]] = {}
        self._by_bytes: dict[bytes, list[int]] = {}
        for i, (text, data) in enumerate(zip(texts, byte_strings)):
            self._by_text.setdefault(text, []).append(i)
            self._by_bytes.setdefault(data, []).append(i)

    @classmethod
    def of(cls, tokenizer: Any) -> "TokenMap":
        ids = range(tokenizer.vocab_size)
        return cls([tokenizer.token_text(i) for i in ids], [tokenizer.token_bytes(i) for i in ids])

    def lookup(self, position: Position) -> tuple[int | None, str | None]:
        """(token id, None), or (None, "unmapped_token" | "ambiguous_token")."""
        if position.bytes is not None:
            candidates = self._by_bytes.get(bytes(position.bytes), [])
        elif (m := _TOKEN_ID.match(position.token)) and int(m.group(1)) < self.size:
            candidates = [int(m.group(1))]
        else:
            candidates = self._by_text.get(position.token, [])
            if not candidates and position.token.startswith("bytes:"):
                candidates = self._by_bytes.get(_escaped_bytes(position.token[6:]), [])
        if len(candidates) == 1:
            return candidates[0], None
        return None, "ambiguous_token" if candidates else "unmapped_token"


def _escaped_bytes(text: str) -> bytes:
    try:
        return text.encode("latin-1").decode("unicode_escape").encode("latin-1")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return b""


@dataclass
class ScoredRun:
    """The token frame (``detaudit.analysis.crosscheck.TOKEN_COLUMNS``) and what was left out."""

    frame: "pd.DataFrame"
    samples: int
    scored: int
    skipped: dict[str, int]
    problems: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    sequences: int = 0  # distinct completions, each scored once

    def accounting(self) -> dict[str, Any]:
        return {"total": self.samples, "scored": self.scored, "skipped": self.skipped,
                "distinct_completions": self.sequences, "prompt_tokens": self.prompt_tokens,
                "problems": self.problems}


def load_reference(model: str | Path, engine: str = "local", kernels: str | None = None,
                   kernel_impl: str | None = None, dtype: str | None = None,
                   device: str | None = None) -> Reference:
    """The reference model of a folder (or "tiny"): the bundled engine or transformers."""
    if engine not in ENGINES:
        raise UsageProblem(f"--engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "transformers" and (kernels is not None or kernel_impl is not None):
        raise UsageProblem("--kernels and --kernel-impl pick the bundled engine's ops; "
                           "drop them with --engine transformers")
    try:
        if engine == "local":
            return LocalReference(model, kernels, kernel_impl, dtype, device)
        return TransformersReference(model, dtype, device)
    except ImportError as exc:
        extra = "'.[local]'" if engine == "local" else "transformers"
        raise UsageProblem(f"the {engine} reference needs {exc.name or 'torch'}: "
                           f"pip install {extra}") from None


class LocalReference:
    """The bundled engine: ``Engine.score``. With batch-invariant kernels the completions
    are packed into few forward passes (``Engine.score_many``: each value bitwise what it
    is alone); with default kernels each is scored in a pass of its own, so the reference
    does not move with the packing."""

    PACKED_SLOTS = 8

    def __init__(self, model: str | Path, kernels: str | None, kernel_impl: str | None,
                 dtype: str | None, device: str | None):
        from detaudit.defaults import DEFAULT_KERNEL_IMPL, DEFAULT_KERNELS
        from local_backend.config import ModelLoadError
        from local_backend.engine import Engine

        kernels = kernels or DEFAULT_KERNELS
        self.packed = kernels == "batch-invariant"
        self.engine = Engine.load(model, kernels=kernels, device=device, dtype=dtype,
                                  max_slots=self.PACKED_SLOTS if self.packed else 1,
                                  kernel_impl=kernel_impl or DEFAULT_KERNEL_IMPL)
        if self.engine.tokenizer is None:
            raise ModelLoadError(f"{self.engine.path}: no tokenizer.json; crosscheck rebuilds "
                                 "prompts and tokens with it")
        self.tokenizer = self.engine.tokenizer
        self.name = self.engine.config.name
        self.max_len = self.engine.max_len
        self.vocab_size = self.engine.config.vocab_size

    def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        return self.engine.score(prompt_ids, completion_ids)

    def score_many(self, prompt_ids: list[int], completions: list[list[int]]) -> list[list[float]]:
        if self.packed:
            return self.engine.score_many(prompt_ids, completions)
        return [self.engine.score(prompt_ids, ids) for ids in completions]

    def describe(self) -> dict[str, Any]:
        facts = self.engine.describe()
        return {"engine": "local", "model": facts["model_path"], "kernels": facts["kernels"],
                "packed": self.packed,
                "kernel_impl": facts["kernel_impl"], "dtype": facts["dtype"],
                "device": facts["device"], "fingerprint": self.engine.fingerprint()}


class TransformersReference:
    """Hugging Face transformers' own forward pass, log_softmax in float32."""

    def __init__(self, model: str | Path, dtype: str | None, device: str | None):
        import torch
        import transformers

        from local_backend.config import ModelLoadError, parse_dtype, resolve_model_dir
        from local_backend.tokenizer import Tokenizer

        self.folder = resolve_model_dir(model)
        self.torch_dtype = parse_dtype(dtype or "float32", "--dtype")
        try:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            raise ModelLoadError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        self.tokenizer = Tokenizer(self.folder)
        bar = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # stderr is for detaudit's own lines
        try:
            net = transformers.AutoModelForCausalLM.from_pretrained(self.folder, dtype=self.torch_dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{self.folder}: transformers cannot load it ({exc})") from None
        finally:
            if bar:
                transformers.utils.logging.enable_progress_bar()
        self.model = net.to(self.device).eval()
        config = net.config.get_text_config()  # any architecture transformers runs, not only the engine's
        self.name = self.folder.name
        self.max_len = getattr(config, "max_position_embeddings", None) or 1 << 30
        self.vocab_size = config.vocab_size
        self.versions = {"transformers": transformers.__version__, "torch": torch.__version__}

    def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        import torch

        ids = torch.tensor([list(prompt_ids) + list(completion_ids[:-1])], device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1:].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            chosen = torch.tensor(completion_ids, dtype=torch.long, device=self.device)
            return logprobs.gather(1, chosen[:, None])[:, 0].tolist()

    def score_many(self, prompt_ids: list[int], completions: list[list[int]]) -> list[list[float]]:
        """One at a time: padding a batch would change transformers' numbers."""
        return [self.score(prompt_ids, ids) for ids in completions]

    def describe(self) -> dict[str, Any]:
        return {"engine": "transformers", "model": str(self.folder),
                "dtype": str(self.torch_dtype).removeprefix("torch."), "device": str(self.device),
                **self.versions}


def probe_of(manifest: dict[str, Any], where: str) -> Probe:
    """The stored probe; a text-only run is refused (nothing to compare)."""
    try:
        probe = Probe.from_dict(manifest["probe"], source=f"{where}/manifest.json")
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageProblem(f"{where}: the manifest's probe cannot be read ({exc})") from None
    if not probe.asks_logprobs:
        raise UsageProblem(f"{where}: a text-only run (its probe asked for no logprobs); "
                           "crosscheck compares logprobs: run the probe again without --no-logprobs")
    return probe


def prompt_ids(probe: Probe, reference: Reference, where: str) -> list[int]:
    """The probe's prompt as token ids under the reference: the body a backend sends,
    read and encoded as ``detaudit serve`` does."""
    from local_backend.engine import RequestError, encode_request
    from local_backend.server.protocol import InvalidRequest, prompt_request

    body, _ = request_body(probe.request, probe.api, reference.name)
    try:
        request, _ = prompt_request(body, probe.api)
        ids = encode_request(request, reference.tokenizer, reference.name)
    except (InvalidRequest, RequestError) as exc:
        raise UsageProblem(f"{where}: the reference cannot rebuild the probe's prompt: "
                           f"{getattr(exc, 'message', exc)}") from None
    if not ids or not all(0 <= i < reference.vocab_size for i in ids):
        raise UsageProblem(f"{where}: the probe's prompt is empty or has token ids outside the "
                           f"reference's vocabulary of {reference.vocab_size}; is --reference the served model?")
    return ids


def reported_prompt_tokens(sample: Sample) -> int | None:
    """How many prompt tokens the server said it read: the in-process engine's
    ``extra["prompt_tokens"]``, else ``usage.prompt_tokens`` of the stored body."""
    completion = sample.completion
    if completion is None:
        return None
    value = completion.extra.get("prompt_tokens")
    if value is None and completion.raw:
        try:
            value = (json.loads(completion.raw).get("usage") or {}).get("prompt_tokens")
        except (ValueError, AttributeError):
            value = None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def score_run(store: RunStore, reference: Reference) -> ScoredRun:
    """Every stored sample's sampled tokens, teacher-forced under ``reference``.
    Distinct completions are scored once each (one sequence per pass, so a value
    never depends on what else was scored)."""
    import pandas as pd

    where = str(store.path)
    probe = probe_of(store.manifest, where)
    prompt = prompt_ids(probe, reference, where)
    tokens = TokenMap.of(reference.tokenizer)
    skipped: Counter[str] = Counter()
    problems: list[dict[str, Any]] = []
    kept: list[tuple[Sample, list[int]]] = []

    def skip(sample: Sample, why: str, **detail: Any) -> None:
        skipped[why] += 1
        if len(problems) < PROBLEM_EXAMPLES:
            problems.append({"index": sample.index, "why": why, **detail})

    samples = store.samples()
    for sample in samples:
        completion = sample.completion
        if sample.status != "ok" or completion is None:
            skip(sample, "error", kind=sample.error_kind)
            continue
        if not completion.positions:
            skip(sample, "no_logprobs" if completion.text else "empty")
            continue
        reported = reported_prompt_tokens(sample)
        if reported is not None and reported != len(prompt):
            skip(sample, "prompt_mismatch", server=reported, reference=len(prompt))
            continue
        ids, failure = [], None
        for at, position in enumerate(completion.positions):
            token_id, why = tokens.lookup(position)
            if token_id is not None and token_id >= reference.vocab_size:
                token_id, why = None, "unmapped_token"  # a tokenizer entry the model has no row for
            if token_id is None:
                failure = (why, at, position.token)
                break
            ids.append(token_id)
        if failure is not None:
            skip(sample, failure[0], position=failure[1], token=failure[2])
            continue
        if len(prompt) + len(ids) - 1 > reference.max_len:
            skip(sample, "too_long", tokens=len(prompt) + len(ids), max_len=reference.max_len)
            continue
        kept.append((sample, ids))

    distinct = list(dict.fromkeys(tuple(ids) for _, ids in kept))  # each scored once
    scores = dict(zip(distinct, reference.score_many(prompt, [list(ids) for ids in distinct])))
    rows: dict[str, list] = {column: [] for column in
                             ("index", "position", "token", "server_logprob", "server_logprob_text",
                              "reference_logprob")}
    for sample, ids in kept:
        for at, (position, value) in enumerate(zip(sample.completion.positions, scores[tuple(ids)])):
            rows["index"].append(sample.index)
            rows["position"].append(at)
            rows["token"].append(position.token)
            rows["server_logprob"].append(parse_logprob_text(position.logprob_text))
            rows["server_logprob_text"].append(position.logprob_text)
            rows["reference_logprob"].append(value)
    return ScoredRun(pd.DataFrame(rows), samples=len(samples), scored=len(kept),
                     skipped=dict(sorted(skipped.items())), problems=problems,
                     prompt_tokens=len(prompt), sequences=len(scores))
