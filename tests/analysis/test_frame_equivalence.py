"""build_frames (column passes, each distinct text parsed once) gives exactly the frames
of the per-sample loop it replaced. That loop is kept here, as the reference, and both
are run on random sample sets: unsorted indices, errors, missing and duplicated tokens,
positions past the end, NaN/inf values, texts that are no number, hex texts."""

from __future__ import annotations

import functools
import itertools
import math
import operator
import struct
from typing import Any

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detaudit.analysis import build_frames
from detaudit.analysis.frame import (SAMPLE_COLUMNS, TRACKED_COLUMNS, is_bad_logprob,
                                     parse_logprob_text)
from detaudit.records import Completion, Position, Sample, TokenLogprob

# --- the reference: build_frames's loop as it was (with bad values), verbatim ------------


def _samples_frame(samples: list[Sample]) -> pd.DataFrame:
    completions = [s.completion for s in samples]
    positions = [c.positions if c else () for c in completions]
    # few distinct texts, many samples: parse each once (a C-level cache, as this sees
    # every generated position of the run)
    value = functools.lru_cache(maxsize=None)(_parse_or)
    texts, top = operator.attrgetter("logprob_text", "logprob"), operator.attrgetter("top")
    logprob = operator.attrgetter("logprob")

    def bad(ps: list[Position]) -> int:
        # A sum of finite logprobs is finite: count one by one only when it is not
        # (bad values are rare, and this sees every top-k entry of the run).
        entries = list(itertools.chain(ps, itertools.chain.from_iterable(map(top, ps))))
        if math.isfinite(sum(map(logprob, entries))):
            return 0
        return sum(map(is_bad_logprob, map(logprob, entries)))

    columns = {
        "index": np.fromiter((s.index for s in samples), dtype=np.int64, count=len(samples)),
        "status": [s.status for s in samples],
        "error_kind": [s.error_kind for s in samples],
        "output": [c.text if c else None for c in completions],
        "finish_reason": [c.finish_reason if c else None for c in completions],
        "system_fingerprint": [c.system_fingerprint if c else None for c in completions],
        "model": [c.model if c else None for c in completions],
        "group": [s.group for s in samples],
        "attempts": [s.attempts for s in samples],
        "latency_s": np.array([s.latency_s for s in samples], dtype=np.float64),
        "tokens": [tuple([p.token for p in ps]) for ps in positions],
        "logprobs": [tuple(itertools.starmap(value, map(texts, ps))) for ps in positions],
        "bad_logprobs": np.fromiter((bad(ps) for ps in positions), dtype=np.int64,
                                    count=len(positions)),
    }
    return pd.DataFrame(columns, columns=SAMPLE_COLUMNS)


def _tracked_frame(samples: list[Sample], slots: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (successful sample, tracked slot), sample-major; NaN where the token
    is absent. Per-slot and per-sample columns are filled by numpy, not row by row."""
    ok = [s for s in samples if s.status == "ok" and s.completion is not None]
    texts: list[str | None] = []
    values: list[float] = []
    parsed: dict[str, float] = {}  # few distinct texts, many samples: parse each once
    for s in ok:
        positions = s.completion.positions
        for t in slots:
            found = _find(positions, t["position"], t["token"])
            if found is None:
                texts.append(None)
                values.append(math.nan)
                continue
            text = found.logprob_text
            value = parsed.get(text)
            if value is None:
                value = parsed[text] = _parse_or(text, found.logprob)
            texts.append(text)
            values.append(value)
    k = len(slots)
    per_sample = lambda values: np.repeat(np.array(values, dtype=object), k)  # noqa: E731
    per_slot = lambda key: np.tile(np.array([t[key] for t in slots], dtype=object), len(ok))  # noqa: E731
    return pd.DataFrame({
        "index": np.repeat(np.array([s.index for s in ok], dtype=np.int64), k),
        "slot": np.tile(np.arange(k, dtype=np.int64), len(ok)),
        "label": per_slot("label"),
        "token": per_slot("token"),
        "position": np.tile(np.array([t["position"] for t in slots], dtype=np.int64), len(ok)),
        "logprob": np.array(values, dtype=np.float64),
        "logprob_text": np.array(texts, dtype=object),
        "system_fingerprint": per_sample([s.completion.system_fingerprint for s in ok]),
        "output": per_sample([s.completion.text for s in ok]),
        "group": per_sample([s.group for s in ok]),
    }, columns=TRACKED_COLUMNS)


def _find(positions: list[Position], position: int,
          token: str | None) -> TokenLogprob | Position | None:
    """``token`` at ``position``: its top-k entry, else the chosen token if it is that one."""
    if token is None or position >= len(positions):
        return None
    p = positions[position]
    for candidate in p.top:
        if candidate.token == token:
            return candidate
    return p if p.token == token else None


def _parse_or(text: str, fallback: float) -> float:
    """The value of the text; the record's float if a backend stored text that is no number."""
    try:
        return parse_logprob_text(text)
    except (TypeError, ValueError):
        return float(fallback)


def reference_frames(samples: list[Sample], slots: list[dict[str, Any]]
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    samples = sorted(samples, key=lambda s: s.index)
    return _samples_frame(samples), _tracked_frame(samples, slots)


# --- random sample sets ------------------------------------------------------------------

TOKENS = ["Heads", "T", "Tails", " H", "x", ""]
FLOATS = [-0.6931471805599453, -0.69314718055994529, -1e-300, -745.0, 0.0, -0.0, -12.5,
          math.nan, math.inf, -math.inf]
NO_NUMBER = ["abc", "", "0xzz", "-"]


@st.composite
def logprob(draw) -> tuple[float, str]:
    value = draw(st.sampled_from(FLOATS))
    form = draw(st.sampled_from(["repr", "hex", "json", "other", "no number"]))
    if form == "no number":  # the record's float is the fallback (a value, not -0.0)
        return draw(st.sampled_from([-1.5, math.nan, -0.25])), draw(st.sampled_from(NO_NUMBER))
    if form == "hex":
        return value, value.hex()
    if form == "json":
        json_text = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
        return value, json_text.get(repr(value), repr(value))
    if form == "other" and math.isfinite(value):
        return value, f"{value:.3e}"
    return value, repr(value)


@st.composite
def position(draw) -> Position:
    top = []
    for _ in range(draw(st.integers(0, 5))):
        value, text = draw(logprob())
        top.append(TokenLogprob(draw(st.sampled_from(TOKENS)), value, text))
    value, text = draw(logprob())
    return Position(draw(st.sampled_from(TOKENS)), value, text, top)


@st.composite
def sample(draw, index: int) -> Sample:
    status = draw(st.sampled_from(["ok", "ok", "ok", "error"]))
    completion = None
    if status == "ok" or draw(st.booleans()):
        completion = Completion(
            draw(st.sampled_from(["Heads", "Tails", "", "H T"])),
            draw(st.sampled_from(["stop", "length", None])),
            draw(st.lists(position(), max_size=4)),
            draw(st.sampled_from(["m", None])),
            draw(st.sampled_from(["fp_a", "fp_b", None])))
    if status == "ok" and draw(st.integers(0, 9)) == 0:
        completion = None  # a row marked ok without its completion is not analysed
    return Sample(index, status, completion, draw(st.integers(1, 3)),
                  0.0, draw(st.sampled_from([0.25, 1.0])),
                  error_kind=None if status == "ok" else "timeout",
                  group=draw(st.sampled_from([None, "4", "16"])))


@st.composite
def sample_sets(draw) -> list[Sample]:
    indices = draw(st.permutations(list(range(draw(st.integers(0, 25))))))
    return [draw(sample(i)) for i in indices]


TRACKED = st.lists(st.fixed_dictionaries({
    "label": st.sampled_from(["Heads", "Tails"]),
    "token": st.sampled_from(TOKENS + [None]),
    "position": st.integers(0, 4)}), max_size=4)


def bits(values) -> list[str]:
    return [struct.pack("<d", v).hex() if isinstance(v, float) else repr(v) for v in values]


def assert_same(frame: pd.DataFrame, reference: pd.DataFrame,
                float_tuples: tuple[str, ...] = ()) -> None:
    assert list(frame.columns) == list(reference.columns)
    assert frame.dtypes.to_dict() == reference.dtypes.to_dict()
    for column in frame.columns:
        got, want = frame[column].tolist(), reference[column].tolist()
        if column in float_tuples:
            assert all(type(v) is float for t in got for v in t), column  # noqa: E721
            got, want = [bits(t) for t in got], [bits(t) for t in want]
        elif frame[column].dtype == np.float64:
            got, want = bits(got), bits(want)  # NaN where NaN, -0.0 apart from 0.0
        assert got == want, column
        assert [type(v) for v in got] == [type(v) for v in want], column


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples=sample_sets(), tracked=TRACKED, all_positions=st.booleans())
def test_frames_equal_the_per_sample_loop(samples, tracked, all_positions):
    frames = build_frames(samples, tracked, all_positions=all_positions)
    samples_ref, tracked_ref = reference_frames(samples, frames.tracked_tokens)
    assert_same(frames.samples, samples_ref, float_tuples=("logprobs",))
    assert_same(frames.tracked, tracked_ref)


def test_a_large_uniform_run_matches_too():
    # the shape of a real run: many samples, one position, tracked tokens near the top
    samples = []
    for i in range(3000):
        h = -0.6931471805599453 - (i % 7) * 1e-16
        top = [TokenLogprob("Heads", h, repr(h)), TokenLogprob("T", -0.7, "-0.7")] + [
            TokenLogprob(f"t{k}", -10.0 - k, repr(-10.0 - k)) for k in range(18)]
        completion = Completion("Heads", "stop", [Position("Heads", h, repr(h), top)], "m",
                                "fp_a" if i % 3 else "fp_b")
        samples.append(Sample(i, "ok", completion, 1, 0.0, 0.1) if i % 500 else
                       Sample(i, "error", None, 3, 0.0, 1.0, error_kind="rate_limit"))
    tracked = [{"label": "Heads", "token": "Heads", "position": 0},
               {"label": "Tails", "token": "T", "position": 0}]
    frames = build_frames(samples[::-1], tracked)
    samples_ref, tracked_ref = reference_frames(samples, frames.tracked_tokens)
    assert_same(frames.samples, samples_ref, float_tuples=("logprobs",))
    assert_same(frames.tracked, tracked_ref)
    assert frames.tracked["logprob"].notna().all() and frames.samples["bad_logprobs"].eq(0).all()
