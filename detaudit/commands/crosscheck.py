"""``detaudit crosscheck``: a stored run's logprobs against a teacher-forced forward pass
of a reference model (the train-versus-inference gap). A thin shell over
``detaudit.api.crosscheck``; ``--max-abs-diff`` makes the exit code a gate (3 beyond)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

from detaudit.commands.run import KernelImpl, Kernels
from detaudit.terminal import print_json

if TYPE_CHECKING:
    from detaudit.api import CrosscheckReport

EXIT_BEYOND = 3  # as `detaudit gate`
POSITIONS_SHOWN = 20  # rows of the per-position table; --json has every position


class EngineKind(str, Enum):
    local = "local"
    transformers = "transformers"


CROSSCHECK_EXAMPLES = """\
[bold]Examples[/]

  detaudit crosscheck results/<run-id> --reference tiny
  detaudit crosscheck results/<run-id> --reference ./my-model --engine transformers --json
  detaudit crosscheck results/<run-id> --reference ./my-model --kernels default --max-abs-diff 1e-3

[bold]Exit codes[/]: 0 ok (within --max-abs-diff); 3 max |Δ logprob| beyond --max-abs-diff;
2 bad input (text-only run, unknown reference, no scorable sample).
"""


def finite_option(value: float | None) -> float | None:
    """--max-abs-diff: a finite number (NaN would pass every run, and JSON has no inf)."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number; give e.g. 1e-3")
    return value


def crosscheck(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. results/<run-id>."),
    reference: str = typer.Option(..., help="The reference model: a Hugging Face folder, or 'tiny' (bundled)."),
    engine: EngineKind = typer.Option(EngineKind.local, case_sensitive=False,
                                      help="local: the bundled engine's prefill (Engine.score); "
                                           "transformers: AutoModelForCausalLM."),
    kernels: Optional[Kernels] = typer.Option(None, case_sensitive=False,
                                              help="--engine local: its ops \\[default: batch-invariant]."),
    kernel_impl: Optional[KernelImpl] = typer.Option(None, case_sensitive=False,
                                                     help="--engine local: how batch-invariant ops run \\[default: auto]."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 \\[default: local: "
                                                   "the model's; transformers: float32]."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda \\[default: cuda when available]."),
    worst: int = typer.Option(10, min=0, help="How many of the largest |Δ logprob| tokens to list."),
    max_abs_diff: Optional[float] = typer.Option(None, min=0.0, callback=finite_option,
                                                 help="Exit 3 when max |Δ logprob| is above this."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """How far a run's logprobs are from a reference forward pass (the train-inference gap).

    Teacher-forces the stored sampled tokens through a reference model and compares its
    logprobs with the server's: bitwise-equal share, max and mean |Δ logprob|, k3
    KL(server || reference), Pearson of the probabilities, per position and worst tokens."""
    from detaudit.api import crosscheck as run_crosscheck

    report = run_crosscheck(run_dir, reference, engine=engine.value,
                            kernels=kernels.value if kernels is not None else None,
                            kernel_impl=kernel_impl.value if kernel_impl is not None else None,
                            dtype=dtype, device=device, worst=worst)
    data = report.to_dict()
    code = 0
    if max_abs_diff is not None:
        beyond = data["max_abs_diff"] > max_abs_diff
        code = EXIT_BEYOND if beyond else 0
        data["gate"] = {"max_abs_diff": max_abs_diff, "passed": not beyond, "exit_code": code}
    if json_out:
        print_json(data)
    else:
        render(report, data.get("gate"))
    raise typer.Exit(code)


def render(report: "CrosscheckReport", gate: dict[str, Any] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    stats, ref, samples = report.stats, report.reference, report.samples
    where = ref["engine"] if ref["engine"] == "transformers" else f"local engine, {ref['kernels']} kernels"
    out.rule(f"crosscheck of {report.run['id']}")
    out.print(f"server: {report.run['backend']}; reference: {ref['model']} ({where}, "
              f"{ref['dtype']} on {ref['device']})", soft_wrap=True)
    out.print(f"{stats.tokens:,} sampled tokens in {samples['scored']:,} of {samples['total']:,} samples "
              f"({samples['distinct_completions']:,} distinct completions, prompt of "
              f"{samples['prompt_tokens']} tokens)")
    from detaudit.reference import SKIP_REASONS

    for reason, count in samples["skipped"].items():
        out.print(f"[yellow]skipped:[/] {count:,} samples, {reason}: {SKIP_REASONS[reason]}", soft_wrap=True)
    for problem in samples["problems"]:
        out.print(f"  {problem}", soft_wrap=True, markup=False, style="dim")
    if stats.non_finite:
        out.print(f"[yellow]note:[/] {stats.non_finite:,} tokens with a non-finite logprob left out")
    pearson = "n/a (a side is constant)" if stats.pearson is None else f"{stats.pearson:.12g}"
    out.print(f"bitwise equal: [bold]{stats.bitwise_equal:.2%}[/] ({stats.bitwise_equal_tokens:,} of "
              f"{stats.tokens:,})   max |Δ logprob| {stats.max_abs_diff:.3g}   mean {stats.mean_abs_diff:.3g}   "
              f"k3 KL {stats.k3_kl:.3g}   Pearson {pearson}", soft_wrap=True)

    table = Table("pos", "tokens", "bitwise", "max |Δ|", "mean |Δ|", "k3 KL", title="per position",
                  title_justify="left")
    for row in stats.by_position[:POSITIONS_SHOWN]:
        table.add_row(str(row.position), f"{row.tokens:,}", f"{row.bitwise_equal:.1%}",
                      f"{row.max_abs_diff:.3g}", f"{row.mean_abs_diff:.3g}", f"{row.k3_kl:.3g}")
    out.print(table)
    if len(stats.by_position) > POSITIONS_SHOWN:
        out.print(f"[dim]{len(stats.by_position) - POSITIONS_SHOWN} more positions: --json has them all[/]")
    if stats.worst:
        worst = Table("sample", "pos", "token", "server logprob", "reference logprob", "|Δ|",
                      title="largest differences", title_justify="left")
        for w in stats.worst:
            worst.add_row(str(w.index), str(w.position), repr(w.token), repr(w.server_logprob),
                          repr(w.reference_logprob), f"{w.abs_diff:.3g}")
        out.print(worst)
    if gate is not None:
        verdict = ("[green]PASS[/]" if gate["passed"] else "[red]FAIL[/]") + \
            f": max |Δ logprob| {stats.max_abs_diff:.3g} vs --max-abs-diff {gate['max_abs_diff']:g}"
        out.print(verdict + ("" if gate["passed"] else f" (exit {EXIT_BEYOND})"))


def register(app: typer.Typer, guard: Callable[[Callable], Callable]) -> None:
    """Add crosscheck to the CLI app, wrapped in its error guard."""
    app.command(epilog=CROSSCHECK_EXAMPLES)(guard(crosscheck))
