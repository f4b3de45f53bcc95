"""The analysis works per distinct positions entry (``RunStore.sample_columns``,
``build_frames``, ``top_table``) and on arrays (``analyze``); it must give exactly what the
per-sample path gave. That path is kept as the oracle in tests/analysis/reference.py, and
both are run on random sample sets (unsorted indices, errors with and without completions,
missing and duplicated tokens, null tokens resolved from the data, positions = "all",
positions past the end, NaN/inf values, texts that are no number, hex texts, groups),
stored and read back, and on real runs made against the fake OpenAI server on 127.0.0.1
(outcome and completion probes, positions = "all", a load sweep's groups, error rows,
NaN/inf logprobs, text-only runs)."""

from __future__ import annotations

import json
import math
import sqlite3
import struct
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import detaudit
from detaudit import session, store_columns
from detaudit.analysis import analyze, build_frames
from detaudit.analysis.insight import build_insight, top_table
from detaudit.records import Completion, Position, Sample, SampleColumns, TokenLogprob
from detaudit.store import RunStore, StoreError
from tests.analysis.reference import (reference_analyze, reference_frames, reference_insight,
                                      reference_summary, reference_top_table)
from tests.servers.fake_openai import Fault, State, outcome_states
from tests import store_damage

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
def sample(draw, index: int, shared: list[list[Position]]) -> Sample:
    status = draw(st.sampled_from(["ok", "ok", "ok", "error"]))
    completion = None
    if status == "ok" or draw(st.booleans()):
        # as in real runs, many samples carry the same positions (equal, not the same objects)
        positions = draw(st.sampled_from(shared)) if shared and draw(st.booleans()) else \
            draw(st.lists(position(), max_size=4))
        completion = Completion(
            draw(st.sampled_from(["Heads", "Tails", "", "H T"])),
            draw(st.sampled_from(["stop", "length", None])),
            [Position(p.token, p.logprob, p.logprob_text, list(p.top)) for p in positions],
            draw(st.sampled_from(["m", None])),
            draw(st.sampled_from(["fp_a", "fp_b", None])))
    if status == "ok" and draw(st.integers(0, 9)) == 0:
        completion = None  # a row marked ok without its completion is not analysed
    return Sample(index, status, completion, draw(st.integers(1, 3)),
                  0.0, draw(st.sampled_from([0.25, 1.0])),
                  error_kind=None if status == "ok" else draw(st.sampled_from(["timeout", None])),
                  group=draw(st.sampled_from([None, "4", "16"])))


@st.composite
def sample_sets(draw) -> list[Sample]:
    shared = draw(st.lists(st.lists(position(), max_size=3), max_size=3))
    indices = draw(st.permutations(list(range(draw(st.integers(0, 25))))))
    return [draw(sample(i, shared)) for i in indices]


TRACKED = st.lists(st.fixed_dictionaries({
    "label": st.sampled_from(["Heads", "Tails", "H"]),
    "token": st.sampled_from(TOKENS + [None, None]),
    "position": st.integers(0, 4)}), max_size=4)
PROBE_KINDS = st.sampled_from(["outcome", "fixed-seed", "top-logprobs", None])


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


def assert_same_frames(frames, reference) -> None:
    assert frames.tracked_tokens == reference.tracked_tokens
    assert_same(frames.samples, reference.samples, float_tuples=("logprobs",))
    assert_same(frames.tracked, reference.tracked)


def as_json(data) -> str:
    """Every float by its repr (NaN, -0.0 and the last bit count), keys in order."""
    return json.dumps(data, allow_nan=True, default=str)


def assert_same_analysis(frames, reference, probe_kind, logprobs_requested=True,
                         threshold_pct=0.01) -> None:
    got = analyze(frames, threshold_pct, probe_kind, logprobs_requested=logprobs_requested)
    want = reference_analyze(reference, threshold_pct, probe_kind,
                             logprobs_requested=logprobs_requested)
    assert as_json(got.to_dict()) == as_json(want.to_dict())
    for mine, theirs in zip(got.tokens, want.tokens):  # what the CSVs and the report show
        pd.testing.assert_frame_equal(mine.clusters, theirs.clusters, check_exact=True)
        pd.testing.assert_frame_equal(mine.values, theirs.values, check_exact=True)


def assert_same_top_table(columns, samples) -> None:
    got, want = top_table(columns), reference_top_table(sorted(samples, key=lambda s: s.index))
    assert got.index.tolist() == want.index.tolist()
    assert got.position.tolist() == want.position.tolist()
    assert got.fingerprint.tolist() == want.fingerprint.tolist()
    assert got.expanded().shape == want.top.shape
    assert bits(got.expanded().reshape(-1).tolist()) == bits(want.top.reshape(-1).tolist())


# --- in memory and stored ----------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples=sample_sets(), tracked=TRACKED, all_positions=st.booleans(), kind=PROBE_KINDS)
def test_frames_and_figures_equal_the_per_sample_path(samples, tracked, all_positions, kind):
    frames = build_frames(samples, tracked, all_positions=all_positions)
    reference = reference_frames(samples, tracked, all_positions=all_positions)
    assert_same_frames(frames, reference)
    assert_same_analysis(frames, reference, kind)
    assert_same_top_table(SampleColumns.from_samples(samples), samples)
    assert as_json(build_insight(frames, samples).to_dict()) == \
        as_json(reference_insight(reference, samples).to_dict())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples=sample_sets(), tracked=TRACKED, all_positions=st.booleans(), kind=PROBE_KINDS,
       logprobs_requested=st.booleans())
def test_a_stored_run_read_as_columns_equals_its_samples(samples, tracked, all_positions, kind,
                                                         logprobs_requested):
    with tempfile.TemporaryDirectory() as root:
        with RunStore.create(root, "run", {"n": max(len(samples), 1)}) as store:
            store.record_many(samples)
            columns, stored = store.sample_columns(), store.samples()  # kept in the column cache
        with RunStore.open(Path(root) / "run") as store:
            assert store_columns.load(store._conn) is not None
            cached = store.sample_columns()
    # equal positions are one entry, however many samples carry them
    texts = {repr([(p.token, p.logprob, p.logprob_text, [(t.token, t.logprob, t.logprob_text)
                                                          for t in p.top])
                   for p in s.completion.positions]) for s in stored if s.completion}
    assert len(columns.distinct_positions) <= len(texts) + 1
    frames = build_frames(columns, tracked, all_positions=all_positions)
    reference = reference_frames(stored, tracked, all_positions=all_positions)
    assert_same_frames(frames, reference)
    assert_same_frames(build_frames(cached, tracked, all_positions=all_positions), reference)
    assert_same_analysis(frames, reference, kind, logprobs_requested)
    assert_same_top_table(columns, stored)
    assert_same_top_table(cached, stored)
    assert as_json(build_insight(frames, columns).to_dict()) == \
        as_json(reference_insight(reference, stored).to_dict())


def coin_run(n: int, distinct: int) -> list[Sample]:
    """The shape of a real coin-flip run: a few distinct top-20 lists over many samples."""
    samples = []
    for i in range(n):
        h = -0.6931471805599453 - (i % distinct) * 1e-16
        top = [TokenLogprob("Heads", h, repr(h)), TokenLogprob("T", -0.7, "-0.7")] + [
            TokenLogprob(f"t{k}", -10.0 - k, repr(-10.0 - k)) for k in range(18)]
        completion = Completion("Heads", "stop", [Position("Heads", h, repr(h), top)], "m",
                                "fp_a" if i % 3 else "fp_b")
        samples.append(Sample(i, "ok", completion, 1, 0.0, 0.1) if i % 500 else
                       Sample(i, "error", None, 3, 0.0, 1.0, error_kind="rate_limit"))
    return samples


def test_a_large_stored_run_reads_each_distinct_top_k_list_once(tmp_path):
    samples = coin_run(3000, 7)
    tracked = [{"label": "Heads", "token": "Heads", "position": 0},
               {"label": "Tails", "token": None, "position": 0}]
    with RunStore.create(tmp_path, "run", {"n": 3000}) as store:
        store.record_many(samples[::-1])
        columns = store.sample_columns()
    lists = {repr(s.completion.positions) for s in samples if s.completion}
    assert len(columns) == 3000 and len(columns.distinct_positions) == len(lists) + 1  # + none
    frames = build_frames(columns, tracked)
    reference = reference_frames(samples, tracked)
    assert frames.tracked_tokens[1]["token"] == "T"  # resolved from the data
    assert_same_frames(frames, reference)
    assert_same_analysis(frames, reference, "outcome")
    assert frames.tracked["logprob"].notna().all() and frames.samples["bad_logprobs"].eq(0).all()


# --- damaged rows: the same error as samples() -------------------------------------------


@pytest.mark.parametrize("column, value", [
    ("status", "maybe"), ("attempts", "three"), ("attempts", 1.5), ("started_at", "now"),
    ("latency_s", b"\x00"), ("output", b"Heads"), ("positions", "{not json"), ("positions", "{}"),
    ("positions", '[{"token": 1, "logprob": 0, "logprob_text": "0"}]'),
    ("positions", '[{"token": "a", "logprob": 0, "logprob_text": "0", "top": {}}]'),
    ("extra", "[1, 2"), ("extra", "[1]"), ("extra", 5),
])
@pytest.mark.parametrize("complete", [False, True], ids=["rows", "after-a-column-cache"])
def test_a_damaged_row_is_refused_as_samples_refuses_it(tmp_path, column, value, complete):
    with RunStore.create(tmp_path, "run", {"n": 40, "probe": {"name": "coin-flip"}}) as store:
        store.record_many(coin_run(40, 3))
        if complete:  # the columns are kept at close: the damage must still be seen
            store.update_manifest(status="complete")
    store_damage.set_field(tmp_path / "run", (7, 9), column, value)
    with RunStore.open_read_only(tmp_path / "run") as store:
        with pytest.raises(StoreError) as expected:
            store.samples()
        with pytest.raises(StoreError) as got:
            store.sample_columns()
    assert str(got.value) == str(expected.value) and "sample 7" in str(got.value)


def test_fields_of_a_row_without_its_completion_are_not_read(tmp_path):
    with RunStore.create(tmp_path, "run", {"n": 40, "probe": {"name": "coin-flip"}}) as store:
        store.record_many(coin_run(40, 3))
    for column, value in (("has_completion", 0), ("positions", "{not json"), ("output", b"\x00"),
                          ("extra", "[")):
        store_damage.set_field(tmp_path / "run", (5,), column, value)
    with RunStore.open_read_only(tmp_path / "run") as store:
        columns, samples = store.sample_columns(), store.samples()
    assert samples[5].completion is None and columns.output[5] is None
    tracked = [{"label": "Heads", "token": "Heads", "position": 0}]
    assert_same_frames(build_frames(columns, tracked), reference_frames(samples, tracked))


# --- real runs against the fake server ----------------------------------------------------

NAN_STATE = State([{"Heads": -0.25, "T": math.nan, "x": -math.inf}])
RUNS = {
    # outcome, two fingerprints, a tracked token missing from some top-k lists, NaN/inf values
    "coin-flip": (dict(probe="coin-flip", model="gpt-4o-mini", n=60),
                  dict(states=outcome_states("Heads", [(-0.31326166, 3), (-0.3132617, 2)],
                                             alternatives={"T": -1.3132617})
                       + [State([{"Heads": -0.2, "heads": -3.0}]), NAN_STATE],
                       fingerprints=["fp_a", "fp_b"])),
    # a model no tokenizer is known for: the tracked tokens are resolved from the data;
    # failed requests stay in the store as error rows
    "null-tokens-and-errors": (
        dict(probe="coin-flip", model="test-model", n=40, max_attempts=1, max_errors=20),
        dict(states=outcome_states("Heads", [(-0.5, 2), (-0.25, 1)], alternatives={"Tails": -1.5}),
             faults=[Fault("status", status=500, on={3, 11, 12})])),
    "fixed-seed": (dict(probe="fixed-seed", model="gpt-4o-mini", n=50),
                   dict(states=[State([{"The": -0.1, "A": -2.5}, {" sea": -0.2, " ocean": -1.7},
                                       {".": -0.05}], weight=3),
                                State([{"The": -0.1, "A": -2.5}, {" sea": -0.2 - 2 ** -40,
                                                                  " ocean": -1.7}, {".": -0.05}]),
                                State([{"A": -0.3, "The": -1.4}, {" wave": -0.6}])])),
    "positions-all": (dict(probe="top-logprobs", model="gpt-4o-mini", n=40),
                      dict(states=[State([{"Blue": -0.2, "Red": -1.9}, {".": -0.01}], weight=2),
                                   State([{"Red": -0.4, "Blue": -1.1}])])),
    "load-sweep-groups": (dict(probe="load-sweep", model="gpt-4o-mini", n=12, levels=[0, 3]),
                          dict(states=outcome_states("Heads", [(-0.3, 2), (-0.30000000000000004, 1)],
                                                     alternatives={"T": -1.3}))),
    "text-only": (dict(probe="coin-flip", model="gpt-4o-mini", n=30, no_logprobs=True),
                  dict(states=outcome_states("Heads", [(-0.3, 2)]) +
                       [State([{"Tails": -0.2}])])),
}


@pytest.mark.parametrize("name", RUNS)
def test_a_real_run_is_summarised_as_the_per_sample_path_summarises_it(fake_openai, tmp_path, name):
    run_args, server = RUNS[name]
    fake_openai.configure(**server)
    run = detaudit.run(base_url=fake_openai.url, out=tmp_path, **run_args)
    with RunStore.open_read_only(run.path) as store:
        got, want = session.summary(store), reference_summary(store)
        tracked = store.manifest.get("tracked") or []
        assert_same_frames(session.frames_of(store), reference_frames(store.samples(), tracked))
    assert as_json(got) == as_json(want)
    assert got == detaudit.open_run(run.path).summary()  # the Python API reads it this way too
    assert got["ok"] > 0
    if name == "null-tokens-and-errors":
        assert [t["token"] for t in run.manifest["tracked"]] == [None, None]
        assert got["errors"] == 3 and [t["token"] for t in got["tokens"]] == ["Heads", "Tails"]
    if name == "coin-flip":
        assert got["bad_logprobs"]["samples"] > 0 and got["tokens"][1]["missing"] > 0
    if name == "load-sweep-groups":
        assert [g["group"] for g in got["groups"]] == ["load=0", "load=3"]
    if name == "fixed-seed":
        assert got["divergence"]["distinct_logprob_vectors"] == 3
    if name == "positions-all":
        assert [t["label"] for t in got["tokens"]] == ["pos 0", "pos 1"]
    if name == "text-only":
        assert got["logprobs"] == "not_requested" and got["tokens"] == []
