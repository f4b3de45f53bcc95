"""The labels of ``detaudit plot`` (and of the HTML report's picture) never print over each
other: every text matplotlib really draws is measured by the renderer that draws it, and
no two boxes may overlap or leave the figure.

The runs are real (the fake OpenAI server, the CLI, the store, the analysis); the
seven-value run is the one of issue 13, whose clusters hold 40, 68, 231 and 21 samples."""

from __future__ import annotations

import io
import math
from itertools import combinations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.figure import Figure
from matplotlib.text import Text

import detaudit
from detaudit.plot import build_figure
from detaudit.plot_labels import GAP_PX, pick_ticks, place_in_rows
from tests.insight.conftest import make_run
from tests.servers.fake_openai import outcome_states


def logprob(pct: float) -> float:
    return math.log(pct / 100.0)


# (P %, count): 7 distinct values in 4 clusters of 40, 68, 231 and 21 samples, two pairs of
# clusters a few hundredths of a point apart on a 0.42-point axis.
SEVEN_VALUES = [(73.10, 40), (73.12, 30), (73.1205, 38), (73.50, 200), (73.502, 20),
                (73.503, 11), (73.52, 21)]
NEAR_CERTAIN = [(99.0, 5), (99.5, 5), (99.9, 5), (99.95, 5), (99.99, 5), (99.995, 5)]
NEAR_IMPOSSIBLE = [(0.4, 7)]  # one value: a 1-point window from 0 % up, log-odds to -27
CROWDED = [(60.0 + 0.03 * i, 1 + i % 5) for i in range(40)]  # 40 clusters side by side
RUNS = {"seven-values": SEVEN_VALUES, "near-certain": NEAR_CERTAIN,
        "near-impossible": NEAR_IMPOSSIBLE, "crowded": CROWDED}


@pytest.fixture(autouse=True)
def headless(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")


def coin_run(fake, out, values):
    states = outcome_states("Heads", [(logprob(p), count) for p, count in values],
                            alternatives={"T": logprob(0.2)})
    fake.configure(states=states, fingerprints=["fp_a", "fp_b"])
    return make_run(fake, out, "--n", str(sum(count for _, count in values)))


def drawn_texts(fig, monkeypatch, axes=None) -> list[tuple[str, object]]:
    """(text, window extent) of every non-empty text the Agg renderer draws into a PNG.
    savefig draws twice (a layout pass, then the picture): each pass starts afresh.
    With ``axes``, only the texts drawn in those axes."""
    drawn = []
    draw, draw_figure = Text.draw, Figure.draw

    def fresh_draw(self, renderer):
        drawn.clear()
        draw_figure(self, renderer)

    def recording_draw(self, renderer):
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip() and axes in (None, self.axes):
            drawn.append((self.get_text(), self.get_window_extent(renderer)))

    monkeypatch.setattr(Text, "draw", recording_draw)
    monkeypatch.setattr(Figure, "draw", fresh_draw)
    fig.savefig(io.BytesIO(), format="png")
    monkeypatch.undo()
    return drawn


def overlapping(drawn) -> list[tuple[str, str]]:
    return [(a, b) for (a, box_a), (b, box_b) in combinations(drawn, 2)
            if box_a.x0 < box_b.x1 and box_b.x0 < box_a.x1
            and box_a.y0 < box_b.y1 and box_b.y0 < box_a.y1]


@pytest.mark.parametrize("name", list(RUNS))
def test_no_two_labels_overlap_and_all_stay_inside_the_figure(name, fake_openai, tmp_path,
                                                              monkeypatch):
    run = coin_run(fake_openai, tmp_path / "results", RUNS[name])
    analysis = detaudit.open_run(run).analysis()
    fig = build_figure(analysis, title=f"{name} x {analysis.n}")
    drawn = drawn_texts(fig, monkeypatch)
    assert overlapping(drawn) == []
    width, height = fig.bbox.width, fig.bbox.height
    outside = [t for t, box in drawn
               if box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > width + 0.5 or box.y1 > height + 0.5]
    assert outside == []
    texts = [t for t, _ in drawn]
    heads = analysis.tokens[0]
    assert f"Heads: {heads.distinct_logprobs:,} distinct probabilities" in " ".join(texts)
    # each panel keeps a readable log-odds axis: two ticks at least
    top_axes = [child for ax in fig.axes for child in ax.child_axes]
    assert len(top_axes) == 2
    for top in top_axes:
        ticks = [label for label in top.get_xticklabels()
                 if label.get_text() and any(label.get_text() == t for t in texts)]
        assert len(ticks) >= 2, name


def test_seven_value_run_labels_every_cluster(fake_openai, tmp_path, monkeypatch):
    """The four clusters of the issue keep their labels, none dropped to make room."""
    run = coin_run(fake_openai, tmp_path / "results", SEVEN_VALUES)
    analysis = detaudit.open_run(run).analysis()
    heads = analysis.tokens[0]
    assert heads.distinct_logprobs == 7
    assert sorted(heads.clusters["count"]) == [21, 40, 68, 231]
    texts = [t for t, _ in drawn_texts(build_figure(analysis), monkeypatch)]
    for count in (40, 68, 231, 21):
        assert texts.count(f"{count} in cluster") == 1, texts


def test_crowded_clusters_merge_labels_rather_than_overprint(fake_openai, tmp_path, monkeypatch):
    """40 clusters cannot all be labelled in one panel: the labels left out are counted in
    one that says so, and every sample is still accounted for."""
    run = coin_run(fake_openai, tmp_path / "results", CROWDED)
    analysis = detaudit.open_run(run).analysis()
    heads = analysis.tokens[0]
    assert len(heads.clusters) == 40
    fig = build_figure(analysis)
    texts = [t for t, _ in drawn_texts(fig, monkeypatch, axes=fig.axes[0])]
    labelled = [int(t.split()[0].replace(",", "")) for t in texts if t.endswith(" in cluster")]
    merged = [t for t in texts if "more cluster" in t]
    assert 0 < len(labelled) < 40 and len(merged) == 1
    # "+ 31 more clusters (62 samples)": the rest of the clusters and of the samples
    words = merged[0].split()
    assert int(words[1]) == 40 - len(labelled)
    assert int(words[4].strip("(")) == heads.n - sum(labelled)


# --- the placement rules alone (detaudit.plot_labels: no matplotlib) -------------------------

spans = st.lists(st.tuples(st.floats(-50, 1050), st.floats(1, 150)), max_size=40)


@given(spans, st.integers(1, 4))
def test_labels_placed_in_rows_never_overlap_and_stay_inside(labels, max_rows):
    centres, widths = [c for c, _ in labels], [w for _, w in labels]
    placed = place_in_rows(centres, widths, 0.0, 1000.0, max_rows)
    assert len({p.index for p in placed}) == len(placed)
    for p in placed:
        assert 0.0 <= p.x0 and p.x0 + widths[p.index] <= 1000.0 and 0 <= p.row < max_rows
    for a, b in combinations(placed, 2):
        if a.row == b.row:
            assert a.x0 + widths[a.index] + GAP_PX <= b.x0 or b.x0 + widths[b.index] + GAP_PX <= a.x0
    # the first label always gets the top row, at its centre when there is room
    if labels and widths[0] <= 1000.0:
        first = next(p for p in placed if p.index == 0)
        assert first.row == 0 and first.x0 == min(max(centres[0] - widths[0] / 2, 0.0),
                                                  1000.0 - widths[0])


@given(st.lists(st.floats(0, 1000), min_size=2, max_size=30, unique=True), st.floats(5, 120))
def test_ticks_picked_stand_apart_inside_the_axis(positions, width):
    positions = sorted(positions)
    steps = list(range(len(positions)))
    kept = pick_ticks(steps, positions, [width] * len(positions), 0.0, 1000.0)
    for i in kept:
        assert positions[i] - width / 2 >= 0.0 and positions[i] + width / 2 <= 1000.0
    for a, b in zip(kept, kept[1:]):
        assert positions[b] - positions[a] >= width + 2 * GAP_PX


def test_evenly_spaced_ticks_are_kept_evenly_when_they_fit():
    positions = [50.0 * k for k in range(1, 20)]  # 19 ticks 50 px apart, labels 60 px wide
    kept = pick_ticks(list(range(1, 20)), positions, [60.0] * 19, 0.0, 1000.0)
    assert [k + 1 for k in kept] == list(range(2, 20, 2))  # every second one
