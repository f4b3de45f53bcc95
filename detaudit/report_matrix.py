"""Terminal tables of ``detaudit matrix``: the verdict table (one row per axis) and the
dry run's request count. Like ``detaudit.report``, it only draws on the console given."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text


def render_matrix(data: dict[str, Any], console: Console) -> None:
    """Axis, levels, bitwise-distinct answers per level, verdict."""
    facts = data["matrix"]
    console.print(f"[bold]Invariance matrix[/]: {escape(facts['probe'])}, {facts['per_level']:,} "
                  f"samples per level on {escape(_where(facts['backend']))}", soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("axis", "levels", "distinct per level", "verdict"):
        table.add_column(name, overflow="fold")
    for axis in data["axes"]:
        levels = axis["levels"]
        table.add_row(escape(axis["axis"]), " vs ".join(escape(v) for v in levels),
                      " vs ".join(_count(axis, v) for v in levels), _verdict(axis))
    console.print(table)
    console.print(Text("distinct: bitwise-distinct answers (tokens, logprob bits, output) per level; "
                       "varies: a level gave an answer its baseline (the first level) never gave",
                       style="dim"))


def _count(axis: dict[str, Any], level: str) -> str:
    """Distinct answers at a level; of them, new (never given at the baseline); errors."""
    text = f"{axis['distinct'][level]:,}"
    notes = []
    if axis["new"].get(level):
        notes.append(f"{axis['new'][level]:,} new")
    if axis["errors"].get(level):
        notes.append(f"{axis['errors'][level]:,} errors")
    return text + (f" ({', '.join(notes)})" if notes else "")


def _verdict(axis: dict[str, Any]) -> str:
    style = {True: "bold red", False: "green", None: "yellow"}[axis["varies"]]
    return f"[{style}]{escape(axis['verdict'])}[/]"


def _where(config: dict[str, Any]) -> str:
    if config.get("backend") == "local":
        return f"local {config.get('model')} ({config.get('kernels')} kernels)"
    return f"{config.get('model')} at {config.get('base_url') or 'the OpenAI API'}"


def render_count(counted: dict[str, Any], console: Console) -> None:
    """What a matrix would send, level by level, and its cost at most."""
    table = Table(title="Dry run: nothing was sent", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for i, name in enumerate(("axis", "level", "requests", "fillers (at most)", "cost USD (at most)")):
        table.add_column(name, justify="left" if i < 2 else "right")
    for row in counted["levels"]:
        table.add_row(escape(row["axis"]), escape(row["level"]), f"{row['requests']:,}",
                      f"{row['filler_requests_max']:,}", _usd(row["cost_usd_max"]))
    table.add_row("[bold]all[/]", "", f"[bold]{counted['requests']:,}", f"[bold]{counted['filler_requests_max']:,}",
                  f"[bold]{_usd(counted['cost_usd_max'])}")
    console.print(table)
    price = counted.get("price_per_million")
    console.print(Text(f"tokenizer: {counted.get('tokenizer')}\nprice: " + (
        f"{price['input']:g} / {price['output']:g} USD per 1M prompt / completion tokens ({price['source']})"
        if price else f"unknown for {counted.get('model')}; give --prices FILE.toml")))


def _usd(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.6g}"
