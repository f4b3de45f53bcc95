"""One picture of what the repeats did: ``detaudit plot RUN -o FILE.png|svg``.

Per tracked token, every distinct probability as a stem whose height is its count,
stacked by system_fingerprint (one colour each), with the clusters shaded and a
log-odds axis on top; for completion probes, a histogram of the positions where
completions first diverge. matplotlib is optional (the ``plot`` extra) and imported
only here, with a ``Figure`` and no pyplot, so no window or global backend is touched.

No label prints over another: the layout is computed once and frozen, then the cluster
labels and the log-odds ticks are measured by the renderer and set apart
(``detaudit.plot_labels``): cluster labels in rows, the smallest clusters merged into one
"+ K more clusters" label when the rows are full; ticks dropped where they would crowd.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from detaudit.analysis import Analysis, TokenResult
from detaudit.analysis.logit_grid import log_odds_of_pct
from detaudit.plot_labels import GAP_PX, pick_ticks, place_in_rows

FORMATS = (".png", ".svg", ".pdf")
MAX_TOKEN_PANELS = 4
MAX_FINGERPRINTS = 8  # coloured individually; the rest share one colour
PANEL_HEIGHT_IN = 3.0
WIDTH_IN = 9.0
DPI = 120
MIN_SHADE_FRACTION = 0.006  # of the value range, each side of a cluster
LABEL_SIZE = 7  # points: cluster labels and log-odds ticks
MAX_LABEL_ROWS = 3  # rows of cluster labels under a panel's top; then one merged label
HEADROOM = 1.15  # the y axis reaches this far above the highest stem, at least


class PlotError(ValueError):
    """Nothing to draw, a bad file name, or matplotlib missing; the message says the fix."""


def plot_analysis(analysis: Analysis, path: str | Path, title: str | None = None) -> Path:
    """Draw ``analysis`` into ``path`` (.png, .svg or .pdf) and return the path."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise PlotError(f"{path}: give a file name ending in {', '.join(FORMATS)}, e.g. -o plot.png")
    fig = build_figure(analysis, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path)
    except OSError as exc:
        raise PlotError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


def png_bytes(analysis: Analysis, title: str | None = None) -> bytes:
    """The same picture as a PNG in memory (the HTML report embeds it)."""
    import io

    buffer = io.BytesIO()
    build_figure(analysis, title).savefig(buffer, format="png")
    return buffer.getvalue()


def build_figure(analysis: Analysis, title: str | None = None):
    """The matplotlib ``Figure`` of ``analysis``: one panel per tracked token (at most
    four), then the first-divergence histogram of completion probes."""
    Figure = _figure_class()
    tokens = [t for t in analysis.tokens if t.n - t.missing > 0][:MAX_TOKEN_PANELS]
    divergence = analysis.divergence
    panels = len(tokens) + (divergence is not None)
    if panels == 0:
        raise PlotError("nothing to plot: the run has no tracked-token values and no "
                        "completions (did every request fail? see detaudit report)")
    fig = Figure(figsize=(WIDTH_IN, PANEL_HEIGHT_IN * panels + 0.6), layout="constrained", dpi=DPI)
    axes = np.atleast_1d(fig.subplots(panels, 1, squeeze=False)[:, 0])
    tracked = analysis.frames.tracked if analysis.frames is not None else None
    drawn = [(ax, token, _token_panel(ax, token, _value_counts(
        tracked, analysis.tokens.index(token), token), analysis.threshold_pct))
        for ax, token in zip(axes, tokens)]
    if divergence is not None:
        _divergence_panel(axes[-1], divergence)
    if title:
        fig.suptitle(title, fontsize=11)
    renderer = _freeze_layout(fig)
    for ax, token, (top, highest) in drawn:
        _log_odds_ticks(ax, top, renderer)
        _cluster_labels(ax, token, highest, renderer)
    return fig


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("detaudit plot needs matplotlib, which is not installed: "
                        "pip install 'detaudit[plot]'") from None
    return Figure


def _value_counts(tracked: pd.DataFrame | None, slot: int, token: TokenResult) -> pd.DataFrame:
    """Counts per (distinct probability %, fingerprint); without frames, one fingerprint."""
    if tracked is None or tracked.empty:
        values = token.values
        return pd.DataFrame({"pct": values["prob"] * 100.0, "fp": "(all)", "count": values["count"]})
    rows = tracked[(tracked["slot"] == slot) & tracked["logprob"].notna()]
    frame = pd.DataFrame({"bits": rows["logprob"].to_numpy(np.float64).view(np.int64),
                          "fp": rows["system_fingerprint"].fillna("(none)").astype(str).to_numpy()})
    counts = frame.groupby(["bits", "fp"]).size().rename("count").reset_index()
    counts["pct"] = np.exp(counts["bits"].to_numpy(np.int64).view(np.float64)) * 100.0
    return counts[["pct", "fp", "count"]]


def _token_panel(ax, token: TokenResult, counts: pd.DataFrame, threshold_pct: float) -> None:
    colours = _colours()
    totals = counts.groupby("fp")["count"].sum().sort_values(ascending=False)
    shown = list(totals.index[:MAX_FINGERPRINTS])
    counts = counts.assign(fp=counts["fp"].where(counts["fp"].isin(shown), "other"))
    counts = counts.groupby(["pct", "fp"], sort=True)["count"].sum().reset_index()
    bottom = pd.Series(0.0, index=np.unique(counts["pct"]))
    for i, fp in enumerate(shown + (["other"] if len(totals) > len(shown) else [])):
        part = counts[counts["fp"] == fp]
        if part.empty:
            continue
        low = bottom.loc[part["pct"]].to_numpy()
        ax.vlines(part["pct"], low, low + part["count"].to_numpy(), colors=colours[i % len(colours)],
                  linewidth=2.0, label=f"{fp} ({int(totals.get(fp, part['count'].sum())):,})")
        bottom.loc[part["pct"]] += part["count"].to_numpy()
    span = float(counts["pct"].max() - counts["pct"].min())
    if span == 0:  # one value: show it in a window of one percentage point, inside 0-100 %
        span = 1.0
        low = min(max(float(counts["pct"].iloc[0]) - 0.5, 0.0), 99.0)
        ax.set_xlim(low, low + 1.0)
    pad = MIN_SHADE_FRACTION * span  # a cluster narrower than a pixel still shows
    for r in token.clusters.itertuples():
        ax.axvspan(r.min - pad, r.max + pad, color="0.5", alpha=0.2, linewidth=0)
    ax.set_xlabel(f"P({token.label}) %  (shaded: clusters, gap > {threshold_pct:g} pp splits)")
    ax.set_ylabel("samples")
    highest = float(bottom.max()) or 1.0
    ax.set_ylim(0, highest * HEADROOM)
    ax.ticklabel_format(axis="x", useOffset=True, style="plain")
    low, high = ax.get_xlim()  # no probability below 0 % or above 100 %
    ax.set_xlim(max(low, 0.0), min(high, 100.0))
    ax.set_title(f"{_name(token)}: {token.distinct_logprobs:,} distinct probabilities in "
                 f"{len(token.clusters):,} cluster(s), {token.n - token.missing:,} samples",
                 fontsize=10, loc="left")
    top = ax.secondary_xaxis("top", functions=(_pct_to_log_odds, _log_odds_to_pct))
    top.set_xlabel("log-odds", fontsize=8)
    top.tick_params(labelsize=LABEL_SIZE)
    ax.legend(title="system_fingerprint", fontsize=7, title_fontsize=7, loc="center left")
    return top, highest


def _freeze_layout(fig):
    """Lay the figure out once (constrained layout) and keep it: labels placed in pixels
    afterwards stay where they were measured. Returns the Agg renderer that measured."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    return fig.canvas.get_renderer()


def _text_width_height(fig, renderer, text: str, size: float) -> tuple[float, float]:
    from matplotlib.text import Text

    probe = Text(0, 0, text, fontsize=size)
    probe.set_figure(fig)
    box = probe.get_window_extent(renderer)
    return box.width, box.height


def _log_odds_ticks(ax, top, renderer) -> None:
    """Round log-odds ticks, as many as stand apart inside the axis: the axis is not
    linear in log-odds, so evenly spaced ticks would crowd where it is steep."""
    from matplotlib.ticker import MaxNLocator

    lo, hi = (float(v) for v in _pct_to_log_odds(np.array(ax.get_xlim())))
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        return
    values = MaxNLocator(nbins=24, steps=[1, 2, 5, 10]).tick_values(lo, hi)
    values = values[(values >= lo) & (values <= hi)]
    step = float(values[1] - values[0]) if len(values) > 1 else 0.0
    exponent = int(np.floor(np.log10(step) + 1e-9)) if step > 0 else 0
    if len(values) < 2 or step < 1e-12 * max(1.0, abs(lo)):  # below what a label can write
        top.set_xticks([])
        top.set_xlabel(f"log-odds (all {(lo + hi) / 2:.12g})", fontsize=8)
        return
    mantissa = int(round(step / 10.0 ** exponent))  # 1, 2 or 5 (MaxNLocator's steps)
    grid = [int(round(v / step)) for v in values]  # ticks as whole steps from zero
    texts = [_tick_text(k, mantissa, exponent, max(0, -exponent)) for k in grid]
    x = top.transData.transform(np.column_stack([values, np.zeros(len(values))]))[:, 0]
    widths = [_text_width_height(ax.figure, renderer, t, LABEL_SIZE)[0] for t in texts]
    box = ax.get_window_extent(renderer)
    keep = pick_ticks(grid, list(x), widths, box.x0, box.x1)
    decimals = max(0, -exponent)  # then as few as the ticks kept need: 1.00, 1.01, not 1.000
    while decimals > 0 and all(grid[i] * mantissa % 10 ** (-exponent - decimals + 1) == 0
                               for i in keep):
        decimals -= 1
    top.set_xticks([float(values[i]) for i in keep],
                   labels=[_tick_text(grid[i], mantissa, exponent, decimals) for i in keep])


def _tick_text(k: int, mantissa: int, exponent: int, decimals: int) -> str:
    """k grid steps of ``mantissa`` x 10**exponent, with ``decimals`` decimals."""
    value = k * mantissa * 10.0 ** exponent
    return "0" if k == 0 else f"{value:.{decimals}f}".replace("-", "\u2212")


def _cluster_labels(ax, token: TokenResult, highest: float, renderer) -> None:
    """"N in cluster" under the panel's top, the largest clusters first, in rows; the
    clusters no row has room for share one "+ K more clusters (S samples)" label. The
    y axis then grows so that no stem reaches into the rows."""
    fig, box = ax.figure, ax.get_window_extent(renderer)
    clusters = token.clusters.sort_values("count", ascending=False, kind="stable")
    counts = [int(c) for c in clusters["count"]]
    # more than rows x (width / a label's) cannot fit: those are not even measured
    clusters = clusters.head(MAX_LABEL_ROWS * int(box.width // 40) + 1)
    texts = [f"{c:,} in cluster" for c in counts[:len(clusters)]]
    sizes = [_text_width_height(fig, renderer, t, LABEL_SIZE) for t in texts]
    row_height = max((h for _, h in sizes), default=0.0) + GAP_PX / 2
    left, right = box.x0 + GAP_PX, box.x1 - GAP_PX
    rows = MAX_LABEL_ROWS + 1  # the last one for the merged label
    blocked = _legend_spans(ax, renderer, box.y1 - GAP_PX, row_height, rows)
    centres = list(ax.transData.transform(np.column_stack(
        [clusters["centre"].to_numpy(np.float64), np.zeros(len(clusters))]))[:, 0])
    placed = place_in_rows(centres, [w for w, _ in sizes], left, right, MAX_LABEL_ROWS,
                           blocked=blocked)
    labels = [(texts[p.index], p.x0, p.row) for p in placed]
    left_out = sorted(set(range(len(counts))) - {p.index for p in placed})
    if left_out:
        more = len(left_out)
        text = (f"+ {more:,} more cluster{'s' if more > 1 else ''} "
                f"({sum(counts[i] for i in left_out):,} samples)")
        width = _text_width_height(fig, renderer, text, LABEL_SIZE)[0]
        for r, x0, w in [(p.row, p.x0, sizes[p.index][0]) for p in placed]:
            blocked[r].append((x0, x0 + w))
        merged = place_in_rows([right], [width], left, right, rows, blocked=blocked)
        labels += [(text, p.x0, p.row) for p in merged]
    for text, x0, row in labels:
        y = box.y1 - GAP_PX - row * row_height
        ax.text((x0 - box.x0) / box.width, (y - box.y0) / box.height, text, transform=ax.transAxes,
                ha="left", va="top", fontsize=LABEL_SIZE, color="0.3")
    if labels:  # the stems stay below the lowest row
        used = (max(row for _, _, row in labels) + 1) * row_height + 2 * GAP_PX
        free = max(0.2, 1.0 - used / box.height)
        ax.set_ylim(0, max(highest * HEADROOM, highest / free))


def _legend_spans(ax, renderer, top: float, row_height: float, rows: int) -> list[list]:
    """Per label row, the x span the legend holds there (if it reaches that high)."""
    legend = ax.get_legend()
    spans: list[list] = [[] for _ in range(rows)]
    if legend is None:
        return spans
    frame = legend.get_window_extent(renderer)
    for r in range(rows):
        y1 = top - r * row_height
        if frame.y0 < y1 and y1 - row_height < frame.y1:
            spans[r].append((frame.x0, frame.x1))
    return spans


def _divergence_panel(ax, divergence) -> None:
    if divergence.positions:
        positions = sorted(divergence.positions)
        ax.bar(positions, [divergence.positions[p] for p in positions], width=0.8, color="#d62728")
        ax.set_title(f"First divergence from the most common completion: {divergence.diverged:,} "
                     f"of {divergence.completions:,} completions diverged", fontsize=10, loc="left")
    else:
        ax.text(0.5, 0.5, f"no divergence: all {divergence.completions:,} completions share one "
                "token sequence", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("First divergence", fontsize=10, loc="left")
    ax.set_xlabel("token position of the first divergence")
    ax.set_ylabel("completions")


def _pct_to_log_odds(pct):
    return log_odds_of_pct(np.clip(pct, 1e-12, 100 - 1e-10))


def _log_odds_to_pct(x):
    return 100.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _colours() -> list[str]:
    from matplotlib import colormaps

    return [colormaps["tab10"](i) for i in range(10)]


def _name(t: TokenResult) -> str:
    if t.token is None or t.token == t.label:
        return t.label
    return f"{t.label} (token {t.token!r})"
