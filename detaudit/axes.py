"""The axes of ``detaudit matrix``: what each one varies, its two levels (the baseline
first), and how the samples of one axis run are laid out and sent.

An axis run is one stored run: its samples are the target request at each level,
``per_level`` of them, stored in group ``"<axis>=<level>"``. Every axis but ``cache``
first sends the baseline request once (group ``"warmup"``), so that no level is
measured on a cold prefix cache. The ``cache`` axis sends each nonce variant twice in
a row: its first request (``cache=cold``) and its repeat (``cache=warm``).

    axis            baseline   level (default)   what changes
    load            0          4                 requests in flight beside the target
    cache           cold       warm              first request of a variant, or its repeat
    max-tokens      1          16                max_tokens (the first token is compared)
    top-logprobs    5          20                top_logprobs
    stream          false      true              stream (server-sent events)
    n               1          4                 n choices in one request, or n requests
    batch-size      1          4                 local: the target alone, or in a batch of k
    batch-position  first      last              local: the target's place in a batch of k
    prefill-chunk   off        half the prompt   local: prompt tokens per forward pass

Against an endpoint a load level is fillers in flight (``detaudit.load.HttpLoadSweep``);
in process it is a batch of the target and k fillers, the target at a random place.
Torch-free: the local engine's batch plan is built by the backend that runs it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from detaudit.defaults import MAX_LEVEL
from detaudit.probes import LoadSpec, Probe
from detaudit.records import Completion

REMOTE, LOCAL = "openai", "local"
WARMUP_GROUP = "warmup"
DEFAULT_NONCE = "[{run}-{i}] "
MAX_CHOICES = 16  # detaudit serve's n limit (OpenAI's is 128)


@dataclass(frozen=True)
class AxisSpec:
    name: str
    baseline: str
    default: str  # the other level, as text ("half": half the prompt, counted at plan time)
    backends: tuple[str, ...]
    what: str
    settable: bool = True  # whether --level AXIS=VALUE may change the other level
    needs_logprobs: bool = False


AXES: dict[str, AxisSpec] = {spec.name: spec for spec in (
    AxisSpec("load", "0", "4", (REMOTE, LOCAL), "requests in flight beside the target"),
    AxisSpec("cache", "cold", "warm", (REMOTE, LOCAL), "the first request of a nonce variant, "
             "or its repeat (in process: with the engine's prefix cache on)", settable=False),
    AxisSpec("max-tokens", "1", "16", (REMOTE, LOCAL), "max_tokens; the first token is compared",
             needs_logprobs=True),
    AxisSpec("top-logprobs", "5", "20", (REMOTE, LOCAL), "top_logprobs", needs_logprobs=True),
    AxisSpec("stream", "false", "true", (REMOTE,), "stream: the answer as server-sent events",
             settable=False),
    AxisSpec("n", "1", "4", (REMOTE, LOCAL), "n choices in one request, or n requests"),
    AxisSpec("batch-size", "1", "4", (LOCAL,), "the target alone, or first in a batch of k"),
    AxisSpec("batch-position", "first", "4", (LOCAL,), "the target first, or last, in a batch "
             "of k (the level sets k)"),
    AxisSpec("prefill-chunk", "off", "half", (LOCAL,), "prompt tokens per forward pass: the "
             "whole prompt, or chunks of k"),
)}


class AxisProblem(ValueError):
    """A bad --axes, --level or --nonce; the message says what and how to fix it."""


@dataclass(frozen=True)
class Level:
    """One level of an axis: its label and what it changes."""

    label: str
    request: dict[str, Any] = field(default_factory=dict)  # request fields it sets
    fillers: int = 0  # load: requests in flight beside the target
    choices: int = 1  # n: choices per request
    batch: dict[str, Any] = field(default_factory=lambda: {"size": 1, "position": "first"})
    cache: str | None = None  # cold | warm

    def group(self, axis: str) -> str:
        return f"{axis}={self.label}"


@dataclass(frozen=True)
class Axis:
    """An axis with its two levels resolved, baseline first."""

    name: str
    levels: tuple[Level, Level]

    @property
    def baseline(self) -> Level:
        return self.levels[0]

    @property
    def labels(self) -> list[str]:
        return [level.label for level in self.levels]


# --- what the user asked for ---------------------------------------------------------------

def available(backend: str, probe: Probe) -> list[str]:
    """The axes that apply to this backend and probe, in table order."""
    return [name for name, spec in AXES.items() if not unavailable(spec, backend, probe)]


def unavailable(spec: AxisSpec, backend: str, probe: Probe) -> str | None:
    """Why an axis does not apply, or None."""
    if backend not in spec.backends:
        if backend == LOCAL:
            return (f"the {spec.name} axis needs an endpoint (it varies the HTTP request); "
                    "give --model NAME --base-url URL (e.g. detaudit serve's)")
        return (f"the {spec.name} axis is the local engine's (it varies the engine's batch); "
                "run the matrix in process (without --base-url) to measure it")
    if spec.needs_logprobs and not probe.asks_logprobs:
        return f"the {spec.name} axis compares logprobs, and the probe asks for none"
    return None


def choose(backend: str, probe: Probe, names: str | list[str] | None) -> list[str]:
    """The axes to measure: ``names`` (comma-separated or a list) checked, or every one
    that applies."""
    if names is None:
        return available(backend, probe)
    if isinstance(names, str):
        names = [part.strip() for part in names.split(",") if part.strip()]
    if not names:
        raise AxisProblem(f"--axes: name at least one axis ({', '.join(AXES)})")
    for name in names:
        if name not in AXES:
            raise AxisProblem(f"--axes: unknown axis {name!r}; the axes are {', '.join(AXES)}")
        why = unavailable(AXES[name], backend, probe)
        if why:
            raise AxisProblem(f"--axes {name}: {why}")
    if len(set(names)) < len(names):
        raise AxisProblem("--axes: an axis is named twice; name each once")
    return list(names)


def parse_levels(items: list[str] | dict[str, Any] | None) -> dict[str, str]:
    """--level AXIS=VALUE (repeatable) -> {axis: value}: the non-baseline level."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, dict) else (_split_level(item) for item in items)
    chosen: dict[str, str] = {}
    for name, value in pairs:
        spec = AXES.get(name)
        if spec is None:
            raise AxisProblem(f"--level {name}={value}: unknown axis {name!r}; the axes are "
                              f"{', '.join(AXES)}")
        if not spec.settable:
            raise AxisProblem(f"--level {name}={value}: the {name} axis has fixed levels "
                              f"({spec.baseline} vs {spec.default})")
        chosen[name] = str(value)
    return chosen


def _split_level(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise AxisProblem(f"--level {item!r}: write AXIS=VALUE, e.g. --level load=8")
    return name.strip(), value.strip()


def check_nonce(template: str) -> str:
    """The cache axis' nonce: text with ``{i}`` (the variant) and optionally ``{run}``
    (a random id of this matrix, so a second matrix finds no variant cached)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise AxisProblem(f"--nonce {template!r}: {exc}; write e.g. '[{{run}}-{{i}}] '") from None
    if "i" not in fields or fields - {"i", "run"}:
        raise AxisProblem(f"--nonce {template!r}: use {{i}} (the variant number, required) and "
                          "{run} (this matrix's random id) only, e.g. '[{run}-{i}] '")
    return template


def new_nonce_run() -> str:
    return secrets.token_hex(4)


def nonce_text(nonce: tuple[str, str], variant: int) -> str:
    """The nonce of a variant: (template, this matrix's run id) filled in."""
    return nonce[0].format(i=variant, run=nonce[1])


def with_nonce(probe: Probe, template: str, run: str, variant: int) -> Probe:
    """The probe with the nonce before its first message (or its prompt): variants then
    differ from their first block on, so no prefix of one is cached for another."""
    text = nonce_text((template, run), variant)
    request = copy.deepcopy(probe.request)
    if "messages" in request:
        request["messages"][0]["content"] = text + request["messages"][0]["content"]
    else:
        request["prompt"] = text + request["prompt"]
    return dataclasses.replace(probe, request=request)


# --- levels ------------------------------------------------------------------------------

def resolve(name: str, value: str | None, probe: Probe, prompt_tokens: int | None = None,
            max_level: int = MAX_LEVEL) -> Axis:
    """The axis with its levels; ``value``: the non-baseline level (default: the axis')."""
    spec = AXES[name]
    text = spec.default if value is None else value
    where = f"--level {name}={text}"
    if name == "load":
        k = _whole(text, where, 1, max_level, "requests in flight beside the target")
        return Axis(name, (Level("0"), Level(str(k), fillers=k, batch={"size": k + 1, "position": "random"})))
    if name == "cache":
        return Axis(name, (Level("cold", cache="cold"), Level("warm", cache="warm")))
    if name == "max-tokens":
        k = _whole(text, where, 2, None, "max_tokens")
        return Axis(name, (Level("1", {"max_tokens": 1}), Level(str(k), {"max_tokens": k})))
    if name == "top-logprobs":
        k = _whole(text, where, 1, 20, "top logprobs")
        if k == 5:
            raise AxisProblem(f"{where}: that is the baseline; pick another count (1-20)")
        return Axis(name, (Level("5", {"top_logprobs": 5}), Level(str(k), {"top_logprobs": k})))
    if name == "stream":
        return Axis(name, (Level("false", {"stream": False}), Level("true", {"stream": True})))
    if name == "n":
        k = _whole(text, where, 2, MAX_CHOICES, "choices per request")
        return Axis(name, (Level("1"), Level(str(k), {"n": k}, choices=k)))
    if name == "batch-size":
        k = _whole(text, where, 2, max_level + 1, "batch size")
        return Axis(name, (Level("1"), Level(str(k), batch={"size": k, "position": "first"})))
    if name == "batch-position":
        k = _whole(text, where, 2, max_level + 1, "batch size")
        return Axis(name, (Level("first", batch={"size": k, "position": "first"}),
                           Level("last", batch={"size": k, "position": "last"})))
    if name == "prefill-chunk":
        if text == "half":
            if not prompt_tokens or prompt_tokens < 2:
                raise AxisProblem("the prefill-chunk axis needs a prompt of two tokens or more")
            k = math.ceil(prompt_tokens / 2)
        else:
            k = _whole(text, where, 1, None, "prompt tokens per forward pass")
        return Axis(name, (Level("off"), Level(str(k), batch={"size": 1, "position": "first",
                                                              "prefill_chunk": k})))
    raise AssertionError(name)


def _whole(text: str, where: str, low: int, high: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"{low} to {high}" if high is not None else f"{low} or more"
        raise AxisProblem(f"{where}: give a whole number of {what}, {bound}")
    return value


def sampled(probe: Probe) -> bool:
    """Whether the request samples (temperature > 0; OpenAI's default is 1)."""
    return float(probe.request.get("temperature", 1.0)) > 0


# --- one axis run ----------------------------------------------------------------------------

WARMUP = Level(WARMUP_GROUP)  # the baseline request, alone

@dataclass(frozen=True)
class Layout:
    """Sample indices of an axis run: [warm-up] then ``per_level`` per level, in level
    order; the cache axis instead alternates cold and warm, variant by variant."""

    levels: int
    per_level: int
    warmup: bool = True
    interleaved: bool = False

    @classmethod
    def of(cls, axis: Axis, per_level: int) -> "Layout":
        cache = axis.name == "cache"
        return cls(len(axis.levels), per_level, warmup=not cache, interleaved=cache)

    @property
    def total(self) -> int:
        return int(self.warmup) + self.levels * self.per_level

    def locate(self, index: int) -> tuple[int | None, int]:
        """(level slot, item within the level) of sample ``index``; slot None: the warm-up."""
        if self.interleaved:
            return index % self.levels, index // self.levels
        if self.warmup:
            if index == 0:
                return None, 0
            index -= 1
        return min(index // self.per_level, self.levels - 1), index % self.per_level

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def level_probe(axis: Axis, level: Level, probe: Probe, item: int, nonce: tuple[str, str]) -> Probe:
    """What is sent for ``item`` at ``level``: the probe with the level's request fields
    (and, on the cache axis, the variant's nonce)."""
    if level.request:
        probe = probe.with_overrides(**level.request)
    if axis.name == "cache":
        probe = with_nonce(probe, nonce[0], nonce[1], item)
    return probe


def load_probe_for(probe: Probe, level: Level) -> Probe:
    """The probe a load sweep needs: its levels 0 and k, the fillers' lengths."""
    spec = probe.load or LoadSpec()
    return dataclasses.replace(probe, load=LoadSpec([0, level.fillers], spec.filler_min_tokens,
                                                    spec.filler_max_tokens))


def requests_per_level(level: Level, per_level: int, probe: Probe) -> int:
    """Target requests a level sends: per_level, or fewer when each brings n choices
    (a sampled request keeps its first choice only: the others have other seeds)."""
    if level.choices > 1 and not sampled(probe):
        return math.ceil(per_level / level.choices)
    return per_level


class AxisBackend:
    """The Backend interface over the real one: sample ``index`` goes out at its level
    (``Layout``) and comes back marked with its group, level and item.

    ``sweep``: the load axis against an endpoint (``load.HttpLoadSweep`` over the same
    inner backend), which holds the fillers. In process (``local``) every sample runs in
    the batch its level plans (``backends.local.BatchPlan``)."""

    def __init__(self, inner: Any, axis: Axis, layout: Layout, local: bool,
                 nonce: tuple[str, str] = (DEFAULT_NONCE, ""), sweep: Any = None):
        self.inner, self.axis, self.layout, self.local = inner, axis, layout, local
        self.nonce, self.sweep = nonce, sweep
        self.name = inner.name
        self._choices: tuple[int, list[Completion]] | None = None  # the last n > 1 answer

    def __getattr__(self, name: str) -> Any:
        if name in ("filler_stats", "filler_failures") and self.__dict__.get("sweep") is not None:
            return getattr(self.sweep, name)  # session.run_session counts the sweep's fillers
        raise AttributeError(name)

    def first_token(self, text: str) -> str | None:
        return self.inner.first_token(text)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    async def aclose(self) -> None:
        if self.sweep is not None:
            await self.sweep.aclose()  # closes the inner backend too
        else:
            await self.inner.aclose()

    async def complete(self, probe: Probe, index: int) -> Completion:
        slot, item = self.layout.locate(index)
        if slot is None:  # the warm-up: the probe as it is, alone
            completion = await self._send(probe, WARMUP, index, item, None)
            group, label = WARMUP_GROUP, None
        else:
            level = self.axis.levels[slot]
            target = level_probe(self.axis, level, probe, item, self.nonce)
            completion = await self._send(target, level, index, item, slot)
            group, label = level.group(self.axis.name), level.label
        completion.extra = {**completion.extra, "group": group, "axis": self.axis.name,
                            "level": label, "item": item}
        if self.axis.name == "cache":
            completion.extra["nonce"] = nonce_text(self.nonce, item)
        return completion

    async def _send(self, probe: Probe, level: Level, index: int, item: int,
                    slot: int | None) -> Completion:
        if level.choices > 1:
            return await self._choice(probe, level, item)
        if self.local:
            from detaudit.backends.local import BatchPlan

            return await self.inner.complete_in(probe, item, BatchPlan(**level.batch))
        if self.sweep is not None and slot is not None:
            return await self.sweep.complete(probe, slot * self.layout.per_level + item)
        return await self.inner.complete(probe, index)

    async def _choice(self, probe: Probe, level: Level, item: int) -> Completion:
        """Item ``item`` of the n axis' level: a choice of one request with n choices."""
        from detaudit.backends.base import BackendError

        each = 1 if sampled(probe) else level.choices
        request, choice = divmod(item, each)
        if self._choices is None or self._choices[0] != request or choice == 0:
            if self.local:
                from detaudit.backends.local import BatchPlan

                answers = await self.inner.complete_choices(probe, request, BatchPlan(**level.batch))
            else:
                answers = await self.inner.complete_choices(probe, request)
            self._choices = (request, answers)
        answers = self._choices[1]
        if choice >= len(answers):
            raise BackendError("bad_response", f"asked for n = {level.choices} choices, got "
                               f"{len(answers)}: the server ignores n")
        completion = copy.copy(answers[choice])
        completion.extra = {**completion.extra, "request": request, "choice": choice,
                            "choices": len(answers)}
        return completion
