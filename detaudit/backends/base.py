"""The one interface every backend implements; the runner knows nothing else."""

from __future__ import annotations

from typing import Any, Protocol

from detaudit.probes import Probe
from detaudit.records import Completion
from detaudit.redact import redact

# How long one attempt may take in all (connect, send, every read): --request-timeout.
DEFAULT_REQUEST_TIMEOUT_S = 60.0


class BackendError(Exception):
    """A request failed. ``kind`` is one of: rate_limit, server_error, timeout,
    connection, bad_request, auth, not_found, bad_response, no_logprobs (asked
    for, none came back). ``retryable`` tells the
    runner whether another attempt may succeed; ``retry_after`` is the server's hint
    in seconds, if it gave one; ``raw`` is the body that came back, when it was not a
    completion (kept in the store's failed-attempt log). Message and raw text are
    redacted here, so no backend can hand a secret on."""

    def __init__(self, kind: str, message: str, *, retryable: bool = False,
                 retry_after: float | None = None, status: int | None = None,
                 raw: str | None = None):
        message = redact(message)
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.raw = None if raw is None else redact(raw)
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


class Backend(Protocol):
    """Sends one probe request and returns what came back.

    ``index`` is the sample's index in the run; backends that schedule their own
    batches (the local engine) use it to pick the batch a repeat runs in, so a
    resumed run computes each index the same way.
    """

    name: str

    async def complete(self, probe: Probe, index: int) -> Completion:
        """Raise BackendError on failure, never anything else for expected faults."""
        ...

    def first_token(self, text: str) -> str | None:
        """The token ``text`` starts with under this backend's tokenizer (e.g. "T"
        for "Tails" with OpenAI's), or None when the tokenizer is unknown."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for the run manifest (model, base_url, kernels, versions...). Never secrets."""
        ...

    async def aclose(self) -> None: ...
