"""Top-k entropy and leftover mass on hand-computed distributions, then end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from detaudit.analysis.entropy import entropy_by_position, topk_entropy
from tests.insight.conftest import cli, make_run
from tests.servers.fake_openai import State

NAN = np.nan


def test_hand_computed_distributions():
    rows = np.log(np.array([
        [0.5, 0.25, 0.125],     # leftover 1/8; partial: 1/2*1 + 1/4*2 + 1/8*3 = 1.375 bits
        [0.25, 0.25, 0.25],     # with a 4th 0.25 left out
        [0.5, 0.5, NAN],        # a fair coin, k = 2 here
        [1.0, NAN, NAN],        # certain
    ]))
    entropy, partial, leftover = topk_entropy(rows)
    # renormalised [4/7, 2/7, 1/7]: -(4/7 log2 4/7 + 2/7 log2 2/7 + 1/7 log2 1/7)
    first = -(4 / 7 * math.log2(4 / 7) + 2 / 7 * math.log2(2 / 7) + 1 / 7 * math.log2(1 / 7))
    assert entropy == pytest.approx([first, math.log2(3), 1.0, 0.0])
    assert partial == pytest.approx([1.375, 1.5, 1.0, 0.0])
    assert leftover == pytest.approx([0.125, 0.25, 0.0, 0.0])


def test_sentinel_logprobs_carry_no_mass_and_sums_over_one_clip():
    entropy, partial, leftover = topk_entropy(np.array([[math.log(0.5), math.log(0.5), -9999.0],
                                                        [math.log(0.6), math.log(0.4000001), NAN]]))
    assert entropy[0] == pytest.approx(1.0) and partial[0] == pytest.approx(1.0)
    assert leftover[0] == 0.0 and leftover[1] == 0.0


def test_by_position_aggregates_responses():
    positions = np.array([0, 0, 0, 1])
    rows = np.log(np.array([[0.5, 0.5], [0.5, 0.5], [0.75, 0.25], [0.9, 0.05]]))
    table = entropy_by_position(positions, rows).set_index("position")
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert table.loc[0, "n"] == 3 and table.loc[0, "distinct_bits"] == 2
    assert table.loc[0, "mean_bits"] == pytest.approx((1 + 1 + h) / 3)
    assert (table.loc[0, "min_bits"], table.loc[0, "max_bits"]) == (pytest.approx(h), pytest.approx(1.0))
    assert table.loc[1, "mean_leftover"] == pytest.approx(0.05)
    assert table.loc[1, "k"] == 2


def test_entropy_in_the_report_of_a_real_run(fake_openai, tmp_path):
    # Heads 1/2, T 1/4: the server pads the top 3 with a token at log(1/4) - 5
    fake_openai.configure(states=[State([{"Heads": math.log(0.5), "T": math.log(0.25)}])])
    run = make_run(fake_openai, tmp_path, "--n", "6", "--top-logprobs", "3")
    report = json.loads(cli("report", run, "--json").stdout)
    (row,) = report["insight"]["entropy"]
    p = np.array([0.5, 0.25, 0.25 * math.exp(-5)])
    q = p / p.sum()
    assert (row["position"], row["n"], row["k"], row["distinct_bits"]) == (0, 6, 3, 1)
    assert row["mean_bits"] == pytest.approx(float(-(q * np.log2(q)).sum()))
    assert row["mean_leftover"] == pytest.approx(1 - p.sum())
    assert "Entropy of the top-k" in cli("report", run).stdout
