"""What one request produced, as every backend reports it and the store keeps it.

Logprobs carry two forms: ``logprob`` (the float) and ``logprob_text`` (the number
exactly as the server sent it in its JSON, or ``float.hex`` for the local engine),
so that "bitwise distinct" is judged on what was received, not on a re-rendering.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from operator import attrgetter
from typing import Any, Literal


@dataclass(frozen=True)
class TokenLogprob:
    """One candidate token at one position (an entry of ``top_logprobs``)."""

    token: str
    logprob: float
    logprob_text: str
    bytes: list[int] | None = None


@dataclass(frozen=True)
class Position:
    """One generated position: the chosen token and the top-k candidates."""

    token: str
    logprob: float
    logprob_text: str
    top: list[TokenLogprob] = field(default_factory=list)
    bytes: list[int] | None = None


@dataclass
class Completion:
    """A backend's answer to one request."""

    text: str
    finish_reason: str | None = None
    positions: list[Position] = field(default_factory=list)
    model: str | None = None
    system_fingerprint: str | None = None
    # Backend-specific facts about how it was computed, e.g. {"batch_size": 8,
    # "batch_position": 3} for the local engine, {"load_level": 16} for load sweeps.
    extra: dict[str, Any] = field(default_factory=dict)
    # The response body as received (remote backends); kept for audits.
    raw: str | None = None


Status = Literal["ok", "error"]


@dataclass
class Sample:
    """One stored request of a run, successful or not (errors are never dropped)."""

    index: int
    status: Status
    completion: Completion | None
    attempts: int
    started_at: float  # unix time of the first attempt
    latency_s: float  # of the last attempt
    error_kind: str | None = None  # e.g. "rate_limit", "server_error", "timeout", "connection", "bad_response"
    error_message: str | None = None
    group: str | None = None  # label the analysis can split by (load level, batch size)


def position_to_dict(p: Position) -> dict[str, Any]:
    return asdict(p)


def position_from_dict(d: dict[str, Any]) -> Position:
    top = [TokenLogprob(**t) for t in d.get("top", [])]
    return Position(
        token=d["token"],
        logprob=d["logprob"],
        logprob_text=d["logprob_text"],
        top=top,
        bytes=d.get("bytes"),
    )


@dataclass
class SampleColumns:
    """A run's samples as columns, in index order: what the analysis reads.

    Samples that generated the same positions share one entry of ``distinct_positions``
    (``positions[i]`` is sample i's entry). A stored run of a million coin flips holds a
    few dozen distinct top-k lists, so reading it parses and walks a few dozen lists,
    not a million (``RunStore.sample_columns``). A sample without a completion has None
    for the completion's fields and an empty positions entry.
    """

    index: list[int]
    status: list[str]
    error_kind: list[str | None]
    group: list[str | None]
    attempts: list[int]
    latency_s: list[float]
    has_completion: list[bool]
    output: list[str | None]
    finish_reason: list[str | None]
    model: list[str | None]
    system_fingerprint: list[str | None]
    positions: list[int]
    distinct_positions: list[list[Position]]

    def __len__(self) -> int:
        return len(self.index)

    @classmethod
    def from_samples(cls, samples: list[Sample]) -> "SampleColumns":
        """Samples (any order) as columns sorted by index; each sample its own entry."""
        samples = list(samples)
        if any(a.index > b.index for a, b in zip(samples, samples[1:])):
            samples.sort(key=attrgetter("index"))  # stable: equal indices keep their order
        index, status, error_kind, group, attempts, latency_s, completions = (
            list(map(attrgetter(name), samples)) for name in
            ("index", "status", "error_kind", "group", "attempts", "latency_s", "completion"))
        present = [c is not None for c in completions]
        filled = [c if c is not None else _NO_COMPLETION for c in completions]
        output, finish_reason, model, fingerprint, positions = (
            list(map(attrgetter(name), filled)) for name in
            ("text", "finish_reason", "model", "system_fingerprint", "positions"))
        return cls(index=index, status=status, error_kind=error_kind, group=group,
                   attempts=attempts, latency_s=latency_s, has_completion=present,
                   output=output, finish_reason=finish_reason, model=model,
                   system_fingerprint=fingerprint, positions=list(range(len(samples))),
                   distinct_positions=positions)


# what a sample without a completion reads as: None fields, no positions
_NO_COMPLETION = Completion(text=None, positions=())  # type: ignore[arg-type]
