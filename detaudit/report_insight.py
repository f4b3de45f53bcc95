"""Terminal tables for the insight figures: logit grid, entropy, comparisons, cost plans.

Like ``detaudit.report``, this module only draws on the console it is given.
"""

from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from detaudit.analysis.compare import Comparison
from detaudit.analysis.insight import Insight, TokenGrid
from detaudit.analysis.logit_grid import Grid
from detaudit.cost import CostPlan

MAX_GRID_ROWS = 12
MAX_ENTROPY_ROWS = 10


def render_insight(insight: Insight, console: Console) -> None:
    """The logit-grid table when any value varies, and the entropy table when known."""
    for table in insight_parts(insight):
        console.print(table)


def insight_parts(insight: Insight) -> list[Table]:
    """The tables ``render_insight`` prints (the HTML report writes them too)."""
    varied = [t for t in insight.tokens
              if t.distinct_log_odds > 1 or (t.distinct_gaps or 0) > 1]
    tables = [_grid_table(varied)] if varied else []
    if not insight.entropy.empty:
        tables.append(_entropy_table(insight))
    return tables


def _grid_table(tokens: list[TokenGrid]) -> Table:
    table = _table("Logit grid: log-odds of each token and the top-1 minus top-2 logprob gap "
                   "(a regular grid means quantised logits)",
                   ["token", "pos", "log-odds distinct", "log-odds range", "log-odds grid",
                    "gap distinct", "gap range", "gap grid"])
    for t in tokens[:MAX_GRID_ROWS]:
        gap = t.gap
        table.add_row(escape(t.label), str(t.position), f"{t.distinct_log_odds:,}",
                      _range(t.log_odds.min, t.log_odds.max), _grid(t.log_odds_grid),
                      "-" if t.distinct_gaps is None else f"{t.distinct_gaps:,}",
                      "-" if gap is None else _range(gap.min, gap.max), _grid(t.gap_grid))
    if len(tokens) > MAX_GRID_ROWS:
        table.caption = f"{len(tokens) - MAX_GRID_ROWS:,} more token(s) in --json"
    return table


def _entropy_table(insight: Insight) -> Table:
    rows = insight.entropy.sort_values("mean_bits", ascending=False, kind="stable")
    table = _table("Entropy of the top-k distribution (bits; leftover = 1 - sum of top-k P)",
                   ["pos", "k", "n", "mean bits", "min", "max", "distinct", "mean leftover",
                    "max leftover"])
    for r in rows.head(MAX_ENTROPY_ROWS).itertuples():
        table.add_row(str(r.position), str(r.k), f"{r.n:,}", f"{r.mean_bits:.4f}",
                      f"{r.min_bits:.4f}", f"{r.max_bits:.4f}", f"{r.distinct_bits:,}",
                      f"{r.mean_leftover:.3e}", f"{r.max_leftover:.3e}")
    if len(rows) > MAX_ENTROPY_ROWS:
        table.caption = (f"the {MAX_ENTROPY_ROWS} highest-entropy positions of {len(rows):,}; "
                         "all in --json")
    return table


def render_comparison(result: Comparison, console: Console, name_a: str, name_b: str) -> None:
    if result.differ:
        console.print(Text(f"Differ: at least one test rejects 'same distribution' at "
                           f"alpha {result.alpha:g} (Holm-corrected).", style="bold yellow"))
    else:
        console.print(Text(f"No significant difference at alpha {result.alpha:g} "
                           "(Holm-corrected).", style="bold green"))
    console.print(Text(f"A: {name_a}  ({result.n_a:,} ok)\nB: {name_b}  ({result.n_b:,} ok)"))
    table = _table("Tests", ["test", "method", "statistic", "p", "p (Holm)", "differ"])
    for t in result.tests:
        table.add_row(escape(t.name), t.method, _num(t.statistic), _p(t.p_value), _p(t.p_holm),
                      "[yellow]yes[/]" if t.significant else "no")
    console.print(table)
    if result.outcomes:
        table = _table("Outcome shares, B - A (Newcombe 95% CI)",
                       ["outcome", "A %", "B %", "B - A pp", "95% CI pp"])
        for o in result.outcomes:
            table.add_row(escape(o.label), _pct(o.share_a), _pct(o.share_b), _pct(o.diff),
                          f"{_pct(o.ci_low)} .. {_pct(o.ci_high)}")
        console.print(table)
    fps = _table("system_fingerprint", ["run", "fingerprints"])
    for name, counts in (("A", result.fingerprints_a), ("B", result.fingerprints_b)):
        fps.add_row(name, escape(", ".join(f"{fp} x{n:,}" for fp, n in counts.items()) or "-"))
    console.print(fps)
    for side, names in (("A", result.only_in_a), ("B", result.only_in_b)):
        if names:
            console.print(f"tracked only in {side}: {escape(', '.join(names))}")


def render_plan(plan: CostPlan, console: Console) -> None:
    approx = " (approximate: tiktoken does not know this model)" if plan.approximate else ""
    table = _table("Dry run: nothing was sent", ["", "per request", f"x {plan.requests:,}"])
    table.add_row("prompt tokens", _int(plan.prompt_tokens), _times(plan.prompt_tokens, plan.requests))
    table.add_row("completion tokens (at most)", _int(plan.completion_tokens),
                  _times(plan.completion_tokens, plan.requests))
    each, total = plan.per_request_usd, plan.total_usd
    if plan.fillers:  # a load sweep's filler requests: counted at the largest filler
        table.add_row(f"filler requests (at most {plan.fillers:,})", "", "")
        table.add_row("  filler prompt tokens (at most)", _int(plan.filler_prompt_tokens),
                      _times(plan.filler_prompt_tokens, plan.fillers))
        table.add_row("  filler completion tokens (at most)", _int(plan.filler_completion_tokens),
                      _times(plan.filler_completion_tokens, plan.fillers))
        table.add_row("  filler cost USD (at most)", _usd(plan.per_filler_usd),
                      _usd(None if plan.per_filler_usd is None else plan.per_filler_usd * plan.fillers))
    table.add_row("cost USD (at most)", _usd(each),
                  _usd(total) + (f" ({plan.total_requests:,} requests)" if plan.fillers else ""))
    console.print(table)
    price = plan.price
    console.print(Text(f"tokenizer: {plan.tokenizer}{approx}\nprice: " + (
        f"{price.input:g} / {price.output:g} USD per 1M prompt / completion tokens ({price.source})"
        if price else f"unknown for {plan.model}; give --prices FILE.toml")))


def _table(title: str, columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right", overflow="fold")
    return table


def _grid(grid: Grid | None) -> str:
    if grid is None:
        return "none"
    power = f" = 2^{grid.step_log2}" if grid.step_log2 is not None else ""
    return f"step {grid.step:.6g}{power} ({grid.occupied}/{grid.points} points)"


def _range(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "-" if math.isnan(low) else f"{low:.6g} .. {high:.6g}"
    return f"{low:.6g} .. {high:.6g}"


def _num(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4g}"


def _p(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _pct(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.3f}"


def _int(x: int | None) -> str:
    return "unknown" if x is None else f"{x:,}"


def _times(x: int | None, n: int) -> str:
    return "unknown" if x is None else f"{x * n:,}"


def _usd(x: float | None) -> str:
    return "unknown" if x is None else f"${x:,.6f}" if x < 0.01 else f"${x:,.4f}"
