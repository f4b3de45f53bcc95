"""``detaudit run``: send a probe N times, or finish a stored run (``--resume``).

A shell over ``detaudit.session``: it turns flags into the session's arguments, prints
progress, the report (or ``--json``: exactly ``session.summary``) and the run folder, and
picks the exit code: 0 ok, 1 the run failed, 2 usage error, 130 Ctrl-C, 143 SIGTERM.
The session layer (asyncio, the runner, the store) is imported when a run starts, so
``detaudit --help`` does not pay for it.
"""

from __future__ import annotations

import shlex
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

from detaudit.backends.base import DEFAULT_REQUEST_TIMEOUT_S
from detaudit.commands import insight
from detaudit.commands.app import EXIT_INTERRUPTED, EXIT_TERMINATED, interrupt_code
from detaudit.commands.report import print_notes, render
from detaudit.defaults import (DEFAULT_BATCH_SIZES, DEFAULT_PROBE, DEFAULT_THRESHOLD_PCT,
                               KERNEL_IMPLS, KERNEL_MODES, MAX_LEVEL)
from detaudit.probes import builtin_names
from detaudit.redact import redact
from detaudit.terminal import print_json, stderr, threshold_option
from detaudit.urls import without_userinfo

if TYPE_CHECKING:
    from detaudit.budget import RequestPlan
    from detaudit.probes import Probe
    from detaudit.store import RunStore


class Api(str, Enum):
    chat = "chat"
    completions = "completions"


class BackendKind(str, Enum):
    openai = "openai"
    local = "local"


# typer's choices, from the one list of kernel names (local_backend.kernel_names)
Kernels = Enum("Kernels", {name.replace("-", "_"): name for name in KERNEL_MODES}, type=str)
KernelImpl = Enum("KernelImpl", {name.replace("-", "_"): name for name in KERNEL_IMPLS}, type=str)

RUN_EXAMPLES = """\
[bold]Examples[/]

  detaudit run                           [dim]# bundled local engine, no key[/]
  detaudit run --model gpt-4o --n 10000  [dim]# key in $OPENAI_API_KEY[/]
  detaudit run --model qwen --base-url http://localhost:8000/v1
  detaudit run --model /models/qwen --base-url http://localhost:8000/v1 --no-logprobs  [dim]# text only[/]
  detaudit run --probe my-probe.toml --model gpt-4o-mini --json
  detaudit run --resume results/<run-id>
"""

# Flags that define what is measured: a resumed run takes them from its manifest.
_MEASUREMENT_FLAGS = ("model", "n", "probe", "base_url", "api", "backend", "kernels",
                      "batch_sizes", "kernel_impl", "levels", "prompt", "max_tokens", "temperature", "seed",
                      "top_logprobs", "stream", "out")


def run(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(
        None, help="Model name (remote) or local model folder; 'tiny' or none: the bundled engine."),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="How many times to send the request \\[default: the probe's]."),
    probe: Optional[str] = typer.Option(
        None, help=f"Built-in probe ({', '.join(builtin_names())}) or a .toml file \\[default: {DEFAULT_PROBE}]."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1."),
    api: Optional[Api] = typer.Option(None, case_sensitive=False,
                                      help="Endpoint: chat completions or legacy completions \\[default: the probe's]."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the API key (the key itself is never stored)."),
    backend: Optional[BackendKind] = typer.Option(None, case_sensitive=False,
                                          help="Where requests go \\[default: local without --model, else openai]."),
    kernels: Optional[Kernels] = typer.Option(None, case_sensitive=False,
                                          help="Local engine kernels \\[default: batch-invariant]."),
    kernel_impl: Optional[KernelImpl] = typer.Option(
        None, case_sensitive=False,
        help="Local engine: how batch-invariant kernels run: triton (GPU; the interpreter on a CPU) or "
             "cpu-exact (exact-order torch ops) \\[default: auto: triton on a GPU, cpu-exact on a CPU]."),
    batch_sizes: Optional[str] = typer.Option(None, help="Local engine: batch sizes the repeats cycle through "
                                                     f"\\[default: {','.join(map(str, DEFAULT_BATCH_SIZES))}]."),
    levels: Optional[str] = typer.Option(None, help="load-sweep: requests in flight beside the target, e.g. 0,1,4,16 \\[default: the probe's]; --n is then per level."),
    max_level: int = typer.Option(MAX_LEVEL, min=0, help="Cap on --levels and on a local --batch-sizes (batch B = level B-1): requests in flight beside the target."),
    concurrency: Optional[int] = typer.Option(None, min=1, help="Requests in flight \\[default: the probe's]."),
    prompt: Optional[str] = typer.Option(None, help="Replace the probe's prompt (one user message for chat)."),
    max_tokens: Optional[int] = typer.Option(None, min=1, help="Override the probe's max_tokens."),
    temperature: Optional[float] = typer.Option(None, min=0.0, max=2.0, help="Override the probe's temperature."),
    seed: Optional[int] = typer.Option(None, help="Override the probe's seed."),
    top_logprobs: Optional[int] = typer.Option(None, min=0, max=20, help="Override how many top logprobs to ask for (0-20)."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="Endpoints: ask for server-sent events (logprobs assembled chunk by chunk, the chunks stored) or a whole answer \\[default: the probe's]."),
    no_logprobs: bool = typer.Option(False, "--no-logprobs", help="Text-only audit, for servers without logprobs: ask for none; report distinct outputs, agreement rates (TARr@N, TARa@N) and first divergence."),
    threshold_pct: float = typer.Option(DEFAULT_THRESHOLD_PCT, min=0.0, callback=threshold_option, help="Cluster gap, in percentage points of probability."),
    out: Optional[Path] = typer.Option(None, help="Folder that receives the run folder \\[default: results]."),
    resume: Optional[Path] = typer.Option(None, help="Finish an interrupted run: results/<run-id>.", metavar="RUN_DIR"),
    max_attempts: int = typer.Option(5, min=1, help="Tries per request before it is stored as an error."),
    request_timeout: Optional[float] = typer.Option(None, min=0.001, help=f"Seconds one attempt may take in all (connect, send, every read); a timeout is retried \\[default: {DEFAULT_REQUEST_TIMEOUT_S:g}, or the run's on --resume].", metavar="SECONDS"),
    max_errors: Optional[str] = typer.Option(None, help="Stop early once more samples than this fail: a count (20) or a fraction of n (0.05); the run stays resumable.", metavar="N|FRACTION"),
    rpm: Optional[float] = typer.Option(None, min=0.001, help="Client-side limit: requests per minute (retries count)."),
    tpm: Optional[float] = typer.Option(None, min=1, help="Client-side limit: tokens per minute (prompt + max_tokens per request, counted with the model's tokenizer)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (run facts + summary) on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the request, its prompt and completion tokens and the estimated cost; send nothing."),
    max_cost: Optional[float] = typer.Option(None, min=0.0, help="Budget in USD: stop before the estimated spend (at max_tokens per request) would exceed it."),
    prices: Optional[Path] = typer.Option(None, help="TOML price table (USD per 1M tokens) that overrides the built-in prices.", metavar="FILE"),
) -> None:
    """Send a probe N times, store every answer, and report the distinct logprobs and outputs.

    The report goes to stdout (with --json: one JSON object); progress and logs go to stderr.

    Every sample lands in results/<run-id>/ as it arrives, so an interrupted run can be finished with --resume.
    """
    import asyncio

    from detaudit import budget, session
    from detaudit import load as load_sweep
    from detaudit.runner import RunFailed
    from detaudit.session import Terminated, UsageProblem
    from detaudit.store import utc_now

    api, backend, kernels, kernel_impl = (e.value if e is not None else None
                                          for e in (api, backend, kernels, kernel_impl))
    session.check_api_key_env(api_key_env)
    error_limit = session.parse_max_errors(max_errors)
    session.check_request_timeout(request_timeout)
    if resume is not None:
        given = [f"--{name.replace('_', '-')}" for name in _MEASUREMENT_FLAGS
                 if ctx.params.get(name) is not None] + (["--no-logprobs"] if no_logprobs else [])
        if given:
            raise UsageProblem(f"--resume takes the probe, model, n and backend from the run's "
                               f"manifest; drop {', '.join(given)}")
        store, probe_obj, backend_obj, n, timeout = session.reopen(resume, api_key_env, request_timeout,
                                                                   lock=not dry_run)
        config = store.manifest["backend_config"]
        plan = budget.plan_requests(probe_obj, config, n, store)  # what finishing would send
        if dry_run:
            cost = insight.cost_plan(probe_obj, config, plan.targets, prices, plan.fillers)
            store.close()
            asyncio.run(backend_obj.aclose())
            return insight.dry_run(cost, probe_obj.request, json_out)
        session_n, sending = _within_budget(store, probe_obj, config, n, plan, max_cost, prices)
        if probe_obj.kind == "load-sweep":
            backend_obj = load_sweep.wrap(backend_obj, probe_obj, n, sending.filler_caps)
        run_concurrency = concurrency or store.manifest["concurrency"]
        limits = session.rate_limits(probe_obj, config, rpm, tpm)
        store.update_manifest(resumed_at=store.manifest.get("resumed_at", []) + [utc_now()],
                              concurrency=run_concurrency,
                              limits=session.limits_record(limits, max_attempts, max_errors, timeout))
    else:
        prepared = session.prepare(
            probe or DEFAULT_PROBE, model=model, base_url=base_url, n=n, api=api,
            api_key_env=api_key_env, backend=backend, kernels=kernels, kernel_impl=kernel_impl,
            batch_sizes=batch_sizes, levels=levels, max_level=max_level, prompt=prompt,
            max_tokens=max_tokens, temperature=temperature, seed=seed, top_logprobs=top_logprobs,
            no_logprobs=no_logprobs, stream=stream)
        probe_obj, config, n = prepared.probe, prepared.config, prepared.n
        root = out or Path("results")
        session.check_out(root)
        # before a backend or a run folder exists: what will be sent, and what fits
        plan = budget.plan_requests(probe_obj, config, n)
        if dry_run:
            cost = insight.cost_plan(probe_obj, config, plan.targets, prices, plan.fillers)
            return insight.dry_run(cost, probe_obj.request, json_out)
        session_n, sending = _within_budget(None, probe_obj, config, n, plan, max_cost, prices)
        timeout = request_timeout or DEFAULT_REQUEST_TIMEOUT_S
        limits = session.rate_limits(probe_obj, config, rpm, tpm)
        store, backend_obj, run_concurrency = session.start(
            prepared, root, concurrency=concurrency, timeout=timeout, max_attempts=max_attempts,
            max_errors=max_errors, limits=limits, command=command_line(ctx),
            filler_caps=sending.filler_caps)

    if not quiet:
        fillers = f" (+ at most {sending.fillers:,} filler requests)" if sending.fillers else ""
        stderr.print(f"[bold]{store.manifest['run_id']}[/]: {probe_obj.name} x {n:,}{fillers} -> "
                     f"{session.backend_name(store.manifest)}, concurrency {run_concurrency}",
                     highlight=False, soft_wrap=True)
    progress = stderr if not quiet and stderr.is_terminal else None
    try:
        result = session.execute(probe_obj, backend_obj, store, n, run_concurrency, max_attempts,
                                 progress, limits, error_limit, session_n=session_n)
    except (KeyboardInterrupt, Terminated) as exc:
        _interrupted(store, n, threshold_pct, json_out, interrupt_code(exc))

    if not quiet:
        rate = f"{result.sent / result.elapsed_s:,.0f} req/s" if result.elapsed_s > 0 else "-"
        stderr.print(f"{result.sent:,} samples in {result.elapsed_s:.1f} s ({rate}); "
                     f"{result.ok:,} of {n:,} ok, {result.errors:,} errors", highlight=False)
        if result.errors and result.status == "complete":
            stderr.print(f"[yellow]note:[/] {result.errors:,} samples failed after {max_attempts} "
                         f"attempts; detaudit run --resume {store.path} retries them", highlight=False)
    stopped_by_budget = session_n < n and result.status == "complete"
    if stopped_by_budget:
        store.update_manifest(status="interrupted", stopped_by="max-cost")
    analysis = session.analyze_store(store, threshold_pct)
    data = session.summary(store, threshold_pct, result, analysis)
    store.close()
    if json_out:
        print_json(data)
    else:
        if analysis.ok:
            render(analysis, store.manifest)
        print_notes(data["run"]["notes"])
        typer.echo(f"Run folder: {store.path}")
    if session.logprobs_not_returned(analysis):  # a resume would ask for logprobs again
        raise RunFailed(f"{result.reason}\nAudit this server's text with a new run:\n  "
                        f"{_text_only_command(store.manifest.get('command'))}")
    if result.status == "failed":
        raise RunFailed(f"{result.reason}. Fix it, then finish the run with: "
                        f"detaudit run --resume {store.path}")
    if result.ok == 0:
        raise RunFailed(f"no request succeeded ({result.errors:,} errors); see "
                        f"detaudit report {store.path}")
    if stopped_by_budget:
        raise RunFailed(f"stopped by --max-cost {max_cost:g} USD after {result.ok + result.errors:,} "
                        f"of {n:,} samples; finish with: detaudit run --resume {store.path} "
                        "--max-cost USD")


def _text_only_command(command: list[str] | None) -> str:
    """The run's command as a text-only run: --no-logprobs added, --top-logprobs dropped."""
    words, kept = list(command or ["detaudit", "run"]), []
    while words:
        word = words.pop(0)
        if word == "--top-logprobs":
            words = words[1:]
        elif word != "--no-logprobs":
            kept.append(word)
    return shlex.join(kept + ["--no-logprobs"])


def _within_budget(store: "RunStore | None", probe: "Probe", config: dict[str, Any], n: int,
                   plan: "RequestPlan", max_cost: float | None,
                   prices: Path | None) -> "tuple[int, RequestPlan]":
    """The n to give the runner, and what it will send, so that at most the affordable
    missing indices (each with its fillers) are sent; exit 2 when not one fits."""
    if max_cost is None:
        return n, plan
    cost = insight.cost_plan(probe, config, plan.targets, prices, plan.fillers)
    end, sending = insight.affordable(cost, plan, max_cost, store)
    if sending.total < plan.total:
        fillers = f" and {sending.fillers:,} of {plan.fillers:,} filler requests" if plan.fillers else ""
        stderr.print(f"[yellow]--max-cost {max_cost:g} USD[/]: sending {sending.targets:,} of the "
                     f"{plan.targets:,} requests left{fillers} (at most "
                     f"{cost.per_request_usd:.6g} USD each)", highlight=False)
    return end, sending


def _interrupted(store: "RunStore", n: int, threshold_pct: float, json_out: bool,
                 code: int = EXIT_INTERRUPTED) -> None:
    """Ctrl-C or SIGTERM: in-flight requests were cancelled (resume sends them again);
    report what is stored, say how to finish, exit 130 (143 for SIGTERM)."""
    from detaudit import session

    done = len(store.done_indices())
    try:
        analysis = session.analyze_store(store, threshold_pct)
        data = session.summary(store, threshold_pct, analysis=analysis)
    finally:
        store.close()
    if json_out:
        print_json(data)
    elif analysis.ok:
        stderr.print(f"[yellow]partial report[/]: {done:,} of {n:,} samples", highlight=False)
        render(analysis, store.manifest)
        print_notes(data["run"]["notes"])
    why = " by SIGTERM" if code == EXIT_TERMINATED else ""
    stderr.print(f"[yellow]interrupted{why}[/]: {done:,} of {n:,} samples stored. Finish with:\n"
                 f"  detaudit run --resume {store.path}", highlight=False)
    raise typer.Exit(code)


def command_line(ctx: typer.Context) -> list[str]:
    """The command as typed, rebuilt from the parsed flags; secrets are never flags, and
    a key pasted into a value (or a URL's user:password) is blanked anyway."""
    words = ["detaudit", ctx.info_name or "run"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == param.default or value is False:
            continue
        flag = param.opts[0]
        if value is True:
            words.append(flag)
            continue
        text = str(value.value if isinstance(value, Enum) else value)
        if param.name == "base_url":
            text = without_userinfo(text)
        words += [flag, redact(text)]
    return words



def register(app: typer.Typer, guard: Callable[[Callable], Callable]) -> None:
    """Add run to the CLI app, wrapped in its error guard."""
    app.command(epilog=RUN_EXAMPLES)(guard(run))
