"""detaudit compare on real stored runs made against the fake OpenAI server; every
statistic is recomputed here with scipy from the rows read straight from SQLite."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from detaudit.analysis.compare import StatTest, holm
from tests.insight.conftest import cli, make_run, stored_rows, top_logprob
from tests.servers.fake_openai import State, outcome_states

HEADS_ONLY = outcome_states("Heads", [(-0.31326166, 3), (-0.3132617, 1)], alternatives={"T": -1.3132617})
# B: the logprob of Heads moved, and one answer in four is Tails.
MIXED = [State([{"Heads": -0.2, "T": -1.7}], weight=2), State([{"Heads": -0.25, "T": -1.5}], weight=1),
         State([{"T": -0.5, "Heads": -0.9}], weight=1)]


def _outputs_table(rows_a, rows_b):
    labels = sorted({r["output"] for r in rows_a + rows_b})
    return np.array([[sum(r["output"] == o for r in rows) for o in labels] for rows in (rows_a, rows_b)])


def _newcombe(ca, na, cb, nb):
    z = stats.norm.ppf(0.975)

    def wilson(c, n):
        p = c / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return max(0.0, centre - half), min(1.0, centre + half)

    (la, ua), (lb, ub) = wilson(ca, na), wilson(cb, nb)
    pa, pb = ca / na, cb / nb
    return (pb - pa - math.sqrt((pb - lb) ** 2 + (ua - pa) ** 2),
            pb - pa + math.sqrt((ub - pb) ** 2 + (pa - la) ** 2))


def test_different_distributions_differ_with_scipy_statistics(fake_openai, tmp_path):
    fake_openai.configure(states=HEADS_ONLY)
    run_a = make_run(fake_openai, tmp_path, "--n", "80")
    fake_openai.configure(states=MIXED, fingerprints=["fp_b"])
    run_b = make_run(fake_openai, tmp_path, "--n", "80")

    result = cli("compare", run_a, run_b, "--json")
    assert result.exit_code == 4, result.stderr
    report = json.loads(result.stdout)
    assert report["differ"] is True and (report["n_a"], report["n_b"]) == (80, 80)

    rows_a, rows_b = stored_rows(run_a), stored_rows(run_b)
    tests = {t["name"]: t for t in report["tests"]}
    chi2, p, dof, _ = stats.chi2_contingency(_outputs_table(rows_a, rows_b))
    outputs = tests["outputs"]
    assert outputs["method"] == "chi-square" and outputs["detail"]["dof"] == dof
    assert outputs["statistic"] == pytest.approx(chi2, rel=1e-12)
    assert outputs["p_value"] == pytest.approx(p, rel=1e-9)

    pvalues = [p]
    for label, token in (("Heads", "Heads"), ("Tails", "T")):
        a = [top_logprob(r, token) for r in rows_a]
        b = [top_logprob(r, token) for r in rows_b]
        ks = stats.ks_2samp(a, b)
        entry = tests[f"logprob of {label}"]
        assert entry["method"] == "kolmogorov-smirnov"
        assert entry["statistic"] == pytest.approx(ks.statistic, rel=1e-12)
        assert entry["p_value"] == pytest.approx(ks.pvalue, rel=1e-9)
        pvalues.append(ks.pvalue)
    # Holm by hand: sorted p times (m - rank), running maximum, capped at 1
    order = np.argsort(pvalues)
    expected, running = {}, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        expected[i] = running
    names = ["outputs", "logprob of Heads", "logprob of Tails"]
    for i, name in enumerate(names):
        assert tests[name]["p_holm"] == pytest.approx(expected[i], rel=1e-9)
        assert tests[name]["significant"] == (expected[i] < 0.05)

    heads = {o["label"]: o for o in report["outcomes"]}["Heads"]
    ca = sum(r["output"].startswith("Heads") for r in rows_a)
    cb = sum(r["output"].startswith("Heads") for r in rows_b)
    assert (heads["count_a"], heads["count_b"]) == (ca, cb) == (80, 60)
    assert heads["diff"] == pytest.approx(cb / 80 - ca / 80)
    low, high = _newcombe(ca, 80, cb, 80)
    assert (heads["ci_low"], heads["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert heads["ci_high"] < 0  # B has fewer Heads, and the interval says so
    assert report["fingerprints_a"] == {"fp_fake0001": 80} and report["fingerprints_b"] == {"fp_b": 80}

    text = cli("compare", run_a, run_b)
    assert text.exit_code == 4 and "Differ" in text.stdout and "Outcome shares" in text.stdout


def test_same_distribution_does_not_differ(fake_openai, tmp_path):
    fake_openai.configure(states=MIXED)
    run_a = make_run(fake_openai, tmp_path, "--n", "40")
    fake_openai.configure(states=MIXED)
    run_b = make_run(fake_openai, tmp_path, "--n", "40")
    result = cli("compare", run_a, run_b, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["differ"] is False
    assert all(t["p_value"] is not None and not t["significant"] for t in report["tests"])
    heads = report["outcomes"][0]
    assert heads["diff"] == 0 and heads["ci_low"] < 0 < heads["ci_high"]
    assert "No significant difference" in cli("compare", run_a, run_b).stdout


def test_small_two_by_two_uses_fisher_exact(fake_openai, tmp_path):
    fake_openai.configure(states=HEADS_ONLY)
    run_a = make_run(fake_openai, tmp_path, "--n", "12")
    fake_openai.configure(states=MIXED)
    run_b = make_run(fake_openai, tmp_path, "--n", "12")
    result = cli("compare", run_a, run_b, "--json")
    outputs = json.loads(result.stdout)["tests"][0]
    table = _outputs_table(stored_rows(run_a), stored_rows(run_b))
    assert table.shape == (2, 2) and table[:, 1].sum() == 3  # expected Tails count 1.5 < 5
    odds, p = stats.fisher_exact(table)
    assert outputs["method"] == "fisher-exact"
    assert outputs["p_value"] == pytest.approx(p, rel=1e-12)


def test_holm_adjustment_by_hand():
    tests = [StatTest(str(i), "x", 0.0, p) for i, p in enumerate([0.01, 0.04, 0.03, 0.005])]
    holm(tests, 0.05)
    # sorted 0.005, 0.01, 0.03, 0.04 -> 0.02, 0.03, 0.06, 0.06
    assert [t.p_holm for t in tests] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [t.significant for t in tests] == [True, False, False, True]


def test_usage_errors_exit_2(fake_openai, tmp_path):
    fake_openai.configure(states=HEADS_ONLY)
    run_a = make_run(fake_openai, tmp_path, "--n", "4")
    missing = cli("compare", run_a, tmp_path / "nope")
    assert missing.exit_code == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
    bad_alpha = cli("compare", run_a, run_a, "--alpha", "1.5")
    assert bad_alpha.exit_code == 2 and "--alpha" in bad_alpha.stderr


def test_sparse_larger_table_uses_a_permutation_test():
    import pandas as pd

    from detaudit.analysis.compare import outputs_test

    a = pd.Series(["Heads"] * 14 + ["Tails"] * 1 + ["Edge"] * 0)
    b = pd.Series(["Heads"] * 6 + ["Tails"] * 6 + ["Edge"] * 3)
    result = outputs_test(a, b)
    table = np.array([[14, 1, 0], [6, 6, 3]])  # columns in any order give the same statistic
    assert result.method == "chi-square-permutation"
    assert result.statistic == pytest.approx(stats.chi2_contingency(table, correction=False)[0])
    reference = stats.chi2_contingency(
        table, correction=False,
        method=stats.PermutationMethod(n_resamples=20000, rng=np.random.default_rng(1)))
    assert result.p_value == pytest.approx(reference.pvalue, abs=0.01)
    assert outputs_test(a, b).p_value == result.p_value  # seeded: the same p every time
