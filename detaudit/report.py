"""The terminal report: a verdict line, then one compact table per question.

The JSON summary is ``Analysis.to_dict()``; this module only draws. It prints to the
console it is given, so the CLI decides between stdout and stderr.
"""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from detaudit.analysis import Analysis, TokenResult
from detaudit.analysis.logit_grid import log_odds_of_pct

MAX_CLUSTER_ROWS = 12  # per token; the CSV export has them all
MAX_OUTPUT_ROWS = 10
MAX_TEXT = 60
MAX_TOKEN_COLUMNS = 4  # tokens shown side by side in the fingerprint and group tables


def render_report(result: Analysis, console: Console, title: str | None = None,
                  facts: str | None = None) -> None:
    """``facts``: one line under the title on what produced the run (engine, kernels, batches)."""
    if title:
        console.rule(f"[bold]{escape(title)}")
    for part in report_parts(result, facts):
        console.print(part)


def report_parts(result: Analysis, facts: str | None = None) -> list[Text | Table]:
    """What the report shows under its title, in order: lines (``Text``) and tables
    (``Table``, cells in rich markup). The terminal prints them; the HTML report
    (``detaudit.html_report``) writes the same ones as HTML."""
    parts: list[Text | Table] = []
    if facts:
        parts.append(Text(facts, style="dim"))
    if result.text_only:
        parts.append(Text(_TEXT_ONLY[result.logprobs], style="yellow"))
    parts.append(_verdict(result))
    parts.append(_overview(result))
    if result.tokens:
        parts.append(_tokens_table(result))
    if result.outcomes:
        parts.append(_outcomes_table(result))
    for token in result.tokens:
        if len(token.clusters) > 1 or token.distinct_logprobs > 1:
            parts.append(_clusters_table(token, result.threshold_pct))
    if result.ok:
        parts.append(_outputs_table(result))
    if result.errors:
        parts.append(_errors_table(result))
    if result.bad_logprobs["samples"]:
        parts.append(_bad_line(result))
    if len(result.fingerprints) > 1 or any(len(t.by_fingerprint) > 1 for t in result.tokens):
        parts.append(_fingerprints_table(result))
    if result.groups:
        parts.append(_groups_table(result))
    if result.divergence is not None:
        parts.append(_divergence_table(result))
    if result.agreement is not None and result.ok and (
            result.text_only or result.agreement.answer_regex is not None):
        parts.append(_agreement_table(result))
    if result.insight is not None:
        from detaudit.report_insight import insight_parts

        parts.extend(insight_parts(result.insight))
    return parts


def _verdict(result: Analysis) -> Text:
    if result.ok == 0:
        return Text("No successful samples: nothing to measure.", style="bold red")
    if result.deterministic and result.text_only:
        return Text(f"Same text every time: {result.ok:,} successful samples, one output "
                    "(text only: no logprob was compared).", style="bold green")
    d = result.divergence
    if result.deterministic:
        vector = ", one logprob vector" if d is not None else ""
        return Text(f"Deterministic: {result.ok:,} successful samples, one output{vector}, "
                    "one logprob value per tracked token.", style="bold green")
    worst = max(result.tokens, key=lambda t: t.distinct_logprobs, default=None)
    parts = [f"{result.outputs_distinct:,} distinct output(s)"]
    if worst is not None:
        parts.insert(0, f"{worst.distinct_logprobs:,} distinct logprob(s) of "
                        f"{_plain_name(worst)} in {len(worst.clusters):,} cluster(s)")
    if d is not None:
        where = f", first differing at position {d.first_difference}" \
            if d.first_difference is not None else ""
        parts.append(f"{d.distinct_token_sequences:,} token sequence(s) and "
                     f"{d.distinct_logprob_vectors:,} logprob vector(s){where}")
    bad = result.bad_logprobs
    if bad["samples"]:
        parts.insert(0, f"{bad['values']:,} NaN or infinite logprob(s) in "
                        f"{bad['samples']:,} sample(s)")
    return Text(f"Nondeterministic: {', '.join(parts)} over {result.ok:,} successful samples.",
                style="bold yellow")


def _overview(result: Analysis) -> Text:
    text = Text()
    text.append(f"samples {result.n:,}  ok {result.ok:,}  ")
    text.append(f"errors {result.errors:,}", style="red" if result.errors else "")
    text.append(f"  fingerprints {len(result.fingerprints):,}"
                f"  cluster threshold {result.threshold_pct:g} pp")
    return text


def _tokens_table(result: Analysis) -> Table:
    # Narrow enough for 80 columns; the JSON and the clusters table carry min/max.
    # The bad column (NaN or infinite values sent) shows only when there are some.
    bad = any(t.bad for t in result.tokens)
    table = _table("Tracked tokens (dist: bitwise-distinct logprobs; "
                   + ("bad: NaN/inf values; " if bad else "") + "P in %, sd and range in pp)",
                   ["token", "pos", "n", "miss"] + (["bad"] if bad else [])
                   + ["dist", "clust", "mean P", "sd", "range", "logprob"])
    for t in result.tokens:
        table.add_row(_name(t), str(t.position), f"{t.n:,}", f"{t.missing:,}",
                      *([f"[red]{t.bad:,}[/]" if t.bad else "0"] if bad else []),
                      _count(t.distinct_logprobs), f"{len(t.clusters):,}",
                      _pct(t.prob.mean), _pct(t.prob.std), _pct(t.prob.range),
                      "-" if not math.isfinite(t.logprob.mean) else f"{t.logprob.mean:.6f}")
    return table


def _outcomes_table(result: Analysis) -> Table:
    if result.text_only:  # no reported probability to set beside the shares
        table = _table("Outcomes (share of outputs; Wilson 95% CI)",
                       ["outcome", "count", "share %", "95% CI %"])
    else:
        table = _table("Outcomes (share of outputs; Wilson 95% CI) vs the model's reported probability",
                       ["outcome", "count", "share %", "95% CI %", "mean reported P %"])
    for o in result.outcomes:
        row = [escape(o.label), f"{o.count:,}", _pct(o.share), f"{_pct(o.ci_low)} - {_pct(o.ci_high)}"]
        table.add_row(*row, *([] if result.text_only else [_pct(o.mean_reported_prob)]))
    return table


def _agreement_table(result: Analysis) -> Table:
    a = result.agreement
    assert a is not None
    table = _table(f"Agreement of the text (N = {a.n:,})", ["measure", "value"])
    table.add_row("distinct outputs", _count(a.distinct_outputs))
    table.add_row("TARr@N (same raw text)", f"{_pct(a.tar_raw)} %")
    if a.answer_regex is not None:
        table.add_row("TARa@N (same parsed answer)", f"{_pct(a.tar_answer)} % "
                      f"(answer {_short(a.reference_answer)}; {a.n - a.parsed:,} unparsed, "
                      f"{a.distinct_answers:,} distinct)")
    if a.unit is not None:
        table.add_row("most common output", f"{a.reference_count:,} samples, "
                      f"{a.reference_length:,} {a.unit}(s)")
        if a.tokenizer:  # a long path would squeeze the table: its end says enough
            shown = a.tokenizer if len(a.tokenizer) <= 40 else "…" + a.tokenizer[-39:]
            table.add_row("tokenizer", escape(shown))
        table.add_row("diverged from it", f"{a.diverged:,}")
        if a.min_position is not None:
            table.add_row(f"first divergence ({a.unit}): min / median",
                          f"{a.min_position} / {a.median_position:g}")
            hist = ", ".join(f"{p}: {n}" for p, n in sorted(a.positions.items())[:12])
            table.add_row(f"first divergence ({a.unit}): position: count", hist)
    return table


_TEXT_ONLY = {
    "not_requested": "Text only: logprobs were not requested (--no-logprobs, or logprobs = false "
                     "in the probe); outputs and their agreement are compared, no logprob.",
    "not_returned": "Text only: the probe asked for logprobs and the server returned none; "
                    "audit its text with --no-logprobs.",
}


def _clusters_table(t: TokenResult, threshold_pct: float) -> Table:
    table = _table(f"Clusters of P({_name(t)}) (gap > {threshold_pct:g} pp splits)",
                   ["#", "centre %", "log-odds", "min %", "max %", "width", "count", "share %",
                    "values", "fingerprints"])
    ordered = t.clusters.sort_values("count", ascending=False, kind="stable")
    for r in ordered.head(MAX_CLUSTER_ROWS).itertuples():
        table.add_row(str(r.cluster), f"{r.centre:.6f}", _num(float(log_odds_of_pct(r.centre))),
                      f"{r.min:.6f}", f"{r.max:.6f}",
                      f"{r.width:.2e}", f"{r.count:,}", f"{100 * r.share:.2f}",
                      f"{r.distinct_values:,}", _fingerprints(r.fingerprints))
    if len(t.clusters) > MAX_CLUSTER_ROWS:
        table.caption = f"{len(t.clusters) - MAX_CLUSTER_ROWS:,} smaller cluster(s) not shown"
    return table


def _outputs_table(result: Analysis) -> Table:
    table = _table(f"Outputs ({result.outputs_distinct:,} distinct)", ["count", "share %", "output"])
    for text, count in result.outputs_top[:MAX_OUTPUT_ROWS]:
        table.add_row(f"{count:,}", f"{100 * count / result.ok:.2f}", _short(text))
    if result.outputs_distinct > MAX_OUTPUT_ROWS:
        table.caption = f"{result.outputs_distinct - MAX_OUTPUT_ROWS:,} more not shown"
    return table


def _errors_table(result: Analysis) -> Table:
    table = _table("Errors", ["kind", "count"])
    for kind, count in result.errors_by_kind.items():
        table.add_row(escape(kind), f"{count:,}")
    return table


def _bad_line(result: Analysis) -> Text:
    bad = result.bad_logprobs
    return Text(f"Bad values: {bad['values']:,} logprob(s) in {bad['samples']:,} sample(s) came "
                "back as NaN or infinity; they are neither missing nor distinct values, and the "
                "run cannot be called deterministic.", style="red")


def _fingerprints_table(result: Analysis) -> Table:
    columns = ["system_fingerprint", "samples"]
    for t in result.tokens[:MAX_TOKEN_COLUMNS]:
        columns += [f"{_name(t)} distinct", f"{_name(t)} mean P %"]
    table = _table("By system_fingerprint", columns)
    for fp, count in result.fingerprints.items():
        row = [escape(fp), f"{count:,}"]
        for t in result.tokens[:MAX_TOKEN_COLUMNS]:
            entry = t.by_fingerprint.get(fp)
            row += [_count(entry["distinct_logprobs"]), _pct(entry["mean_prob"])] if entry \
                else ["-", "-"]
        table.add_row(*row)
    return table


def _groups_table(result: Analysis) -> Table:
    vectors = result.divergence is not None
    columns = ["group", "n", "errors", "outputs"] + (["vectors", "first diff"] if vectors else [])
    for t in result.tokens[:MAX_TOKEN_COLUMNS]:
        columns += [f"{_name(t)} dist", f"{_name(t)} P %"]
    table = _table("By group (load level / batch size)" if result.text_only else
                   "By group (load level / batch size; dist: distinct logprobs, P: mean"
                   + ("; vectors: distinct logprob vectors" if vectors else "") + ")", columns)
    for g in result.groups:
        row = [escape(g["group"]), f"{g['n']:,}", f"{g['errors']:,}", _count(g["distinct_outputs"])]
        if vectors:
            first = g.get("first_difference")
            row += [_count(g["distinct_logprob_vectors"]), "-" if first is None else str(first)]
        for entry in g["tokens"][:MAX_TOKEN_COLUMNS]:
            row += [_count(entry["distinct_logprobs"]), _pct(entry["mean_prob"])]
        table.add_row(*row)
    return table


def _divergence_table(result: Analysis) -> Table:
    d = result.divergence
    assert d is not None
    table = _table("Completions", ["measure", "value"])
    table.add_row("completions", f"{d.completions:,}")
    table.add_row("unique completions", _count(d.unique_completions))
    table.add_row("distinct token sequences", _count(d.distinct_token_sequences))
    table.add_row("distinct logprob vectors", _count(d.distinct_logprob_vectors))
    if d.first_difference is not None:
        table.add_row("first position where vectors differ", str(d.first_difference))
    table.add_row("most common sequence", f"{d.reference_count:,} samples, "
                  f"{d.reference_length} tokens")
    table.add_row("diverged from it", f"{d.diverged:,}")
    if d.min_position is not None:
        table.add_row("first divergence: min / median", f"{d.min_position} / {d.median_position:g}")
        hist = ", ".join(f"{p}: {n}" for p, n in sorted(d.positions.items())[:12])
        table.add_row("first divergence: position: count", hist)
    if d.logprob_positions:
        hist = ", ".join(f"{p}: {n}" for p, n in sorted(d.logprob_positions.items())[:12])
        table.add_row("same tokens, first logprob difference", hist)
    return table


def _table(title: str, columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, name in enumerate(columns):
        text = i == 0 or name in ("output", "fingerprints")
        # Numbers never wrap (a folded number reads as two); text columns give way.
        table.add_column(name, justify="left" if text else "right", overflow="fold",
                         no_wrap=not text, min_width=min(len(name), 12))
    return table


def _name(t: TokenResult) -> str:
    """Escaped for rich markup: model text is data, not markup."""
    return escape(_plain_name(t))


def _plain_name(t: TokenResult) -> str:
    """The label, with the token when they differ."""
    if t.token is None:
        return f"{t.label} (unresolved)"
    return t.label if t.token == t.label else f"{t.label} {t.token!r}"


def _count(n: int) -> str:
    return f"[green]{n:,}[/]" if n <= 1 else f"[yellow]{n:,}[/]"


def _pct(p: float) -> str:
    return "-" if p is None or not math.isfinite(p) else f"{100 * p:.4f}"


def _num(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.8g}"


def _fingerprints(fps: Any) -> str:
    if not isinstance(fps, dict):
        return ""
    return escape(", ".join(f"{fp} x{n:,}" for fp, n in fps.items()))


def _short(text: str | None) -> str:
    if text is None:
        return "(none)"
    shown = text.replace("\n", "\\n")
    return escape(shown if len(shown) <= MAX_TEXT else shown[:MAX_TEXT - 1] + "…")
