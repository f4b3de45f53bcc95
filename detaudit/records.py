"""What one request produced, as every backend reports it and the store keeps it.

Logprobs carry two forms: ``logprob`` (the float) and ``logprob_text`` (the number
exactly as the server sent it in its JSON, or ``float.hex`` for the local engine),
so that "bitwise distinct" is judged on what was received, not on a re-rendering.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
