"""Grid detection on synthetic quantised and continuous data, and end to end: logits on
a 1/8 grid served by the fake server show up as a 2^-3 step in the report's JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from detaudit.analysis.logit_grid import detect_grid, log_odds, log_odds_of_pct, top_gap
from tests.insight.conftest import cli, make_run
from tests.servers.fake_openai import State


def bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even), back as float64."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def test_bf16_logit_gaps_sit_on_a_power_of_two_grid():
    rng = np.random.default_rng(1)
    # top-1 and top-2 logits in [16, 32): bf16 spacing there is 2^-3
    top1 = bf16(rng.uniform(24.0, 26.0, 500))
    top2 = bf16(rng.uniform(17.0, 19.0, 500))
    gaps = (top1 - top2).astype(np.float32).astype(np.float64)  # as float32 logprobs report them
    grid = detect_grid(gaps)
    assert grid is not None
    assert grid.step == pytest.approx(0.125, abs=1e-9) and grid.step_log2 == -3
    assert grid.occupied == len(np.unique(gaps)) and grid.max_residual <= grid.tol


def test_known_step_with_printing_noise():
    rng = np.random.default_rng(2)
    values = -3.0 + 0.0390625 * rng.integers(0, 200, 300)  # step 5 * 2^-7, not a power of two
    noisy = np.array([float(f"{v:.8g}") for v in values])  # 8 significant digits, as APIs print
    grid = detect_grid(noisy)
    assert grid is not None and grid.step == pytest.approx(0.0390625, rel=1e-6)
    assert grid.step_log2 is None


@pytest.mark.parametrize("size", [5, 50, 5000])
def test_continuous_values_have_no_grid(size):
    values = np.random.default_rng(size).uniform(-2.0, 0.0, size)
    assert detect_grid(values) is None


def test_too_few_values_prove_nothing():
    assert detect_grid(np.array([0.5, 0.75])) is None
    assert detect_grid(np.array([0.5, 0.5, 0.5])) is None
    assert detect_grid(np.array([np.nan, -np.inf])) is None


def test_log_odds_and_gap_by_hand():
    assert log_odds(np.log([0.5, 0.2, 0.9])) == pytest.approx([0.0, math.log(0.25), math.log(9.0)])
    assert log_odds(np.array([0.0]))[0] == math.inf
    assert log_odds_of_pct(np.array([50.0, 20.0])) == pytest.approx([0.0, math.log(0.25)])
    gaps = top_gap(np.array([[-2.0, -0.1, -3.0], [-0.5, np.nan, np.nan], [-1.0, -1.0, np.nan]]))
    assert gaps[0] == pytest.approx(1.9) and math.isnan(gaps[1]) and gaps[2] == 0.0


def _two_way_states(heads_logits: list[float], tails_logit: float) -> list[State]:
    states = []
    for logit in heads_logits:
        norm = np.logaddexp(logit, tails_logit)
        states.append(State([{"Heads": float(logit - norm), "T": float(tails_logit - norm)}]))
    return states


def test_quantised_logits_served_over_http_show_their_grid(fake_openai, tmp_path):
    fake_openai.configure(states=_two_way_states([20 + k * 0.125 for k in (0, 1, 3, 4, 7)], 19.0))
    run = make_run(fake_openai, tmp_path, "--n", "20")
    report = json.loads(cli("report", run, "--json").stdout)
    heads = report["insight"]["logit_grid"][0]
    assert heads["label"] == "Heads" and heads["top1_top2_gap"]["distinct"] == 5
    assert heads["top1_top2_gap"]["grid"]["step"] == pytest.approx(0.125, abs=1e-9)
    assert heads["top1_top2_gap"]["grid"]["step_log2"] == -3
    assert heads["log_odds"]["grid"]["step"] == pytest.approx(0.125, abs=1e-9)  # two-way: log-odds = gap
    assert heads["logprob_grid"] is None  # the normaliser moves with the logit: no grid in logprobs
    cluster = report["tokens"][0]["cluster_list"][0]
    assert cluster["centre_log_odds"] == pytest.approx(
        math.log(cluster["centre_pct"] / (100 - cluster["centre_pct"])))
    text = cli("report", run).stdout
    assert "Logit grid" in text and "2^-3" in text


def test_continuous_logits_served_over_http_show_none(fake_openai, tmp_path):
    rng = np.random.default_rng(7)
    fake_openai.configure(states=_two_way_states(list(20 + rng.uniform(0, 1, 6)), 19.0))
    run = make_run(fake_openai, tmp_path, "--n", "12")
    heads = json.loads(cli("report", run, "--json").stdout)["insight"]["logit_grid"][0]
    assert heads["top1_top2_gap"]["distinct"] == 6 and heads["top1_top2_gap"]["grid"] is None
