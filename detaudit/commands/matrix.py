"""``detaudit matrix``: the target request along each axis the client controls, each
level against its baseline, one verdict per axis.

A shell over ``detaudit.matrix_session``: flags in; the verdict table (or ``--json``:
the matrix summary, as stored in ``matrix.json``) and the matrix folder out. Exit
codes: 0 every axis has a verdict (whether or not it varies), 1 an axis run failed or
a level got no successful sample, 2 usage error, 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

import typer

from detaudit.axes import AXES, DEFAULT_NONCE
from detaudit.backends.base import DEFAULT_REQUEST_TIMEOUT_S
from detaudit.commands.run import Api, BackendKind, KernelImpl, Kernels, command_line
from detaudit.defaults import DEFAULT_PROBE, MAX_LEVEL
from detaudit.probes import builtin_names
from detaudit.terminal import print_json, stderr

MATRIX_EXAMPLES = f"""\
[bold]Examples[/]

  detaudit matrix                                   [dim]# bundled engine, in process[/]
  detaudit matrix --kernels default --level batch-size=2
  detaudit matrix --model tiny --base-url http://127.0.0.1:8000/v1 --axes load,cache,n
  detaudit matrix --model gpt-4o-mini --n 10 --axes max-tokens,top-logprobs --dry-run

[bold]Axes[/] (baseline vs default level): {'; '.join(f'{a.name} ({a.baseline} vs {a.default})' for a in AXES.values())}
"""


def matrix(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(
        None, help="Model name (remote) or local model folder; 'tiny' or none: the bundled engine in process."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1."),
    probe: Optional[str] = typer.Option(
        None, help=f"The target: a built-in probe ({', '.join(builtin_names())}) or a .toml file \\[default: {DEFAULT_PROBE}]."),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="Samples per level \\[default: 20]."),
    axes: Optional[str] = typer.Option(None, help=f"Axes to measure, comma-separated ({', '.join(AXES)}) \\[default: every one that applies]."),
    level: Optional[List[str]] = typer.Option(None, "--level", metavar="AXIS=VALUE",
                                              help="The non-baseline level of an axis, e.g. load=8, n=2, batch-size=2, prefill-chunk=4 (repeatable)."),
    nonce: str = typer.Option(DEFAULT_NONCE, help="cache axis: text put before the first message of each variant; {i}: the variant, {run}: this matrix's random id."),
    api: Optional[Api] = typer.Option(None, case_sensitive=False, help="Endpoint: chat completions or legacy completions \\[default: the probe's]."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the API key (the key itself is never stored)."),
    backend: Optional[BackendKind] = typer.Option(None, case_sensitive=False, help="Where requests go \\[default: local without --model, else openai]."),
    kernels: Optional[Kernels] = typer.Option(None, case_sensitive=False, help="Local engine kernels \\[default: batch-invariant]."),
    kernel_impl: Optional[KernelImpl] = typer.Option(None, case_sensitive=False, help="Local engine: how batch-invariant kernels run \\[default: auto]."),
    prompt: Optional[str] = typer.Option(None, help="Replace the probe's prompt (one user message for chat)."),
    max_level: int = typer.Option(MAX_LEVEL, min=0, help="Cap on the load level and batch sizes."),
    out: Optional[Path] = typer.Option(None, help="Folder that receives the matrix folder \\[default: results]."),
    max_attempts: int = typer.Option(5, min=1, help="Tries per request before it is stored as an error."),
    request_timeout: Optional[float] = typer.Option(None, min=0.001, help=f"Seconds one attempt may take in all \\[default: {DEFAULT_REQUEST_TIMEOUT_S:g}].", metavar="SECONDS"),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (the matrix summary) on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the requests per axis and level (warm-ups and fillers included) and their estimated cost; send nothing."),
    max_cost: Optional[float] = typer.Option(None, min=0.0, help="Budget in USD: refuse to start when the estimate (at max_tokens per request) exceeds it."),
    prices: Optional[Path] = typer.Option(None, help="TOML price table (USD per 1M tokens) that overrides the built-in prices.", metavar="FILE"),
) -> None:
    """Measure one request along each axis the client controls (load, cache, max-tokens, ...): does it move the logprobs or the outputs?

    Each axis is a stored run (results/matrix-<id>/<axis>/, one group per level) that detaudit report reads; the table (or --json) says per axis how many bitwise-distinct answers each level gave, and whether a level gave one its baseline never did.
    """
    from rich.console import Console

    from detaudit import matrix_session, session
    from detaudit.cost import PriceError
    from detaudit.report_matrix import render_count, render_matrix
    from detaudit.terminal import fail

    api, backend, kernels, kernel_impl = (e.value if e is not None else None
                                          for e in (api, backend, kernels, kernel_impl))
    session.check_request_timeout(request_timeout)
    plan = matrix_session.prepare(probe or DEFAULT_PROBE, model=model, base_url=base_url, n=n,
                                  axes=axes, levels=level, nonce=nonce, api=api,
                                  api_key_env=api_key_env, backend=backend, kernels=kernels,
                                  kernel_impl=kernel_impl, prompt=prompt, max_level=max_level)
    root = out or Path("results")
    session.check_out(root)
    if dry_run or max_cost is not None:
        try:
            counted = matrix_session.count(plan, prices)
        except PriceError as exc:
            fail(str(exc), 2)
        if dry_run:
            data = counted.to_dict()
            return print_json(data) if json_out else render_count(data, Console(highlight=False))
        matrix_session.check_budget(counted, max_cost)
    progress = stderr if not quiet and stderr.is_terminal else None
    folder, data = matrix_session.execute(
        plan, root, timeout=request_timeout or DEFAULT_REQUEST_TIMEOUT_S, max_attempts=max_attempts,
        progress=progress, command=command_line(ctx), quiet=quiet)
    if json_out:
        print_json(data)
    else:
        render_matrix(data, Console(highlight=False))
        typer.echo(f"Matrix folder: {folder}")
    code = matrix_session.exit_code(data)
    if code:
        empty = [a["axis"] for a in data["axes"] if a["varies"] is None]
        fail(f"no verdict for {', '.join(empty)}: a level got no successful sample; see "
             f"detaudit report {folder}/{empty[0]}", code)


def register(app: typer.Typer, guard: Callable[[Callable], Callable]) -> None:
    """Add matrix to the CLI app, wrapped in its error guard."""
    app.command(epilog=MATRIX_EXAMPLES)(guard(matrix))
