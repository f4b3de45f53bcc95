"""Multi-token completions: unique texts, logprob vectors, first divergence."""

import numpy as np

from detaudit.analysis import analyze, build_frames
from detaudit.analysis.divergence import first_divergence


def test_first_divergence_of_hand_made_sequences():
    ref = ("The", " sea", " is", " blue")
    assert first_divergence(ref, ref) is None
    assert first_divergence(("The", " sea", " was", " blue"), ref) == 2
    assert first_divergence(("A",), ref) == 0
    assert first_divergence(("The", " sea"), ref) == 2  # ends early
    assert first_divergence(ref + (".",), ref) == 4  # goes on


def test_divergence_against_the_most_common_completion(make):
    ref = ["The", " sea", " is", " blue"]
    samples = ([make.text(i, ref, [-0.1, -0.2, -0.3, -0.4]) for i in range(4)]
               + [make.text(4, ref, [-0.1, -0.2, -0.31, -0.4])]  # same tokens, logprob differs at 2
               + [make.text(5, ["The", " sea", " was", " grey"], [-0.1, -0.2, -0.9, -0.4])]
               + [make.text(6, ["The", " ocean", " is", " blue"], [-0.1, -0.8, -0.3, -0.4])]
               + [make.text(7, ["The", " sea", " was", " calm"], [-0.1, -0.2, -0.9, -0.5])])
    result = analyze(build_frames(samples, []), probe_kind="greedy-divergence")
    d = result.divergence
    assert d is not None
    assert d.completions == 8
    assert d.unique_completions == 4
    assert d.distinct_token_sequences == 4
    assert d.distinct_logprob_vectors == 5
    assert (d.reference_count, d.reference_length) == (5, 4)
    assert d.positions == {1: 1, 2: 2}
    assert (d.diverged, d.min_position, d.median_position) == (3, 1, 2.0)
    assert d.logprob_positions == {2: 1}
    assert result.to_dict()["divergence"]["first_divergence"]["histogram"] == {"1": 1, "2": 2}


def test_all_positions_tracks_the_most_common_token_of_each_position(make):
    samples = [make.text(0, ["Blue", "."], [-0.5, -0.01]),
               make.text(1, ["Blue", "."], [-0.5, -0.02]),
               make.text(2, ["Red", "!"], [-0.9, -0.3])]
    frames = build_frames(samples, [], all_positions=True)
    assert [(t["label"], t["token"], t["position"]) for t in frames.tracked_tokens] == \
        [("pos 0", "Blue", 0), ("pos 1", ".", 1)]
    result = analyze(frames, probe_kind="top-logprobs")
    first, second = result.tokens
    assert (first.distinct_logprobs, first.missing) == (1, 1)
    assert (second.distinct_logprobs, second.missing) == (2, 1)


def test_same_text_with_other_logprobs_is_not_deterministic(make):
    # One text, two logprob vectors: the verdict must see the numbers, not only the text.
    ref = ["Once", " upon", " a", " time"]
    samples = [make.text(i, ref, [-0.1, -0.2, -0.3, -0.4]) for i in range(3)]
    samples.append(make.text(3, ref, [-0.1, -0.2, float(np.nextafter(-0.3, 0.0)), -0.4]))
    result = analyze(build_frames(samples, []), probe_kind="greedy-divergence")
    d = result.divergence
    assert (result.outputs_distinct, d.distinct_token_sequences, d.distinct_logprob_vectors) == (1, 1, 2)
    assert d.first_difference == 2 and not d.deterministic
    assert not result.deterministic
    summary = result.to_dict()
    assert summary["deterministic"] is False
    assert summary["divergence"]["first_difference"] == 2
    assert summary["divergence"]["first_logprob_divergence"]["min"] == 2
    steady = analyze(build_frames(samples[:3], []), probe_kind="greedy-divergence")
    assert steady.deterministic and steady.divergence.first_difference is None


def test_first_difference_is_the_earliest_departure_by_token_or_by_bits(make):
    ref = ["The", " sea", " is", " blue"]
    samples = [make.text(i, ref, [-0.1, -0.2, -0.3, -0.4]) for i in range(3)]
    # other tokens from position 3, but its logprob at 1 already differs: departs at 1
    samples.append(make.text(3, ["The", " sea", " is", " grey"], [-0.1, -0.25, -0.3, -0.9]))
    d = analyze(build_frames(samples, []), probe_kind="greedy-divergence").divergence
    assert (d.min_position, d.first_difference) == (3, 1)
    samples[3] = make.text(3, ["The", " sea", " is", " grey"], [-0.1, -0.2, -0.3, -0.9])
    d = analyze(build_frames(samples, []), probe_kind="greedy-divergence").divergence
    assert (d.min_position, d.first_difference) == (3, 3)


def test_vectors_are_counted_per_group(make):
    ref = ["Once", " upon"]
    samples = []
    for i in range(6):
        group = "batch=1" if i < 3 else "batch=8"
        last = -0.2 if group == "batch=1" or i == 3 else float(np.nextafter(-0.2, 0.0))
        sample = make.text(i, ref, [-0.1, last])
        sample.group = group
        samples.append(sample)
    result = analyze(build_frames(samples, []), probe_kind="greedy-divergence")
    groups = {g["group"]: g for g in result.groups}
    assert groups["batch=1"]["distinct_logprob_vectors"] == 1
    assert groups["batch=1"]["first_difference"] is None
    assert groups["batch=8"]["distinct_logprob_vectors"] == 2
    assert groups["batch=8"]["first_difference"] == 1
    assert all(g["distinct_token_sequences"] == 1 for g in result.groups)
