"""One request through the real ``OpenAIBackend`` to a test server, from sync test code:
the streamed-answer tests against scripted streams (``sse_server``) and against
``detaudit serve`` send the same way, so they read a failure the same way."""

from __future__ import annotations

import asyncio

from detaudit.backends.base import BackendError
from detaudit.backends.openai_backend import OpenAIBackend
from detaudit.probes import Probe
from detaudit.records import Completion


def send(url: str, probe: Probe, model: str = "gpt-4o-mini", **backend_args) -> Completion | BackendError:
    """``probe`` sent once as sample 0 by a fresh backend (``api``: the probe's), closed
    after; the completion, or the ``BackendError`` it raised (returned, so a test can
    check its kind). ``backend_args``: ``OpenAIBackend``'s own (timeout, api_key_env, ...)."""
    async def go() -> Completion | BackendError:
        backend = OpenAIBackend(model, url, api=probe.api, **backend_args)
        try:
            return await backend.complete(probe, 0)
        except BackendError as exc:
            return exc
        finally:
            await backend.aclose()
    return asyncio.run(go())
