"""The terminal report of ``compare NEW --baseline A B ...``: the verdict, one row per
statistic (NEW's distance beside the baseline's noise floor), and the fingerprints.

Like ``detaudit.report``, this module only draws on the console it is given.
"""

from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from detaudit.analysis.drift import Drift


def render_drift(result: Drift, console: Console, new: str, baseline: list[str]) -> None:
    k = len(baseline)
    if result.differs:
        console.print(Text(f"Differs: NEW moved beyond the noise floor of its {k} baseline runs "
                           f"at alpha {result.alpha:g} (Holm-corrected).", style="bold yellow"))
    else:
        console.print(Text(f"No drift beyond the noise floor of {k} baseline runs at alpha "
                           f"{result.alpha:g} (Holm-corrected).", style="bold green"))
    lines = [f"NEW:      {new}  ({result.n_new:,} ok)"]
    lines += [f"baseline: {path}  ({n:,} ok)" for path, n in zip(baseline, result.n_baseline)]
    console.print(Text("\n".join(lines)))
    verdicts = _table("NEW against the noise floor (bound: the distance NEW must exceed for "
                      "p runs < alpha, before Holm)", ["statistic", "NEW", "bound", "p runs",
                                                "p samples", "p (Holm)", "differs"])
    floors = _table("The noise floor, from the baseline runs alone", [
        "statistic", "distance", "apart", "runs", "noise", "floor"], text_columns=2)
    for t in result.tests:
        f = t.floor
        if f is None:
            verdicts.add_row(escape(t.name), "-", "-", "-", "-", "-",
                             f"not tested: {escape(t.reason or '')}")
            continue
        verdicts.add_row(escape(t.name), _num(t.new_distance), _num(f.bound),
                         _p(t.p_runs), _p(t.p_samples), _p(t.p_holm),
                         "[yellow]yes[/]" if t.differs else "no")
        floors.add_row(escape(t.name), t.distance,
                       f"{_num(min(f.leave_one_out))} .. {_num(max(f.leave_one_out))}",
                       _num(f.between_runs), _num(f.sampling_noise), _num(f.distance))
    console.print(verdicts)
    floors.caption = (f"apart: each baseline run's distance from the other baseline runs (least "
                      f".. most); runs: their spread beyond sampling noise; noise: what sampling "
                      f"alone gives at NEW's size; floor = sqrt(runs^2 (1 + 1/k) + noise^2); "
                      f"bound = floor x t_{k - 1}(1 - alpha/2)"
                      + (f" = floor x {result.tests[0].floor.multiplier:.3g}"
                         if result.tests and result.tests[0].floor else ""))
    floors.caption_justify = "left"
    console.print(floors)
    fps = _table("system_fingerprint", ["run", "fingerprints"], text_columns=2)
    for name, counts in [("NEW", result.fingerprints_new),
                         *((f"baseline {i + 1}", c) for i, c in enumerate(result.fingerprints_baseline))]:
        fps.add_row(name, escape(", ".join(f"{fp} x{n:,}" for fp, n in counts.items()) or "-"))
    console.print(fps)


def _table(title: str, columns: list[str], text_columns: int = 1) -> Table:
    """Text columns first (they fold), then numbers (never cut)."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i < text_columns else "right",
                         overflow="fold", no_wrap=i >= text_columns)
    return table


def _num(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _p(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"
