"""Clustering of probabilities (percent) by gaps, against hand-computed cases."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detaudit.analysis import analyze, build_frames
from detaudit.analysis.clusters import GAP_TOLERANCE_PCT, cluster_ids, distinct_values


def test_chained_values_stay_one_cluster_though_its_ends_are_far_apart():
    # gaps 0.008 each; ends 0.024 apart, more than the 0.01 threshold
    assert cluster_ids(np.array([50.0, 50.008, 50.016, 50.024]), 0.01).tolist() == [0, 0, 0, 0]


def test_a_gap_over_the_threshold_splits():
    assert cluster_ids(np.array([50.0, 50.005, 50.02, 50.025]), 0.01).tolist() == [0, 0, 1, 1]


def test_a_gap_equal_to_the_threshold_does_not_split_but_just_over_does():
    assert cluster_ids(np.array([50.00, 50.01]), 0.01).tolist() == [0, 0]
    assert cluster_ids(np.array([12.34, 12.35]), 0.01).tolist() == [0, 0]
    assert cluster_ids(np.array([50.00, 50.0100001]), 0.01).tolist() == [0, 1]


def test_ties_are_one_value_and_never_split():
    assert cluster_ids(np.array([50.0, 50.0, 50.0, 60.0]), 0.01).tolist() == [0, 0, 0, 1]


def test_single_value_and_all_distinct():
    assert cluster_ids(np.array([42.0]), 0.01).tolist() == [0]
    assert cluster_ids(np.array([10.0, 20.0, 30.0]), 0.01).tolist() == [0, 1, 2]
    assert cluster_ids(np.array([]), 0.01).tolist() == []


def _samples_with_probs(make, probs_and_counts, fingerprint_of=lambda i: "fp_a"):
    samples, i = [], 0
    for prob, count in probs_and_counts:
        for _ in range(count):
            samples.append(make.coin(i, "Heads", repr(math.log(prob)),
                                     fingerprint=fingerprint_of(i)))
            i += 1
    return samples


def test_cluster_table_end_to_end_hand_computed(make):
    # 50.000% x3, 50.008% x1 chain into one cluster; 51% x2 is its own
    samples = _samples_with_probs(make, [(0.5, 3), (0.50008, 1), (0.51, 2)],
                                  fingerprint_of=lambda i: "fp_b" if i == 3 else "fp_a")
    frames = build_frames(samples, [{"label": "Heads", "token": "Heads", "position": 0}])
    token = analyze(frames, threshold_pct=0.01).tokens[0]
    assert token.distinct_logprobs == 3
    clusters = token.clusters
    assert len(clusters) == 2
    first, second = clusters.iloc[0], clusters.iloc[1]
    assert first["centre"] == pytest.approx((3 * 50.0 + 50.008) / 4, abs=1e-9)
    assert first["min"] == pytest.approx(50.0, abs=1e-9)
    assert first["max"] == pytest.approx(50.008, abs=1e-9)
    assert first["width"] == pytest.approx(0.008, abs=1e-9)
    assert (first["count"], first["distinct_values"]) == (4, 2)
    assert first["share"] == pytest.approx(4 / 6)
    assert first["fingerprints"] == {"fp_a": 3, "fp_b": 1}
    assert (second["count"], second["distinct_values"], second["width"]) == (2, 1, 0.0)
    assert second["share"] == pytest.approx(2 / 6)


def test_threshold_is_a_parameter(make):
    samples = _samples_with_probs(make, [(0.5, 1), (0.5005, 1)])  # 0.05 pp apart
    frames = build_frames(samples, [{"label": "Heads", "token": "Heads", "position": 0}])
    assert len(analyze(frames, threshold_pct=0.01).tokens[0].clusters) == 2
    assert len(analyze(frames, threshold_pct=0.1).tokens[0].clusters) == 1


def test_distinct_by_float_bits_not_by_text():
    a = -0.1
    b = np.nextafter(-0.1, 0.0)
    values = np.array([a, a, b, -0.10])
    distinct = distinct_values(values, ["-0.1", "-0.1", repr(b), "-0.10"])
    assert distinct.count.tolist() == [3, 1]  # ascending: -0.1 < nextafter(-0.1, 0)
    assert distinct.text[0] == "-0.1"
    assert distinct.inverse.tolist() == [0, 0, 1, 0]


pcts = st.lists(st.floats(min_value=0.0, max_value=100.0, allow_nan=False), min_size=1,
                max_size=200)


@settings(max_examples=200, deadline=None)
@given(values=pcts, threshold=st.sampled_from([0.0, 0.001, 0.01, 0.1, 1.0]))
def test_clusters_partition_the_values_by_their_gaps(values, threshold):
    ordered = np.sort(np.array(values))
    ids = cluster_ids(ordered, threshold)
    assert ids.size == ordered.size  # every value in exactly one cluster
    assert ids[0] == 0 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
    gaps = np.diff(ordered)
    same = np.diff(ids) == 0
    assert np.all(gaps[same] <= threshold + GAP_TOLERANCE_PCT)  # internal gaps
    assert np.all(gaps[~same] > threshold)  # gaps between clusters


@pytest.mark.parametrize("bad", [-0.01, math.nan, math.inf])
def test_a_bad_threshold_is_refused_with_a_clear_message(make, bad):
    frames = build_frames([make.coin(0, "Heads", "-0.5")],
                          [{"label": "Heads", "token": "Heads", "position": 0}])
    with pytest.raises(ValueError, match="percentage points >= 0"):
        analyze(frames, threshold_pct=bad)
