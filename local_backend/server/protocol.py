"""The OpenAI wire format: request bodies -> engine Requests, Results -> response JSON.

Validation is strict and explains itself, as OpenAI's does: an unknown parameter, a
value out of range or a feature this server lacks (tools, penalties) is a 400 naming
the parameter, never a silent default. Logprobs go out as Python floats, whose JSON
text (repr) parses back to the very same float. ``stream: true`` is parsed here
(``Parsed.stream``, ``Parsed.include_usage``); the chunks are written by
``local_backend/server/streaming.py`` from the same per-token logprob entries.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from local_backend.engine import MAX_TOP_LOGPROBS, Engine, GeneratedToken, Request, RequestError, Result
from local_backend.server.scheduler import choice_seed

MAX_N = 16
MAX_STOP = 4
SENTINEL_LOGPROB = -9999.0  # what OpenAI sends where a logprob is -inf (detaudit.defaults has the
#                             client's copy: the engine package does not import detaudit)
ROLES = ("system", "developer", "user", "assistant")

# Accepted and ignored: they do not change what is computed.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Accepted only at their neutral value: anything else would change the numbers.
_NEUTRAL = {"frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None),
            "logit_bias": (None,), "best_of": (None, 1), "echo": (None, False),
            "suffix": (None,), "tools": (None,), "tool_choice": (None, "none"),
            "functions": (None,), "response_format": (None,)}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "n", "stop", "logprobs",
           "ignore_eos", "stream", "stream_options"}
_STREAM_OPTIONS = {"include_usage"}
_CHAT = _COMMON | {"messages", "top_logprobs", "max_completion_tokens"}
_COMPLETIONS = _COMMON | {"prompt"}


class InvalidRequest(Exception):
    """A 4xx answer: message, the offending parameter, OpenAI's error type and code."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind


@dataclass
class Parsed:
    """A validated request: what the engine runs and how the answer is written."""

    api: str  # chat | completions
    model: str
    prompt_ids: list[int]
    requests: list[Request] = field(default_factory=list)  # one per choice
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False  # answer as server-sent events (streaming.py)
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage


def parse(body: Any, api: str, engine: Engine, model_id: str) -> Parsed:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    allowed = _CHAT if api == "chat" else _COMPLETIONS
    for key, value in body.items():
        if key in allowed or key in _IGNORED:
            continue
        if key in _NEUTRAL:
            if value in _NEUTRAL[key] or (key == "response_format" and value == {"type": "text"}) \
                    or (key == "logit_bias" and value == {}):
                continue
            raise InvalidRequest(f"{key}={_short(value)}: this server does not support {key}; "
                                 "leave it out", key)
        raise InvalidRequest(f"Unrecognized request argument supplied: {key}", key)

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter (GET /v1/models lists it)", "model")
    if model != model_id:
        raise InvalidRequest(f"The model `{model}` does not exist; this server serves "
                             f"`{model_id}` (GET /v1/models)", "model", status=404,
                             code="model_not_found")

    prompt_ids = _prompt_ids(body, api, engine)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise InvalidRequest("top_p must be in (0, 1]", "top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise InvalidRequest(f"seed must be an integer, got {_short(seed)}", "seed")
    n = _integer(body, "n", 1, 1, MAX_N)
    stop = _stop(body.get("stop"))
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise InvalidRequest("ignore_eos must be true or false", "ignore_eos")
    logprobs, top = _logprobs(body, api)
    stream, include_usage = _stream(body)

    room = engine.max_len - len(prompt_ids)
    if room < 1:
        raise InvalidRequest(f"the prompt is {len(prompt_ids)} tokens; this model's context is "
                             f"{engine.max_len} tokens. Shorten the prompt.", "messages" if api == "chat" else "prompt")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    default = 16 if api == "completions" else min(256, room)
    max_tokens = _integer(body, key, default, 1, None)
    if max_tokens > room:
        raise InvalidRequest(f"{key}={max_tokens} plus the prompt's {len(prompt_ids)} tokens exceed "
                             f"this model's context of {engine.max_len} tokens; ask for at most {room}", key)

    requests = [Request(prompt_ids=list(prompt_ids), max_tokens=max_tokens, temperature=temperature,
                        top_p=top_p, seed=choice_seed(seed, i), stop=stop, top_logprobs=top,
                        ignore_eos=ignore_eos)
                for i in range(n)]
    return Parsed(api, model, prompt_ids, requests, logprobs, top, stream, include_usage)


def _stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage); stream_options without stream is a 400, as on OpenAI and vLLM."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be true or false, got {_short(stream)}", "stream")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object, e.g. {\"include_usage\": true}",
                             "stream_options")
    for key, value in options.items():
        if key not in _STREAM_OPTIONS:
            raise InvalidRequest(f"stream_options.{key} is not supported; this server knows "
                                 f"{', '.join(sorted(_STREAM_OPTIONS))}", f"stream_options.{key}")
        if value is not None and not isinstance(value, bool):
            raise InvalidRequest(f"stream_options.{key} must be true or false",
                                 f"stream_options.{key}")
    return True, bool(options.get("include_usage"))


def _prompt_ids(body: dict, api: str, engine: Engine) -> list[int]:
    request, where = prompt_request(body, api)
    try:
        ids = engine.encode(request)
    except RequestError as exc:
        raise InvalidRequest(str(exc), where) from None
    except Exception as exc:  # the tokenizer on odd text (lone surrogates...)
        raise InvalidRequest(f"the {where} cannot be tokenized: {type(exc).__name__}", where) from None
    if not ids:
        raise InvalidRequest(f"the {where} is empty", where)
    vocab = engine.config.vocab_size
    if not all(0 <= t < vocab for t in ids):
        raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", where)
    return ids


def prompt_request(body: dict, api: str) -> tuple[Request, str]:
    """The prompt part of a body as an engine Request (messages, prompt text or prompt
    ids, nothing else set), and the parameter it came from: what the engine encodes, for
    a server and for anything that rebuilds a served prompt (detaudit crosscheck)."""
    if api == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty array of {role, content}", "messages")
        clean = [_message(m, i) for i, m in enumerate(messages)]
        request = Request(messages=clean)
        where = "messages"
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # one prompt in a list, as some clients send it
        if isinstance(prompt, str):
            request = Request(prompt=prompt)
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            request = Request(prompt_ids=prompt)
        else:
            raise InvalidRequest("prompt must be a string or a list of token ids (one prompt "
                                 "per request)", "prompt")
        where = "prompt"
    return request, where


def _message(message: Any, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object with role and content", where)
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)}, got {_short(role)}",
                             f"{where}.role")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{where}.content[{j}]: only text parts "
                                     '({"type": "text", "text": ...}) are supported', f"{where}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise InvalidRequest(f"{where}.content must be a string", f"{where}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _logprobs(body: dict, api: str) -> tuple[bool, int]:
    value = body.get("logprobs")
    if api == "chat":
        if value is not None and not isinstance(value, bool):
            raise InvalidRequest("logprobs must be true or false", "logprobs")
        top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if body.get("top_logprobs") is not None and not value:
            raise InvalidRequest("logprobs must be true when top_logprobs is set", "top_logprobs")
        return bool(value), top
    if value is None:
        return False, 0
    if not _is_int(value) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS} "
                             "(the number of top logprobs per token)", "logprobs")
    return True, value


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stops)):
        raise InvalidRequest(f"stop must be a non-empty string or a list of up to {MAX_STOP}", "stop")
    return stops


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not low <= value <= high):
        raise InvalidRequest(f"{key} must be a number from {low:g} to {high:g}, got {_short(value)}", key)
    return float(value)


def _integer(body: dict, key: str, default: int, low: int, high: int | None) -> int:
    value = body.get(key)
    if value is None:
        return default
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise InvalidRequest(f"{key} must be an integer {bound}, got {_short(value)}", key)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- responses ----------------------------------------------------------------------------


def _lp(value: float) -> float:
    return value if math.isfinite(value) else SENTINEL_LOGPROB


def _bytes(engine: Engine, token_id: int) -> list[int] | None:
    return list(engine.tokenizer.token_bytes(token_id)) if engine.tokenizer else None


def chat_logprob(engine: Engine, token: GeneratedToken) -> dict:
    """One entry of a chat answer's ``logprobs.content``, whole or streamed."""
    return {"token": token.text, "logprob": _lp(token.logprob), "bytes": _bytes(engine, token.token_id),
            "top_logprobs": [{"token": text, "logprob": _lp(lp), "bytes": _bytes(engine, i)}
                             for i, text, lp in token.top]}


def completions_logprobs(tokens: list[GeneratedToken], offset: int = 0) -> dict:
    """A legacy completion's ``logprobs`` for ``tokens``, whose first starts at character
    ``offset`` of the token texts (a streamed chunk carries the offsets of the whole)."""
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token.text)
    tops = []
    for t in tokens:
        top: dict[str, float] = {}
        for _, text, lp in t.top:
            top.setdefault(text, _lp(lp))  # same text twice: the likelier one
        tops.append(top)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [_lp(t.logprob) for t in tokens],
            "top_logprobs": tops, "text_offset": offsets}


def chat_response(parsed: Parsed, results: list[Result], engine: Engine, fingerprint: str) -> dict:
    choices = []
    for index, result in enumerate(results):
        logprobs = None
        if parsed.logprobs:
            logprobs = {"content": [chat_logprob(engine, t) for t in result.tokens], "refusal": None}
        choices.append({"index": index,
                        "message": {"role": "assistant", "content": result.text, "refusal": None},
                        "logprobs": logprobs, "finish_reason": result.finish_reason})
    return _envelope("chatcmpl", "chat.completion", parsed, results, choices, fingerprint)


def completions_response(parsed: Parsed, results: list[Result], engine: Engine, fingerprint: str) -> dict:
    choices = []
    for index, result in enumerate(results):
        logprobs = completions_logprobs(result.tokens) if parsed.logprobs else None
        choices.append({"text": result.text, "index": index, "logprobs": logprobs,
                        "finish_reason": result.finish_reason})
    return _envelope("cmpl", "text_completion", parsed, results, choices, fingerprint)


def _envelope(prefix: str, kind: str, parsed: Parsed, results: list[Result], choices: list,
              fingerprint: str) -> dict:
    return {"id": response_id(prefix), "object": kind, "created": int(time.time()),
            "model": parsed.model, "system_fingerprint": fingerprint, "choices": choices,
            "usage": usage(parsed, results)}


def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(parsed: Parsed, results: list[Result]) -> dict:
    completion_tokens = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": len(parsed.prompt_ids), "completion_tokens": completion_tokens,
            "total_tokens": len(parsed.prompt_ids) + completion_tokens}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
