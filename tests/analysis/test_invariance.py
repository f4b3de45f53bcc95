"""The verdict of one matrix axis (``detaudit.analysis.invariance``), on frames built
from real Sample records: which differences make an axis vary, and which do not."""

from __future__ import annotations

from detaudit.analysis import build_frames
from detaudit.analysis.invariance import compare_levels
from tests.analysis.conftest import COIN_TRACKED, coin_sample, error_sample, text_sample

LEVELS, GROUPS = ["0", "4"], ["load=0", "load=4"]


def verdict(samples, tracked=COIN_TRACKED, **kwargs):
    return compare_levels(build_frames(samples, tracked), "load", LEVELS, GROUPS, **kwargs)


def coin(index, level, heads, tails="-1.3", output="Heads"):
    return coin_sample(index, output, heads, tails, group=f"load={level}")


def test_one_value_everywhere_does_not_vary():
    result = verdict([coin(i, lv, "-0.3") for i, lv in enumerate("0004444")])
    assert result.varies is False and result.verdict == "no change"
    assert result.distinct == {"0": 1, "4": 1} and result.new == {"4": 0}
    assert result.n == {"0": 3, "4": 4} and result.noisy == []


def test_a_value_the_baseline_never_gave_varies():
    samples = [coin(0, 0, "-0.3"), coin(1, 0, "-0.3"), coin(2, 4, "-0.3"), coin(3, 4, "-0.30000001")]
    result = verdict(samples)
    assert result.varies is True and result.moves == {"logprobs": True, "outputs": False}
    assert result.distinct == {"0": 1, "4": 2} and result.new == {"4": 1}
    assert result.verdict == "varies: logprobs" and result.noisy == ["4"]
    heads = result.tokens[0]
    assert heads["label"] == "Heads" and heads["distinct"] == {"0": 1, "4": 2} and heads["new"] == {"4": 1}


def test_one_value_at_each_level_but_another_one_varies():
    result = verdict([coin(0, 0, "-0.3"), coin(1, 4, "-0.31")])
    assert result.distinct == {"0": 1, "4": 1} and result.varies is True


def test_only_a_tracked_token_moving_is_a_logprob_change():
    result = verdict([coin(0, 0, "-0.3", tails="-1.3"), coin(1, 4, "-0.3", tails="-1.2999")])
    assert result.varies is True and result.moves["logprobs"] and not result.moves["outputs"]


def test_another_output_moves_the_outputs():
    result = verdict([coin(0, 0, "-0.3"), coin(1, 4, "-0.3", output="Heads!")])
    assert result.moves == {"logprobs": False, "outputs": True}
    assert result.verdict == "varies: outputs"


def test_noise_within_levels_alone_is_no_variation():
    """Two values at the baseline, a subset of them under load: noisy, not varying."""
    samples = [coin(0, 0, "-0.3"), coin(1, 0, "-0.31"), coin(2, 4, "-0.31"), coin(3, 4, "-0.31")]
    result = verdict(samples)
    assert result.varies is False and result.noisy == ["0"]
    assert result.verdict == "no change (0 noisy)"
    both = verdict([coin(0, 0, "-0.3"), coin(1, 0, "-0.31"), coin(2, 4, "-0.31"), coin(3, 4, "-0.3")])
    assert both.varies is False and both.verdict == "no change (noisy at every level)"


def test_bits_not_text_decide():
    """"-0.30" and "-0.3" are one float64: one value."""
    result = verdict([coin(0, 0, "-0.3"), coin(1, 4, "-0.30")])
    assert result.varies is False and result.distinct == {"0": 1, "4": 1}


def test_a_token_missing_at_one_level_is_left_out_of_the_answers():
    """Tails outside a top-5 that a top-20 keeps is no change of the numbers."""
    result = verdict([coin(0, 0, "-0.3", tails=None), coin(1, 4, "-0.3", tails="-1.3")])
    assert result.varies is False
    tails = result.tokens[1]
    assert tails["in_answers"] is False and tails["distinct"] == {"0": 0, "4": 1}
    assert "1 of 2 tracked" in result.compared


def test_first_positions_only_on_the_max_tokens_axis():
    short = text_sample(0, ["Heads"], [-0.3])
    long = text_sample(1, ["Heads", " up", "."], [-0.3, -2.0, -1.0])
    short.group, long.group = "load=0", "load=4"
    assert verdict([short, long], tracked=[]).varies is True  # the whole answer: other tokens
    first = verdict([short, long], tracked=[], positions=1)
    assert first.varies is False and "first 1 token" in first.compared
    moved = text_sample(2, ["Heads", " up"], [-0.29, -2.0])
    moved.group = "load=4"
    assert verdict([short, moved], tracked=[], positions=1).varies is True


def test_units_are_compared_apart():
    """The cache axis: each nonce variant against its own cold answer."""
    levels, groups = ["cold", "warm"], ["cache=cold", "cache=warm"]
    samples = [coin_sample(i, "Heads", text, "-1.3", group=group)
               for i, (text, group) in enumerate([("-0.3", "cache=cold"), ("-0.3", "cache=warm"),
                                                  ("-0.5", "cache=cold"), ("-0.5", "cache=warm")])]
    frames = build_frames(samples, COIN_TRACKED)
    same = compare_levels(frames, "cache", levels, groups, units={0: 0, 1: 0, 2: 1, 3: 1})
    assert same.varies is False and same.distinct == {"cold": 2, "warm": 2} and same.noisy == []
    # variant 1's warm repeat gives variant 0's value: new for variant 1
    crossed = compare_levels(frames, "cache", levels, groups, units={0: 0, 1: 1, 2: 1, 3: 0})
    assert crossed.varies is True and crossed.new == {"warm": 2}


def test_a_level_without_a_successful_sample_has_no_verdict():
    samples = [coin(0, 0, "-0.3"), error_sample(1, "bad_request")]
    samples[1].group = "load=4"
    result = verdict(samples)
    assert result.varies is None and result.errors == {"0": 0, "4": 1}
    assert result.verdict.startswith("no data (4:")


def test_other_groups_are_left_out():
    warmup = coin_sample(0, "Tails", "-9.0", "-0.1", group="warmup")
    result = verdict([warmup, coin(1, 0, "-0.3"), coin(2, 4, "-0.3")])
    assert result.varies is False and sum(result.n.values()) == 2
    assert set(result.to_dict()) >= {"axis", "levels", "distinct", "varies", "verdict", "moves", "new"}
