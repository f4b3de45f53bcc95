"""Property-based tests (hypothesis): the probe parser raises only ProbeError, the
response parser only BackendError, and the analysis keeps its invariants and writes
JSON without NaN, whatever they are given."""

from __future__ import annotations

import json
import math
import random

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detaudit.analysis import analyze, build_frames
from detaudit.backends.base import BackendError
from detaudit.backends.openai_backend import parse_body
from detaudit.probes import ProbeError, parse_probe
from detaudit.records import Completion, Position, Sample, TokenLogprob

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- probe files ---------------------------------------------------------------------------

PROBE_KEYS = ["name", "kind", "api", "description", "request", "track", "defaults", "load",
              "messages", "prompt", "max_tokens", "temperature", "seed", "logprobs",
              "top_logprobs", "outcomes", "tokens", "position", "positions", "n", "concurrency",
              "levels", "role", "content", "stream"]
scalars = st.one_of(st.text(max_size=8), st.integers(-3, 30), st.booleans(),
                    st.floats(allow_nan=False, allow_infinity=False, width=32),
                    st.sampled_from(["outcome", "chat", "completions", "all", "user", "Heads"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(PROBE_KEYS), inner, max_size=4)),
    max_leaves=12)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is JSON's string syntax here
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(data: dict) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@SETTINGS
@given(st.dictionaries(st.sampled_from(PROBE_KEYS), values, max_size=7))
def test_random_probe_documents_raise_only_probe_error(data):
    text = toml_document(data)
    try:
        probe = parse_probe(text, "random.toml")
    except ProbeError as exc:
        assert "random.toml" in str(exc)
    else:
        assert probe.name and probe.request  # what parsed is a usable probe


@SETTINGS
@given(st.text(max_size=300))
def test_random_text_raises_only_probe_error(text):
    try:
        parse_probe(text, "random.toml")
    except ProbeError:
        pass


COIN = '''name = "coin"
kind = "outcome"
[request]
messages = [{ role = "user", content = "Flip a coin." }]
max_tokens = 1
temperature = 0
logprobs = true
top_logprobs = 20
[track]
outcomes = ["Heads", "Tails"]
'''


@SETTINGS
@given(st.integers(0, len(COIN) - 1), st.integers(0, 12), st.text(max_size=6))
def test_edited_probe_files_raise_only_probe_error(at, cut, insert):
    text = COIN[:at] + insert + COIN[at + cut:]
    try:
        parse_probe(text, "edited.toml")
    except ProbeError:
        pass


# --- response bodies -----------------------------------------------------------------------

GOOD_CHAT = {
    "id": "x", "object": "chat.completion", "model": "m", "system_fingerprint": "fp",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Heads"},
                 "logprobs": {"content": [{"token": "Heads", "logprob": -0.31, "bytes": [72],
                                           "top_logprobs": [{"token": "Heads", "logprob": -0.31},
                                                            {"token": "T", "logprob": -1.31}]}]}}],
}
GOOD_COMPLETIONS = {
    "model": "m", "choices": [{"text": "Heads", "finish_reason": "stop", "logprobs": {
        "tokens": ["Heads"], "token_logprobs": [-0.31], "top_logprobs": [{"Heads": -0.31, "T": -1.3}]}}],
}
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)


def paths(node, prefix=()):
    """Every place in a JSON tree where a value can be swapped."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths(value, prefix + (i,))


def replaced(node, path, value):
    if not path:
        return value
    copy = dict(node) if isinstance(node, dict) else list(node)
    copy[path[0]] = replaced(node[path[0]], path[1:], value)
    return copy


def check_parse(content: bytes, api: str) -> None:
    try:
        completion = parse_body(content, api, True, "http://127.0.0.1/v1", top_k=20)
    except BackendError as exc:
        # a cut that still parses as a completion may have lost its logprobs: no_logprobs
        assert exc.kind in ("bad_response", "no_logprobs")
        if exc.retryable:  # a transport fault: no completion at all, its body kept
            assert exc.status == 200 and exc.raw is not None
        return
    assert isinstance(completion.text, str)
    for p in completion.positions:
        assert isinstance(p.logprob, float) and isinstance(p.logprob_text, str)
        assert isinstance(p.token, str) and all(isinstance(t.token, str) for t in p.top)
        float(p.logprob_text)  # the text is a number
        assert all(t.logprob != -9999.0 for t in p.top)
    json.dumps(completion.extra)


@SETTINGS
@given(st.sampled_from(["chat", "completions"]), st.data(), json_values)
def test_mutated_bodies_raise_only_backend_error(api, data, value):
    good = GOOD_CHAT if api == "chat" else GOOD_COMPLETIONS
    path = data.draw(st.sampled_from(list(paths(good))))
    check_parse(json.dumps(replaced(good, path, value)).encode(), api)


@SETTINGS
@given(st.sampled_from(["chat", "completions"]), st.binary(max_size=200))
def test_random_bytes_raise_only_backend_error(api, content):
    check_parse(content, api)


@SETTINGS
@given(st.sampled_from(["chat", "completions"]), st.integers(0, 400), st.integers(0, 20))
def test_truncated_bodies_raise_only_backend_error(api, at, cut):
    text = json.dumps(GOOD_CHAT if api == "chat" else GOOD_COMPLETIONS).encode()
    check_parse(text[:at] + text[at + cut:], api)


# --- analysis ------------------------------------------------------------------------------

logprobs = st.one_of(st.floats(-30, 0, allow_nan=False), st.sampled_from([0.0, -0.0, -1e-300]))


def sample(index: int, heads: float | None, tails: float | None, output: str, fp: str | None):
    top = [TokenLogprob("Heads", heads, repr(heads))] if heads is not None else []
    top += [TokenLogprob("T", tails, repr(tails))] if tails is not None else []
    chosen = top[0] if top else TokenLogprob("x", -5.0, "-5.0")
    completion = Completion(text=output, positions=[Position(chosen.token, chosen.logprob,
                                                             chosen.logprob_text, top=top)],
                            system_fingerprint=fp)
    return Sample(index, "ok", completion, 1, 0.0, 0.01)


runs = st.lists(st.tuples(st.one_of(st.none(), logprobs), st.one_of(st.none(), logprobs),
                          st.sampled_from(["Heads", "Tails", " Heads", ""]),
                          st.sampled_from([None, "fp_a", "fp_b"])), min_size=1, max_size=40)


@SETTINGS
@given(runs, st.integers(0, 3), st.sampled_from([0.0, 1e-6, 0.01, 1.0, 50.0]))
def test_analysis_invariants_on_random_logprob_sets(rows, errors, threshold):
    samples = [sample(i, *row) for i, row in enumerate(rows)]
    samples += [Sample(len(rows) + i, "error", None, 5, 0.0, 0.1, error_kind="timeout",
                       error_message="no answer") for i in range(errors)]
    random.Random(len(rows)).shuffle(samples)
    tracked = [{"label": "Heads", "token": "Heads", "position": 0},
               {"label": "Tails", "token": "T", "position": 0}]
    result = analyze(build_frames(samples, tracked), threshold_pct=threshold)
    assert (result.n, result.ok, result.errors) == (len(rows) + errors, len(rows), errors)
    assert result.errors_by_kind == ({"timeout": errors} if errors else {})
    for slot, token in enumerate(result.tokens):
        present = [row[slot] for row in rows if row[slot] is not None]
        assert token.missing == len(rows) - len(present)
        bits = {np.float64(v).view(np.int64).item() for v in present}
        assert token.distinct_logprobs == len(bits)
        clusters = token.clusters
        assert len(clusters) <= token.distinct_logprobs
        assert int(clusters["count"].sum()) == len(present)
        if present:
            assert token.logprob.min == min(present) and token.logprob.max == max(present)
    assert sum(count for _, count in result.outputs_top) == len(rows)
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert json.loads(text)["n"] == len(rows) + errors
    assert not math.isnan(result.tokens[0].prob.mean) or not any(r[0] is not None for r in rows)
