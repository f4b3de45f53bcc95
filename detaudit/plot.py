"""One picture of what the repeats did: ``detaudit plot RUN -o FILE.png|svg``.

Per tracked token, every distinct probability as a stem whose height is its count,
stacked by system_fingerprint (one colour each), with the clusters shaded and a
log-odds axis on top; for completion probes, a histogram of the positions where
completions first diverge. matplotlib is optional (the ``plot`` extra) and imported
only here, with a ``Figure`` and no pyplot, so no window or global backend is touched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from detaudit.analysis import Analysis, TokenResult
from detaudit.analysis.logit_grid import log_odds_of_pct

FORMATS = (".png", ".svg", ".pdf")
MAX_TOKEN_PANELS = 4
MAX_FINGERPRINTS = 8  # coloured individually; the rest share one colour
PANEL_HEIGHT_IN = 3.0
WIDTH_IN = 9.0
DPI = 120
MIN_SHADE_FRACTION = 0.006  # of the value range, each side of a cluster


class PlotError(ValueError):
    """Nothing to draw, a bad file name, or matplotlib missing; the message says the fix."""


def plot_analysis(analysis: Analysis, path: str | Path, title: str | None = None) -> Path:
    """Draw ``analysis`` into ``path`` (.png, .svg or .pdf) and return the path."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise PlotError(f"{path}: give a file name ending in {', '.join(FORMATS)}, e.g. -o plot.png")
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
    for ax, token in zip(axes, tokens):
        _token_panel(ax, token, _value_counts(tracked, analysis.tokens.index(token), token),
                     analysis.threshold_pct)
    if divergence is not None:
        _divergence_panel(axes[-1], divergence)
    if title:
        fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path)
    except OSError as exc:
        raise PlotError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


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
    if span == 0:  # one value: show it in a window of one percentage point
        span = 1.0
        ax.set_xlim(float(counts["pct"].iloc[0]) - 0.5, float(counts["pct"].iloc[0]) + 0.5)
    pad = MIN_SHADE_FRACTION * span  # a cluster narrower than a pixel still shows
    for r in token.clusters.itertuples():
        ax.axvspan(r.min - pad, r.max + pad, color="0.5", alpha=0.2, linewidth=0)
        ax.annotate(f"{int(r.count):,} in cluster", (r.centre, 0.97), xycoords=("data", "axes fraction"),
                    ha="center", va="top", fontsize=7, color="0.3")
    ax.set_xlabel(f"P({token.label}) %  (shaded: clusters, gap > {threshold_pct:g} pp splits)")
    ax.set_ylabel("samples")
    ax.set_ylim(0, float(bottom.max()) * 1.15 or 1.0)
    ax.ticklabel_format(axis="x", useOffset=True, style="plain")
    ax.set_title(f"{_name(token)}: {token.distinct_logprobs:,} distinct probabilities in "
                 f"{len(token.clusters):,} cluster(s), {token.n - token.missing:,} samples",
                 fontsize=10, loc="left")
    top = ax.secondary_xaxis("top", functions=(_pct_to_log_odds, _log_odds_to_pct))
    top.set_xlabel("log-odds", fontsize=8)
    top.tick_params(labelsize=7)
    ax.legend(title="system_fingerprint", fontsize=7, title_fontsize=7, loc="center left")


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
