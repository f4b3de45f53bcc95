"""CSV exports read back with pandas; the rich report renders the key numbers."""

import json
import math

import pandas as pd
from rich.console import Console

from detaudit.analysis import analyze, build_frames
from detaudit.export import write_clusters_csv, write_samples_csv
from detaudit.report import render_report


def coin_run(make):
    samples = ([make.coin(i, "Heads", "-0.3", "-1.4", fingerprint="fp_a", group="1")
                for i in range(6)]
               + [make.coin(6, "Heads", "-0.30000001", "-1.4", fingerprint="fp_b", group="4"),
                  make.coin(7, "Tails", "-0.9", None, fingerprint="fp_b", group="4"),
                  make.error(8, "timeout")])
    return samples


def test_clusters_csv_reads_back(make, coin_tracked, tmp_path):
    result = analyze(build_frames(coin_run(make), coin_tracked))
    path = write_clusters_csv(result, tmp_path / "clusters.csv")
    table = pd.read_csv(path)
    assert list(table.columns[:1]) == ["token"]
    for column in ("cluster", "centre", "min", "max", "width", "count", "share",
                   "distinct_values", "fingerprints"):
        assert column in table.columns
    heads = table[table["token"] == "Heads"].sort_values("centre")
    # -0.9 alone; -0.3 and -0.30000001 are 1e-6 pp apart: one cluster of 7
    assert heads["count"].tolist() == [1, 7]
    assert heads["distinct_values"].tolist() == [1, 2]
    assert heads["centre"].iloc[0] == 100 * math.exp(-0.9)
    assert json.loads(heads["fingerprints"].iloc[1]) == {"fp_a": 6, "fp_b": 1}
    assert table[table["token"] == "T"]["count"].tolist() == [7]


def test_samples_csv_reads_back_with_exact_logprobs(make, coin_tracked, tmp_path):
    frames = build_frames(coin_run(make), coin_tracked)
    path = write_samples_csv(analyze(frames), tmp_path / "samples.csv")
    table = pd.read_csv(path, dtype={"Heads.logprob_text": str, "Tails.logprob_text": str})
    assert len(table) == 9
    assert table["status"].tolist() == ["ok"] * 8 + ["error"]
    assert table["error_kind"].iloc[8] == "timeout"
    assert table["Heads.logprob_text"].iloc[6] == "-0.30000001"
    assert table["Heads.logprob"].iloc[6] == -0.30000001
    assert math.isnan(table["Tails.logprob"].iloc[7])  # absent from the top-k
    assert math.isnan(table["Heads.logprob"].iloc[8])  # error: no logprobs
    # the same frames export without an Analysis
    assert pd.read_csv(write_samples_csv(frames, tmp_path / "again.csv")).shape == table.shape


def test_report_shows_the_key_numbers(make, coin_tracked):
    result = analyze(build_frames(coin_run(make), coin_tracked), probe_kind="outcome")
    console = Console(record=True, width=140)
    render_report(result, console, title="coin-flip")
    text = console.export_text()
    assert "coin-flip" in text
    assert "Nondeterministic" in text
    assert "3 distinct logprob(s) of Heads" in text
    assert "errors 1" in text and "timeout" in text
    assert "Clusters of P(Heads)" in text
    assert "fp_a" in text and "fp_b" in text
    assert "By group" in text
    assert f"{100 * 7 / 8:.4f}" in text  # share of outputs that are Heads
    assert "Tails 'T'" in text


def test_report_of_a_deterministic_run_and_of_model_text_with_markup(make):
    samples = [make.coin(i, "[bold]Heads[/bold]", "-0.3") for i in range(3)]
    result = analyze(build_frames(samples, [{"label": "Heads", "token": "Heads", "position": 0}]))
    console = Console(record=True, width=120)
    render_report(result, console)
    text = console.export_text()
    assert "Deterministic: 3 successful samples" in text
    assert "[bold]Heads[/bold]" in text  # shown as text, not as markup


def test_report_of_completions(make):
    samples = [make.text(0, ["a", "b"], [-0.1, -0.2]), make.text(1, ["a", "c"], [-0.1, -0.2]),
               make.text(2, ["a", "b"], [-0.1, -0.2])]
    result = analyze(build_frames(samples, []), probe_kind="greedy-divergence")
    console = Console(record=True, width=120)
    render_report(result, console)
    text = console.export_text()
    assert "unique completions" in text
    assert "first divergence: min / median" in text and "1 / 1" in text
