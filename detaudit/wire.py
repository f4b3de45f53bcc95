"""A probe's request as the OpenAI wire body: the one translation, used by the OpenAI
backend before it sends and by the in-process engine backend before the engine's own
request parser (local_backend/server/protocol.py, the same one `detaudit serve` runs),
so a probe sends the same request in process and served."""

from __future__ import annotations

from typing import Any


def request_body(request: dict[str, Any], api: str, model: str) -> tuple[dict[str, Any], bool]:
    """(the body, whether it asks for logprobs).

    Legacy completions take ``logprobs`` as the top-k count, so a probe's
    ``logprobs = true, top_logprobs = k`` becomes ``logprobs = k`` there. A streamed
    request asks for the usage chunk (``stream_options.include_usage``), as a whole
    answer carries its usage; the probe's own ``stream_options`` win."""
    body = dict(request)
    if api == "completions":
        top = body.pop("top_logprobs", None)
        if body.get("logprobs") is True:
            body["logprobs"] = int(top or 0)
        elif body.get("logprobs") is False:
            del body["logprobs"]
        wants_logprobs = body.get("logprobs") is not None
    else:
        wants_logprobs = bool(body.get("logprobs"))
    if body.get("stream"):
        body["stream_options"] = {"include_usage": True, **(body.get("stream_options") or {})}
    body["model"] = model  # the backend's model wins
    return body, wants_logprobs
