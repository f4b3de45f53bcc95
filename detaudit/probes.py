"""Probes are data: a TOML file says what to send and what to track.

Format (every key but ``name`` and ``[request]`` is optional)::

    name = "coin-flip"
    kind = "outcome"            # outcome | top-logprobs | fixed-seed | greedy-divergence | load-sweep
    description = "..."
    api = "chat"                # chat | completions

    [request]                   # sent as is (OpenAI parameter names)
    messages = [{ role = "user", content = "..." }]   # chat; or prompt = "..." for completions
    max_tokens = 1
    temperature = 0
    seed = 42
    logprobs = true
    top_logprobs = 20
    stream = true               # server-sent events, assembled chunk by chunk (endpoints
                                # only); stream_options.include_usage is sent as true

    [track]
    position = 0                # generated position whose top-k is read
    outcomes = ["Heads", "Tails"]   # tracked by the first token of each label
    tokens = ["Heads", "T"]     # or name the tracked tokens directly
    positions = "all"           # top-logprobs: every position
    answer_regex = 'answer: (\\w+)'   # parse an answer from each output (TARa@N): the
                                # first capture group if it has one, else the whole match

    [load]                      # load-sweep only
    levels = [0, 1, 4, 16, 64]
    filler_min_tokens = 8
    filler_max_tokens = 64

    [defaults]
    n = 1000
    concurrency = 16

``logprobs = false`` (or no ``logprobs``) in [request] makes a text-only probe: the
analysis then reports outputs and agreement rates only (``detaudit.analysis.agreement``).

A malformed file raises ProbeError naming the file and the key (or line).
"""

from __future__ import annotations

import copy
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

KINDS = ("outcome", "top-logprobs", "fixed-seed", "greedy-divergence", "load-sweep")
APIS = ("chat", "completions")
_TOP_KEYS = {"name", "kind", "description", "api", "request", "track", "load", "defaults"}
_TRACK_KEYS = {"position", "outcomes", "tokens", "positions", "answer_regex"}
_LOAD_KEYS = {"levels", "filler_min_tokens", "filler_max_tokens"}
_DEFAULT_KEYS = {"n", "concurrency"}
_ROLES = {"system", "user", "assistant", "developer", "tool"}


class ProbeError(ValueError):
    """A probe file is malformed; the message says where and how to fix it."""

    def __init__(self, source: str, message: str, key: str | None = None):
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + message)
        self.source = source
        self.key = key


@dataclass
class LoadSpec:
    levels: list[int] = field(default_factory=lambda: [0, 1, 4, 16, 64])
    filler_min_tokens: int = 8
    filler_max_tokens: int = 64


@dataclass
class Probe:
    name: str
    kind: str
    request: dict[str, Any]  # OpenAI request parameters, messages or prompt included
    api: str = "chat"
    description: str = ""
    track_position: int = 0
    track_all_positions: bool = False
    outcomes: list[str] = field(default_factory=list)
    track_tokens: list[str] | None = None  # explicit tokens; otherwise derived from outcomes
    load: LoadSpec | None = None
    answer_regex: str | None = None  # parses an answer out of each output (TARa@N)
    default_n: int = 100
    default_concurrency: int = 8
    source: str = ""

    @property
    def max_tokens(self) -> int:
        return int(self.request.get("max_tokens", 16))

    @property
    def top_logprobs(self) -> int:
        return int(self.request.get("top_logprobs", 0) or 0)

    @property
    def asks_logprobs(self) -> bool:
        """Whether the request asks for logprobs (legacy completions: ``logprobs = k``,
        0 included); without them the probe is a text-only audit."""
        value = self.request.get("logprobs")
        return value is not None and value is not False

    def without_logprobs(self) -> "Probe":
        """The text-only copy (``--no-logprobs``): no logprobs, no top_logprobs asked."""
        clone = copy.deepcopy(self)
        clone.request["logprobs"] = False
        clone.request.pop("top_logprobs", None)
        return clone

    def with_overrides(self, **params: Any) -> "Probe":
        """A copy with request parameters replaced (None values are ignored);
        ``stream=True`` / ``stream=False`` is the switch between a streamed and a whole
        answer."""
        clone = copy.deepcopy(self)
        for key, value in params.items():
            if value is None:
                continue
            if key == "prompt" and clone.api == "chat":
                clone.request["messages"] = [{"role": "user", "content": value}]
            elif key == "stream" and value is False:  # a whole answer: no stream options
                clone.request["stream"] = False
                clone.request.pop("stream_options", None)
            else:
                clone.request[key] = value
        validate_request(clone.request, clone.api, clone.source)
        return clone

    def to_dict(self) -> dict[str, Any]:
        """The manifest form: enough to rebuild the probe (see ``from_dict``)."""
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "api": self.api,
            "description": self.description, "request": self.request,
            "track": {"position": self.track_position, "outcomes": self.outcomes},
            "defaults": {"n": self.default_n, "concurrency": self.default_concurrency},
        }
        if self.track_tokens is not None:
            out["track"]["tokens"] = self.track_tokens
        if self.track_all_positions:
            out["track"] = {"positions": "all"}
        if self.answer_regex is not None:
            out["track"]["answer_regex"] = self.answer_regex
        if self.load is not None:
            out["load"] = {"levels": self.load.levels,
                           "filler_min_tokens": self.load.filler_min_tokens,
                           "filler_max_tokens": self.load.filler_max_tokens}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<manifest>") -> "Probe":
        return _build(data, source)


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def load_probe(name_or_path: str) -> Probe:
    """A built-in probe by name, or a user TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ProbeError(str(path), "no such probe file; give a built-in name "
                             f"({', '.join(builtin_names())}) or the path of a .toml file")
        return parse_probe(path.read_text(encoding="utf-8"), str(path))
    builtin = _builtin_dir() / f"{name_or_path}.toml"
    if not builtin.is_file():
        raise ProbeError(name_or_path, "unknown probe; built-ins are "
                         f"{', '.join(builtin_names())}, or give the path of a .toml file")
    return parse_probe(builtin.read_text(encoding="utf-8"), f"builtin:{name_or_path}")


def parse_probe(text: str, source: str) -> Probe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProbeError(source, f"not valid TOML ({exc})") from None
    return _build(data, source)


def _builtin_dir():
    return resources.files("probes")


def _build(data: dict[str, Any], source: str) -> Probe:
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ProbeError(source, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ProbeError(source, "missing or empty; every probe needs a name", "name")
    kind = data.get("kind", "outcome")
    if kind not in KINDS:
        raise ProbeError(source, f"{kind!r} is not a probe kind; use one of {list(KINDS)}", "kind")
    api = data.get("api", "chat")
    if api not in APIS:
        raise ProbeError(source, f"{api!r} is not supported; use one of {list(APIS)}", "api")
    request = data.get("request")
    if not isinstance(request, dict):
        raise ProbeError(source, "missing table [request] with the request to send", "request")
    validate_request(request, api, source)

    track = _table(data, "track", _TRACK_KEYS, source)
    position = track.get("position", 0)
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        raise ProbeError(source, "must be a non-negative integer", "track.position")
    if position >= int(request.get("max_tokens", 16)):
        raise ProbeError(source, f"position {position} is past max_tokens "
                         f"({request.get('max_tokens')})", "track.position")
    outcomes = track.get("outcomes", [])
    tokens = track.get("tokens")
    for key, value in (("track.outcomes", outcomes), ("track.tokens", tokens)):
        if value is not None and (not isinstance(value, list)
                                  or not all(isinstance(v, str) and v for v in value)):
            raise ProbeError(source, "must be a list of non-empty strings", key)
    positions = track.get("positions")
    if positions not in (None, "all"):
        raise ProbeError(source, 'only "all" is supported', "track.positions")
    answer_regex = track.get("answer_regex")
    if answer_regex is not None:
        _check_answer_regex(answer_regex, source)
    if kind == "outcome" and not outcomes and not tokens:
        raise ProbeError(source, "an outcome probe needs outcomes or tokens to track", "track")

    load = None
    if kind == "load-sweep" or "load" in data:
        spec = _table(data, "load", _LOAD_KEYS, source)
        load = LoadSpec(**{k: spec[k] for k in spec})
        if (not isinstance(load.levels, list) or not load.levels
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in load.levels)):
            raise ProbeError(source, "must be a non-empty list of non-negative integers", "load.levels")
        for key in ("filler_min_tokens", "filler_max_tokens"):
            value = getattr(load, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ProbeError(source, "must be a positive integer", f"load.{key}")
        if load.filler_min_tokens > load.filler_max_tokens:
            raise ProbeError(source, "filler_min_tokens is above filler_max_tokens", "load")

    defaults = _table(data, "defaults", _DEFAULT_KEYS, source)
    for key in ("n", "concurrency"):
        value = defaults.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ProbeError(source, "must be a positive integer", f"defaults.{key}")

    return Probe(
        name=name, kind=kind, request=request, api=api,
        description=str(data.get("description", "")),
        track_position=position, track_all_positions=positions == "all",
        outcomes=list(outcomes), track_tokens=list(tokens) if tokens is not None else None,
        load=load, answer_regex=answer_regex, default_n=defaults.get("n", 100),
        default_concurrency=defaults.get("concurrency", 8), source=source,
    )


def _check_answer_regex(pattern: Any, source: str) -> None:
    key = "track.answer_regex"
    if not isinstance(pattern, str) or not pattern:
        raise ProbeError(source, "must be a non-empty string (a Python regular expression)", key)
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ProbeError(source, f"{pattern!r} is not a valid regular expression ({exc}); "
                         "write it as a TOML literal string, e.g. 'answer: (\\w+)'", key) from None
    if compiled.fullmatch("") is not None:
        raise ProbeError(source, f"{pattern!r} matches the empty string, so every output "
                         "would parse; make it require some text", key)


def _table(data: dict[str, Any], key: str, allowed: set[str], source: str) -> dict[str, Any]:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise ProbeError(source, "must be a table", key)
    unknown = set(table) - allowed
    if unknown:
        raise ProbeError(source, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}", key)
    return table


def validate_request(request: dict[str, Any], api: str, source: str) -> None:
    """Check the request parameters that detaudit relies on."""
    if api == "chat":
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ProbeError(source, "a chat probe needs a non-empty list of messages",
                             "request.messages")
        for i, message in enumerate(messages):
            if (not isinstance(message, dict) or message.get("role") not in _ROLES
                    or not isinstance(message.get("content"), str)):
                raise ProbeError(source, "each message needs a role "
                                 f"({', '.join(sorted(_ROLES))}) and a string content",
                                 f"request.messages[{i}]")
        if "prompt" in request:
            raise ProbeError(source, "a chat probe sends messages, not a prompt "
                             '(set api = "completions" to send a prompt)', "request.prompt")
    else:
        if not isinstance(request.get("prompt"), str):
            raise ProbeError(source, "a completions probe needs a string prompt", "request.prompt")
    checks = {
        "max_tokens": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "temperature": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 2,
        "top_p": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
        "seed": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
        "top_logprobs": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 20,
        "logprobs": lambda v: isinstance(v, bool) or (api == "completions" and isinstance(v, int) and 0 <= v <= 20),
    }
    hints = {
        "max_tokens": "a positive integer", "temperature": "a number from 0 to 2",
        "top_p": "a number in (0, 1]", "seed": "an integer",
        "top_logprobs": "an integer from 0 to 20", "logprobs": "true or false",
    }
    for key, ok in checks.items():
        if key in request and not ok(request[key]):
            raise ProbeError(source, f"{request[key]!r} is not valid; use {hints[key]}", f"request.{key}")
    _check_stream(request, source)


def _check_stream(request: dict[str, Any], source: str) -> None:
    """``stream`` is the one switch between a streamed and a whole answer; its options
    are the wire's (``include_usage``), and mean nothing without it."""
    stream = request.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ProbeError(source, f"{stream!r} is not valid; use true or false", "request.stream")
    options = request.get("stream_options")
    if options is None:
        return
    if not stream:
        raise ProbeError(source, "stream_options only applies to a streamed request; "
                         "set stream = true or drop stream_options", "request.stream_options")
    if not isinstance(options, dict) or not all(isinstance(v, bool) for v in options.values()):
        raise ProbeError(source, "must be a table of true/false options, e.g. "
                         "{ include_usage = true }", "request.stream_options")
