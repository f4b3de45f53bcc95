"""build_frames + analyze on real Sample records: distinctness, missing, outcomes,
fingerprints, groups, errors and the JSON summary."""

import json
import math

import numpy as np
import pytest

from detaudit.analysis import analyze, build_frames
from detaudit.analysis.stats import wilson_interval


def test_text_variants_of_one_float_are_one_value_and_float_neighbours_are_two(make, coin_tracked):
    neighbour = float(np.nextafter(-0.1, 0.0))
    samples = [make.coin(0, "Heads", "-0.1", "-2.5"), make.coin(1, "Heads", "-0.10", "-2.5"),
               make.coin(2, "Heads", "-1e-1", "-2.5"), make.coin(3, "Heads", repr(neighbour), "-2.5")]
    result = analyze(build_frames(samples, coin_tracked))
    heads, tails = result.tokens
    assert heads.distinct_logprobs == 2
    assert sorted(heads.values["count"]) == [1, 3]
    assert tails.distinct_logprobs == 1
    assert len(heads.clusters) == 1  # 1 ulp apart: one cluster
    assert not result.deterministic


def test_local_engine_hex_texts_are_parsed(make):
    value = -0.6931471805599453
    samples = [make.coin(i, "Heads", float.hex(value)) for i in range(3)]
    frames = build_frames(samples, [{"label": "Heads", "token": "Heads", "position": 0}])
    assert frames.tracked["logprob"].tolist() == [value] * 3
    result = analyze(frames)
    assert result.tokens[0].distinct_logprobs == 1 and result.deterministic


def test_absent_token_is_missing_and_excluded_from_spread(make, coin_tracked):
    samples = [make.coin(0, "Heads", "-0.5", "-1.0"), make.coin(1, "Heads", "-0.5", None),
               make.coin(2, "Heads", "-0.5", "-2.0")]
    tails = analyze(build_frames(samples, coin_tracked)).tokens[1]
    assert (tails.n, tails.missing, tails.distinct_logprobs) == (3, 1, 2)
    assert tails.logprob.mean == pytest.approx(-1.5)
    assert tails.prob.max == pytest.approx(math.exp(-1.0))


def test_null_token_resolves_to_most_frequent_prefix_of_the_label(make):
    samples = [make.coin(i, "Tails", "-0.7", "-0.6") for i in range(3)]
    frames = build_frames(samples, [{"label": "Tails", "token": None, "position": 0},
                                    {"label": "Heads", "token": None, "position": 0}])
    # "T" is a prefix of "Tails"; for "Heads", "Heads" (3) beats nothing else, "H" ties on
    # count and loses to the longer prefix
    assert [t["token"] for t in frames.tracked_tokens] == ["T", "Heads"]


def test_outcome_shares_with_wilson_interval_next_to_reported_probability(make, coin_tracked):
    samples = ([make.coin(i, "Heads", "-0.5", "-1.0") for i in range(7)]
               + [make.coin(i, " Tails", "-0.5", "-1.0") for i in range(7, 10)]
               + [make.error(10, "timeout")])
    result = analyze(build_frames(samples, coin_tracked), probe_kind="outcome")
    heads, tails = result.outcomes
    assert (heads.label, heads.count, heads.n, heads.share) == ("Heads", 7, 10, 0.7)
    assert (heads.ci_low, heads.ci_high) == wilson_interval(7, 10)
    assert heads.mean_reported_prob == pytest.approx(math.exp(-0.5))
    assert (tails.count, tails.share) == (3, 0.3)  # leading whitespace ignored
    assert (result.n, result.ok, result.errors, result.errors_by_kind) == (11, 10, 1, {"timeout": 1})
    assert result.outputs_distinct == 2
    assert result.outputs_top[0] == ("Heads", 7)


def test_per_fingerprint_and_per_group_breakdowns(make):
    samples = [make.coin(0, "Heads", "-0.1", fingerprint="fp_a", group="16"),
               make.coin(1, "Heads", "-0.2", fingerprint="fp_a", group="4"),
               make.coin(2, "Heads", "-0.3", fingerprint="fp_b", group="16"),
               make.coin(3, "Tails", "-0.3", fingerprint=None, group="4"),
               make.error(4, "rate_limit")]
    samples[4].group = "4"
    result = analyze(build_frames(samples, [{"label": "Heads", "token": "Heads", "position": 0}]))
    assert result.fingerprints == {"fp_a": 2, "fp_b": 1, "(none)": 1}
    by_fp = result.tokens[0].by_fingerprint
    assert by_fp["fp_a"]["distinct_logprobs"] == 2
    assert by_fp["fp_a"]["mean_prob"] == pytest.approx((math.exp(-0.1) + math.exp(-0.2)) / 2)
    assert [g["group"] for g in result.groups] == ["4", "16"]  # numeric order
    four = result.groups[0]
    assert (four["n"], four["errors"], four["distinct_outputs"]) == (3, 1, 2)
    assert four["tokens"][0]["distinct_logprobs"] == 2


def test_a_fingerprints_mean_is_numpys_in_sample_order_wherever_it_falls(make):
    """Found by the equivalence property test: pandas' group mean gave these three values
    a mean one bit off the correctly rounded one when their group came after another."""
    texts = ["-1.5", "-0.6931471805599453", "-0.6931"]
    samples = [make.coin(0, "Heads", "-0.5", fingerprint="fp_a")] + [
        make.coin(i + 1, "Heads", text, fingerprint=None) for i, text in enumerate(texts)]
    expected = np.exp(np.array([float(t) for t in texts])).mean()
    for order in (samples, samples[::-1]):
        (heads,) = analyze(build_frames(order, [{"label": "Heads", "token": "Heads",
                                                 "position": 0}])).tokens
        got = heads.by_fingerprint["(none)"]["mean_prob"]
        assert float.hex(got) == float.hex(float(expected))


def test_load_level_groups_sort_by_their_number(make):
    levels = ["load=16", "load=4", "load=0", "load=64"]
    samples = [make.coin(i, "Heads", "-0.1", group=g) for i, g in enumerate(levels)]
    result = analyze(build_frames(samples, [{"label": "Heads", "token": "Heads", "position": 0}]))
    assert [g["group"] for g in result.groups] == ["load=0", "load=4", "load=16", "load=64"]


def test_to_dict_is_plain_json_without_nan(make, coin_tracked):
    samples = [make.coin(0, "Heads", "-0.5", None), make.error(1, "server_error")]
    summary = analyze(build_frames(samples, coin_tracked)).to_dict()
    text = json.dumps(summary, allow_nan=False)  # raises on NaN or inf
    back = json.loads(text)
    assert back["n"] == 2 and back["errors"] == 1
    tails = back["tokens"][1]
    assert tails["missing"] == 1 and tails["distinct_logprobs"] == 0
    assert tails["prob"]["mean"] is None  # no values: null, not NaN
    for key in ("token", "n", "distinct_logprobs", "clusters", "threshold_pct", "prob", "logprob"):
        assert key in back["tokens"][0]
    assert set(back["tokens"][0]["prob"]) == {"mean", "std", "min", "max", "range"}
    assert back["outputs"] == {"distinct": 1, "top": [["Heads", 1]]}
    assert back["fingerprints"] == {"fp_a": 1}


def test_no_successful_samples(make, coin_tracked):
    result = analyze(build_frames([make.error(0, "connection")], coin_tracked))
    assert result.ok == 0 and not result.deterministic
    json.dumps(result.to_dict(), allow_nan=False)


@pytest.mark.parametrize("bad", ["NaN", "-Infinity", "Infinity"])
def test_nan_and_infinite_logprobs_are_bad_values_not_missing(make, coin_tracked, bad):
    samples = [make.coin(0, "Heads", "-0.5", "-1.0"), make.coin(1, "Heads", bad, "-1.0"),
               make.coin(2, "Heads", "-0.5", None), make.coin(3, "Heads", "-0.5", "-1.0")]
    result = analyze(build_frames(samples, coin_tracked))
    heads, tails = result.tokens
    assert (heads.n, heads.missing, heads.bad, heads.distinct_logprobs) == (4, 0, 1, 1)
    assert (tails.missing, tails.bad) == (1, 0)
    assert math.isfinite(heads.prob.max) and heads.prob.max == pytest.approx(math.exp(-0.5))
    assert result.bad_logprobs == {"samples": 1, "values": 2}  # chosen token and its top-k entry
    assert not result.deterministic
    summary = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert summary["deterministic"] is False
    assert summary["bad_logprobs"] == {"samples": 1, "values": 2}
    assert (summary["tokens"][0]["missing"], summary["tokens"][0]["bad_values"]) == (0, 1)
    clean = analyze(build_frames([samples[0], samples[3]], coin_tracked))
    assert clean.deterministic and clean.bad_logprobs == {"samples": 0, "values": 0}
