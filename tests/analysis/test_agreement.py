"""Text-only agreement (analysis/agreement.py) and how analyze() uses it: frames of real
Sample records in, figures out; no server."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from detaudit.analysis import analyze, build_frames
from detaudit.analysis.agreement import (NOT_REQUESTED, NOT_RETURNED, REQUESTED, agreement,
                                         logprobs_status, parse_answer)
from detaudit.records import Completion, Sample

import re


def plain(index: int, text: str) -> Sample:
    """What a server without logprobs gives: text, no positions."""
    return Sample(index=index, status="ok", completion=Completion(text=text, finish_reason="stop"),
                  attempts=1, started_at=0.0, latency_s=0.01)


def frame(texts, errors=()):
    samples = [plain(i, t) for i, t in enumerate(texts)]
    samples += [Sample(index=len(texts) + i, status="error", completion=None, attempts=1,
                       started_at=0.0, latency_s=0.1, error_kind=kind, error_message="x")
                for i, kind in enumerate(errors)]
    return build_frames(samples, [])


def test_tar_raw_is_the_share_of_the_most_common_text():
    a = agreement(frame(["The sea is blue"] * 7 + ["The sea is grey"] * 2 + ["A sea"]).samples)
    assert (a.n, a.distinct_outputs, a.reference_count) == (10, 3, 7)
    assert a.tar_raw == pytest.approx(0.7)
    assert a.tar_answer is None and "answers" not in a.to_dict()


def test_tar_answer_parses_with_the_first_group_and_counts_unparsed_as_disagreeing():
    texts = (["Answer: 42."] * 3 + ["So the answer: 42!"] * 3 + ["Answer: 41"] * 2
             + ["no idea"] * 2)
    a = agreement(frame(texts).samples, answer_regex=r"[Aa]nswer: (\d+)")
    assert a.tar_raw == pytest.approx(0.3)  # four distinct raw texts
    assert (a.parsed, a.distinct_answers, a.reference_answer, a.answer_count) == (8, 2, "42", 6)
    assert a.tar_answer == pytest.approx(0.6)  # 6 of 10: the unparsed two disagree
    assert a.to_dict()["answers"] == {"parsed": 8, "unparsed": 2, "distinct": 2,
                                      "most_common": "42", "count": 6}


def test_without_a_group_the_whole_match_is_the_answer():
    pattern = re.compile(r"Heads|Tails")
    assert parse_answer(pattern, "I say Tails.") == "Tails"
    assert parse_answer(pattern, "edge") is None
    assert parse_answer(re.compile(r"x(\d)?"), "x") is None  # the group took no part


def test_no_output_parses():
    a = agreement(frame(["a", "b"]).samples, answer_regex=r"\d+")
    assert (a.parsed, a.tar_answer, a.reference_answer) == (0, 0.0, None)


def test_first_divergence_by_character_without_a_tokenizer():
    a = agreement(frame(["abcd"] * 3 + ["abXd", "ab", "abcde"]).samples)
    assert (a.unit, a.tokenizer, a.reference_length) == ("character", None, 4)
    assert a.positions == {2: 2, 4: 1}  # "abXd" and "ab" at 2, "abcde" goes on at 4
    assert (a.diverged, a.min_position, a.median_position) == (3, 2, 2.0)


def test_first_divergence_by_the_tokens_given():
    words = lambda text: text.split(" ")  # noqa: E731  a stand-in tokenizer
    a = agreement(frame(["the sea is blue"] * 2 + ["the sea was blue"]).samples,
                  tokenize=words, tokenizer="words")
    assert (a.unit, a.tokenizer, a.reference_length) == ("token", "words", 4)
    assert a.positions == {2: 1}
    assert a.to_dict()["first_divergence"]["histogram"] == {"2": 1}


def test_no_successful_output():
    a = agreement(frame([], errors=["no_logprobs"]).samples)
    assert a.n == 0 and math.isnan(a.tar_raw) and a.to_dict()["tar_raw"] != a.to_dict()["tar_raw"]


def test_logprobs_status():
    assert logprobs_status(frame(["a"]).samples, requested=False) == NOT_REQUESTED
    assert logprobs_status(frame(["a"], errors=["server_error"]).samples, True) == REQUESTED
    assert logprobs_status(frame([], errors=["no_logprobs"]).samples, True) == NOT_RETURNED


def test_a_text_only_analysis_shows_no_logprob_figure(coin_tracked):
    samples = [plain(i, "Heads") for i in range(4)] + [plain(4, "Tails")]
    result = analyze(build_frames(samples, coin_tracked), probe_kind="outcome",
                     logprobs_requested=False)
    summary = result.to_dict()
    assert result.text_only and summary["logprobs"] == "not_requested"
    assert summary["tokens"] == [] and summary["divergence"] is None
    assert summary["agreement"]["tar_raw"] == pytest.approx(0.8)
    heads, tails = summary["outcomes"]  # shares by text still stand
    assert (heads["count"], tails["count"], heads["mean_reported_prob"]) == (4, 1, None)
    assert not result.deterministic


def test_a_run_with_logprobs_keeps_its_divergence_and_gets_rates(make):
    samples = [make.text(i, ["a", "b"], [-0.1, -0.2]) for i in range(3)] + \
        [make.text(3, ["a", "c"], [-0.1, -0.9])]
    result = analyze(build_frames(samples, []), probe_kind="greedy-divergence")
    assert result.logprobs == REQUESTED and result.divergence is not None
    assert result.agreement.tar_raw == pytest.approx(0.75)
    assert "first_divergence" not in result.agreement.to_dict()  # the tokens' own is in divergence


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["Heads", "Tails", "Heads!", "", "H"]), min_size=1, max_size=40))
def test_rates_match_a_direct_count(texts):
    a = agreement(frame(texts).samples, answer_regex=r"Heads|Tails")
    top = max(texts.count(t) for t in set(texts))
    assert a.tar_raw == top / len(texts)
    answers = [m.group(0) for m in map(re.compile(r"Heads|Tails").search, texts) if m]
    best = max((answers.count(x) for x in set(answers)), default=0)
    assert a.tar_answer == best / len(texts)
    assert a.diverged == len(texts) - a.reference_count
