"""The ``detaudit`` command line: every command, nothing else.

Conventions: logs, progress and errors go to stderr; results (the report, JSON, file
paths) go to stdout. ``--json`` prints exactly one JSON object on stdout. Exit codes:
0 ok, 1 the run failed, 2 usage error (bad flag, malformed probe or input file,
unreadable run folder, a run folder in use), 130 interrupted by Ctrl-C, 143 by SIGTERM.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import shlex
import signal
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from detaudit import __version__
from detaudit import budget, tokenization
from detaudit import commands_insight as insight
from detaudit import load as load_sweep
from detaudit.analysis import Analysis, analyze, build_frames
from detaudit.analysis.agreement import NO_LOGPROBS_KIND, NOT_RETURNED
from detaudit.analysis.insight import build_insight
from detaudit.backends.base import DEFAULT_REQUEST_TIMEOUT_S, BackendError
from detaudit.ingest import IngestError
from detaudit.probes import Probe, ProbeError, builtin_names, load_probe
from detaudit.ratelimit import RateLimits, tokens_per_request
from detaudit.redact import api_key_env_problem, redact
from detaudit.runlock import RunLocked, describe as describe_holder
from detaudit.runner import RunFailed, RunResult, error_budget, resolve_tracked
from detaudit.runner import run as run_probe
from detaudit.store import MANIFEST, RunStore, StoreError, new_run_id, utc_now
from detaudit.terminal import fail as _fail, print_json as _print_json, stderr, threshold_option
from detaudit.urls import BadBaseURL, check_base_url, without_userinfo

DEFAULT_PROBE = "coin-flip"
DEFAULT_THRESHOLD_PCT = 0.01
LOCAL_MODEL = "tiny"

app = typer.Typer(
    name="detaudit", add_completion=False, no_args_is_help=True,
    pretty_exceptions_enable=False, rich_markup_mode="rich",
    help="Does an LLM give the same answer twice? Send one request many times, store "
         "every answer, and count the distinct logprobs and outputs.")



class Api(str, Enum):
    chat = "chat"
    completions = "completions"


class BackendKind(str, Enum):
    openai = "openai"
    local = "local"


class Kernels(str, Enum):
    batch_invariant = "batch-invariant"
    default = "default"


class KernelImpl(str, Enum):
    auto = "auto"
    triton = "triton"
    cpu_exact = "cpu-exact"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"detaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Does an LLM give the same answer twice? Send one request many times, store every answer, and count the distinct logprobs and outputs."""


class UsageProblem(Exception):
    """Bad input from the user: printed in red, exit code 2."""


class Terminated(Exception):
    """SIGTERM during a run: handled as Ctrl-C is (partial report, resumable), exit 143.
    Not a KeyboardInterrupt: it is raised inside the event loop, which treats those apart."""


EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


def _cli_errors(command: Callable) -> Callable:
    """Turn expected errors into one red line and an exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (UsageProblem, ProbeError, IngestError, StoreError, BackendError,
                budget.BudgetError, RunLocked) as exc:
            _fail(str(exc), 2)
        except RunFailed as exc:
            _fail(str(exc), 1)
        except (KeyboardInterrupt, Terminated) as exc:
            stderr.print("[yellow]interrupted[/]")
            raise typer.Exit(_interrupt_code(exc)) from None
        except Exception as exc:
            if type(exc).__name__ == "ModelLoadError":  # local_backend, imported lazily
                _fail(str(exc), 2)
            raise

    return wrapper


# --- run -------------------------------------------------------------------------------

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
                      "top_logprobs", "out")


@app.command(epilog=RUN_EXAMPLES)
@_cli_errors
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
    batch_sizes: Optional[str] = typer.Option(None, help="Local engine: batch sizes the repeats cycle through \\[default: 1,3,8,32]."),
    levels: Optional[str] = typer.Option(None, help="load-sweep: requests in flight beside the target, e.g. 0,1,4,16 \\[default: the probe's]; --n is then per level."),
    max_level: int = typer.Option(load_sweep.MAX_LEVEL, min=0, help="Cap on --levels and on a local --batch-sizes (batch B = level B-1): requests in flight beside the target."),
    concurrency: Optional[int] = typer.Option(None, min=1, help="Requests in flight \\[default: the probe's]."),
    prompt: Optional[str] = typer.Option(None, help="Replace the probe's prompt (one user message for chat)."),
    max_tokens: Optional[int] = typer.Option(None, min=1, help="Override the probe's max_tokens."),
    temperature: Optional[float] = typer.Option(None, min=0.0, max=2.0, help="Override the probe's temperature."),
    seed: Optional[int] = typer.Option(None, help="Override the probe's seed."),
    top_logprobs: Optional[int] = typer.Option(None, min=0, max=20, help="Override how many top logprobs to ask for (0-20)."),
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
    api, backend, kernels, kernel_impl = (e.value if e is not None else None
                                          for e in (api, backend, kernels, kernel_impl))
    check_api_key_env(api_key_env)
    error_limit = _parse_max_errors(max_errors)
    check_request_timeout(request_timeout)
    if resume is not None:
        given = [f"--{name.replace('_', '-')}" for name in _MEASUREMENT_FLAGS
                 if ctx.params.get(name) is not None] + (["--no-logprobs"] if no_logprobs else [])
        if given:
            raise UsageProblem(f"--resume takes the probe, model, n and backend from the run's "
                               f"manifest; drop {', '.join(given)}")
        store, probe_obj, backend_obj, n, timeout = _reopen(resume, api_key_env, request_timeout,
                                                            lock=not dry_run)
        config = store.manifest["backend_config"]
        plan = budget.plan_requests(probe_obj, config, n, store)  # what finishing would send
        if dry_run:
            cost = insight.cost_plan(probe_obj, config, plan.targets, prices, plan.fillers)
            store.close()
            asyncio.run(backend_obj.aclose())
            return insight.dry_run(cost, probe_obj.request, json_out)
        session_n, session = _within_budget(store, probe_obj, config, n, plan, max_cost, prices)
        if probe_obj.kind == "load-sweep":
            backend_obj = load_sweep.wrap(backend_obj, probe_obj, n, session.filler_caps)
        run_concurrency = concurrency or store.manifest["concurrency"]
        limits = _rate_limits(probe_obj, store.manifest["backend_config"], rpm, tpm)
        store.update_manifest(resumed_at=store.manifest.get("resumed_at", []) + [utc_now()],
                              concurrency=run_concurrency,
                              limits=limits_record(limits, max_attempts, max_errors, timeout))
    else:
        probe_obj = _build_probe(probe or DEFAULT_PROBE, api=api, prompt=prompt, max_tokens=max_tokens,
                                 temperature=temperature, seed=seed, top_logprobs=top_logprobs,
                                 no_logprobs=no_logprobs)
        config = _backend_config(backend, model, base_url, api_key_env, kernels, batch_sizes,
                                 max_level, kernel_impl)
        n = n or _default_n(probe_obj, config)
        budget.check_n(n)
        if probe_obj.kind == "load-sweep" or levels is not None:  # n per level -> n in all
            probe_obj, n = load_sweep.configure(probe_obj, config, levels, batch_sizes, n,
                                                max_level)
            budget.check_n(n)
        root = out or Path("results")
        if (root / MANIFEST).is_file():
            raise UsageProblem(f"--out {root}: this is a run folder; give the folder that "
                               f"holds run folders (e.g. {root.parent}), or finish it with "
                               f"--resume {root}")
        # before a backend or a run folder exists: what will be sent, and what fits
        plan = budget.plan_requests(probe_obj, config, n)
        if dry_run:
            cost = insight.cost_plan(probe_obj, config, plan.targets, prices, plan.fillers)
            return insight.dry_run(cost, probe_obj.request, json_out)
        session_n, session = _within_budget(None, probe_obj, config, n, plan, max_cost, prices)
        timeout = request_timeout or DEFAULT_REQUEST_TIMEOUT_S
        backend_obj = _make_backend(config, probe_obj, timeout)
        if probe_obj.kind == "load-sweep":
            backend_obj = load_sweep.wrap(backend_obj, probe_obj, n, session.filler_caps)
        run_concurrency = concurrency or probe_obj.default_concurrency
        limits = _rate_limits(probe_obj, config, rpm, tpm)
        manifest = {
            "tool_version": __version__, "probe": probe_obj.to_dict(), "n": n,
            "concurrency": run_concurrency, "backend": backend_obj.describe(),
            "backend_config": config,
            "tracked": resolve_tracked(probe_obj, backend_obj), "status": "running",
            "started_at": utc_now(), "ended_at": None,
            "command": _command_line(ctx),
            "limits": limits_record(limits, max_attempts, max_errors, timeout),
        }
        run_id = new_run_id(probe_obj.name, config["model"])
        store = RunStore.create(root, run_id, manifest)

    if not quiet:
        fillers = f" (+ at most {session.fillers:,} filler requests)" if session.fillers else ""
        stderr.print(f"[bold]{store.manifest['run_id']}[/]: {probe_obj.name} x {n:,}{fillers} -> "
                     f"{_backend_name(store.manifest)}, concurrency {run_concurrency}",
                     highlight=False, soft_wrap=True)
    progress = stderr if not quiet and stderr.is_terminal else None
    # --max-errors as a fraction: of every request of the whole run, fillers included
    requests = budget.plan_requests(probe_obj, store.manifest["backend_config"], n).total
    try:
        result = asyncio.run(_session(probe_obj, backend_obj, store, session_n, run_concurrency,
                                      max_attempts, progress, limits, error_limit, requests))
    except (KeyboardInterrupt, Terminated) as exc:
        _interrupted(store, n, threshold_pct, json_out, _interrupt_code(exc))

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
    analysis = _analyze_store(store, threshold_pct)
    info = _run_info(store, result)
    notes = _data_notes(store)
    store.close()
    if json_out:
        _print_json({"run": {**info, "notes": notes}, **analysis.to_dict()})
    else:
        if analysis.ok:
            _render(analysis, store.manifest)
        _print_notes(notes)
        typer.echo(f"Run folder: {store.path}")
    if analysis.logprobs == NOT_RETURNED:  # a resume would ask for logprobs again
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


def _within_budget(store: RunStore | None, probe: Probe, config: dict[str, Any], n: int,
                   plan: budget.RequestPlan, max_cost: float | None,
                   prices: Path | None) -> tuple[int, budget.RequestPlan]:
    """The n to give the runner, and what it will send, so that at most the affordable
    missing indices (each with its fillers) are sent; exit 2 when not one fits."""
    if max_cost is None:
        return n, plan
    cost = insight.cost_plan(probe, config, plan.targets, prices, plan.fillers)
    end, session = insight.affordable(cost, plan, max_cost, store)
    if session.total < plan.total:
        fillers = f" and {session.fillers:,} of {plan.fillers:,} filler requests" if plan.fillers else ""
        stderr.print(f"[yellow]--max-cost {max_cost:g} USD[/]: sending {session.targets:,} of the "
                     f"{plan.targets:,} requests left{fillers} (at most "
                     f"{cost.per_request_usd:.6g} USD each)", highlight=False)
    return end, session


async def _session(probe: Probe, backend: Any, store: RunStore, n: int, concurrency: int,
                   max_attempts: int, progress: Console | None, limits: RateLimits | None = None,
                   max_errors: float | None = None, requests: int | None = None) -> RunResult:
    """One runner session; SIGTERM cancels it as Ctrl-C does (``Terminated``)."""
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    terminated = []

    def on_sigterm() -> None:
        terminated.append(True)
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        terminated = None
    # a load sweep's failed fillers count against --max-errors
    side = (lambda: backend.filler_failures) if hasattr(backend, "filler_failures") else None
    try:
        return await run_probe(probe, backend, store, n, concurrency, max_attempts=max_attempts,
                               progress=progress, limits=limits, max_errors=max_errors,
                               requests=requests, side_failures=side)
    except asyncio.CancelledError:
        if terminated:
            raise Terminated() from None
        raise
    finally:
        if terminated is not None:
            loop.remove_signal_handler(signal.SIGTERM)
        await backend.aclose()
        _record_fillers(store, backend)


def _record_fillers(store: RunStore, backend: Any) -> None:
    """A load sweep's filler requests, all sessions together, in the manifest."""
    stats = getattr(backend, "filler_stats", None)
    if stats is None:
        return
    now, before = stats(), store.manifest.get("fillers") or {}
    kinds = dict(before.get("failed_by_kind") or {})
    for kind, count in now["failed_by_kind"].items():
        kinds[kind] = kinds.get(kind, 0) + count
    store.update_manifest(fillers={**{key: before.get(key, 0) + now[key]
                                      for key in ("sent", "cancelled", "failed")},
                                   "failed_by_kind": kinds})


def _interrupt_code(exc: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


def _interrupted(store: RunStore, n: int, threshold_pct: float, json_out: bool,
                 code: int = EXIT_INTERRUPTED) -> None:
    """Ctrl-C or SIGTERM: in-flight requests were cancelled (resume sends them again);
    report what is stored, say how to finish, exit 130 (143 for SIGTERM)."""
    done = len(store.done_indices())
    try:
        analysis = _analyze_store(store, threshold_pct)
        info, notes = _run_info(store), _data_notes(store)
    finally:
        store.close()
    if json_out:
        _print_json({"run": {**info, "notes": notes}, **analysis.to_dict()})
    elif analysis.ok:
        stderr.print(f"[yellow]partial report[/]: {done:,} of {n:,} samples", highlight=False)
        _render(analysis, store.manifest)
        _print_notes(notes)
    why = " by SIGTERM" if code == EXIT_TERMINATED else ""
    stderr.print(f"[yellow]interrupted{why}[/]: {done:,} of {n:,} samples stored. Finish with:\n"
                 f"  detaudit run --resume {store.path}", highlight=False)
    raise typer.Exit(code)


def _parse_max_errors(text: str | None) -> float | None:
    """--max-errors: a count (20), a fraction of n (0.05) or a percentage (5%)."""
    if text is None:
        return None
    try:
        value = float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
        error_budget(value, 1)
    except ValueError:
        raise UsageProblem(f"--max-errors {text!r}: give a count of failed samples (e.g. 20) "
                           "or a fraction of n (e.g. 0.05 or 5%)") from None
    if value >= 1 and value != int(value):
        raise UsageProblem(f"--max-errors {text!r}: a count must be a whole number "
                           "(or give a fraction below 1, e.g. 0.05)")
    return value


def _rate_limits(probe: Probe, config: dict[str, Any], rpm: float | None,
                 tpm: float | None) -> RateLimits | None:
    """The --rpm/--tpm buckets; a request's tokens counted as the provider counts them."""
    if rpm is None and tpm is None:
        return None
    tokens, how = None, None
    if tpm is not None:
        from detaudit.cost import plan_run

        plan = plan_run(probe, config, 1)
        prompt_text = json.dumps(probe.request.get("messages") or probe.request.get("prompt", ""))
        tokens, estimated = tokens_per_request(plan.prompt_tokens, plan.completion_tokens,
                                               prompt_text)
        how = ("estimate: 4 characters per token" if estimated else
               plan.tokenizer + (" (approximate: model unknown)" if plan.approximate else ""))
    return RateLimits(rpm=rpm, tpm=tpm, tokens_per_request=tokens, token_count=how)


def limits_record(limits: RateLimits | None, max_attempts: int, max_errors: str | None,
                   request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """The manifest's ``limits``: what paced and bounded this session."""
    return {**(limits.to_dict() if limits else {"rpm": None, "tpm": None}),
            "max_attempts": max_attempts, "max_errors": max_errors,
            "request_timeout_s": request_timeout_s}


def check_api_key_env(name: str) -> None:
    """--api-key-env names a variable; a key pasted there is refused (exit 2), unshown."""
    problem = api_key_env_problem(name)
    if problem:
        raise UsageProblem(problem)


def check_request_timeout(seconds: float | None) -> None:
    if seconds is not None and not math.isfinite(seconds):
        raise UsageProblem(f"--request-timeout {seconds}: give a number of seconds, e.g. 60")


def _data_notes(store: RunStore) -> list[str]:
    """Sentences about data the analysis had to treat specially."""
    counts = store.data_notes()
    notes = []
    if counts.get("sentinel_samples"):
        notes.append(f"{counts['sentinel_entries']:,} top-logprob entries in "
                     f"{counts['sentinel_samples']:,} samples were the -9999 sentinel (a token "
                     "outside the top 20): counted as missing, not as logprob values")
    if counts.get("short_top_samples"):
        notes.append(f"{counts['short_top_samples']:,} samples had fewer top logprobs than asked "
                     f"(as few as {counts['short_top_fewest']}): a tracked token outside them "
                     "counts as missing")
    return notes


def _print_notes(notes: list[str]) -> None:
    """Notes belong to the report: stdout, under its tables."""
    out = Console(highlight=False)
    for note in notes:
        out.print(f"[yellow]note:[/] {note}", soft_wrap=True)


def _build_probe(name_or_path: str, *, api: str | None, prompt: str | None,
                 no_logprobs: bool = False, **overrides: Any) -> Probe:
    try:
        probe = load_probe(name_or_path)
    except UnicodeDecodeError:
        raise UsageProblem(f"{name_or_path}: not a UTF-8 text file; a probe file is TOML "
                           "(see probes/coin-flip.toml)") from None
    except OSError as exc:
        raise UsageProblem(f"{name_or_path}: cannot read the probe file ({exc.strerror})") from None
    if api is not None and api != probe.api:
        probe = _switch_api(probe, api)
    top = overrides.get("top_logprobs")
    if no_logprobs and top is not None:
        raise UsageProblem("--top-logprobs asks for logprobs and --no-logprobs for none; drop one")
    if top is not None:
        overrides["logprobs"] = top > 0 or probe.request.get("logprobs", False)
    probe = probe.with_overrides(prompt=prompt, **overrides)
    return probe.without_logprobs() if no_logprobs else probe


def _switch_api(probe: Probe, api: str) -> Probe:
    """Chat -> completions sends the last user message as the prompt; back, one user message."""
    request = dict(probe.request)
    if api == "completions":
        users = [m["content"] for m in request.pop("messages", []) if m.get("role") == "user"]
        if not users:
            raise UsageProblem(f"{probe.source}: --api completions needs a user message to use "
                               "as the prompt; give --prompt TEXT")
        request["prompt"] = users[-1]
    else:
        request["messages"] = [{"role": "user", "content": request.pop("prompt")}]
    data = probe.to_dict()
    data.update(api=api, request=request)
    return Probe.from_dict(data, source=probe.source)


def _backend_config(backend: str | None, model: str | None, base_url: str | None,
                    api_key_env: str, kernels: str | None, batch_sizes: str | None,
                    max_level: int = load_sweep.MAX_LEVEL,
                    kernel_impl: str | None = None) -> dict[str, Any]:
    """Which backend, with the arguments that rebuild it on --resume (no secrets)."""
    local = backend == "local" or (backend is None and base_url is None and (
        model is None or model == LOCAL_MODEL or Path(model).is_dir()))  # tiny at a URL: detaudit serve
    if local:
        if base_url is not None:
            raise UsageProblem("--base-url is for remote models; give --model NAME "
                               "(without --model the bundled local engine runs)")
        return {"backend": "local", "model": model or LOCAL_MODEL,
                "kernels": kernels or "batch-invariant", "kernel_impl": kernel_impl or "auto",
                "batch_sizes": _parse_batch_sizes(batch_sizes, max_level) if batch_sizes else [1, 3, 8, 32]}
    if model is None:
        raise UsageProblem("--backend openai needs --model NAME (e.g. --model gpt-4o)")
    # With --base-url (or --backend openai) the name is the server's, path-like or not:
    # vLLM, SGLang and transformers serve name a folder-served model by its path.
    if backend is None and base_url is None and model.startswith(("/", "./", "../", "~")):
        raise UsageProblem(f"--model {model}: no such model folder (a local model is a folder "
                           "with config.json and *.safetensors; a remote model is a name)")
    for flag, value in (("--kernels", kernels), ("--batch-sizes", batch_sizes), ("--kernel-impl", kernel_impl)):
        if value is not None:
            raise UsageProblem(f"{flag} is for the local engine (--backend local); "
                               f"it does not apply to {model}")
    try:
        shown_url = check_base_url(base_url) if base_url else None
    except BadBaseURL as exc:
        raise UsageProblem(str(exc)) from None
    return {"backend": "openai", "model": model, "base_url": shown_url,
            "api_key_env": api_key_env}


# Without a GPU the local engine runs its exact-order CPU ops: about 70 ms a sample of the
# tiny model over the default batch sizes, where the probe's default n (sized for
# remote APIs) would take over a minute. A run with no --n stops at this many, which
# already shows the contrast (one value, against several with --kernels default).
LOCAL_CPU_DEFAULT_N = 100


def _default_n(probe: Probe, config: dict[str, Any]) -> int:
    if config["backend"] != "local" or probe.default_n <= LOCAL_CPU_DEFAULT_N:
        return probe.default_n
    import torch  # the local extra is installed: the backend is about to load

    if torch.cuda.is_available():
        return probe.default_n
    stderr.print(f"[dim]no GPU: n = {LOCAL_CPU_DEFAULT_N} on the CPU (the probe's default is "
                 f"{probe.default_n:,}; set --n to choose)[/]", highlight=False)
    return LOCAL_CPU_DEFAULT_N


def _parse_batch_sizes(text: str, max_level: int = load_sweep.MAX_LEVEL) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(size < 1 for size in sizes):
        raise UsageProblem(f"--batch-sizes {text!r}: give positive integers separated by commas, "
                           "e.g. 1,3,8,32")
    load_sweep.check_levels([size - 1 for size in sizes], max_level,
                           f"--batch-sizes {text} (a batch of B runs B-1 beside the target)")
    return sizes


def _make_backend(config: dict[str, Any], probe: Probe,
                  timeout: float = DEFAULT_REQUEST_TIMEOUT_S) -> Any:
    if config["backend"] == "local":
        try:
            from detaudit.backends.local import LocalBackend
        except ImportError as exc:
            raise UsageProblem(f"the local engine needs its extras ({exc.name} is missing): "
                               "pip install 'detaudit[local]'") from None
        return LocalBackend(config["model"], kernels=config["kernels"],
                            batch_sizes=config["batch_sizes"], kernel_impl=config.get("kernel_impl", "auto"))
    from detaudit.backends.openai_backend import OpenAIBackend
    return OpenAIBackend(config["model"], config.get("base_url"), api=probe.api,
                         api_key_env=config["api_key_env"], timeout=timeout)


def _reopen(path: Path, api_key_env: str, request_timeout: float | None,
            lock: bool = True) -> tuple[RunStore, Probe, Any, int, float]:
    """The stored run, locked for this process (``runlock``), its probe, a rebuilt
    backend, n, and the request timeout: the flag's, else the one the run was started with."""
    store = RunStore.open(path, lock=lock)
    stale = store.lock.stale if store.lock else None
    if stale:
        stderr.print(f"[yellow]note:[/] took over the lock of {describe_holder(stale)}, which ended "
                     "without releasing it", highlight=False, soft_wrap=True)
    manifest = store.manifest
    try:
        probe = Probe.from_dict(manifest["probe"], source=f"{path}/manifest.json")
        config = dict(manifest["backend_config"])
        n = int(manifest["n"])
    except KeyError as exc:
        store.close()
        raise StoreError(f"{path}: the manifest lacks {exc}; this run cannot be resumed") from None
    if config["backend"] == "openai":
        config["api_key_env"] = api_key_env
    limits = manifest.get("limits") if isinstance(manifest.get("limits"), dict) else {}
    timeout = request_timeout or limits.get("request_timeout_s") or DEFAULT_REQUEST_TIMEOUT_S
    if not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        timeout = DEFAULT_REQUEST_TIMEOUT_S  # a hand-edited manifest: the default
    try:
        backend = _make_backend(config, probe, timeout)
    except BaseException:
        store.close()
        raise
    return store, probe, backend, n, timeout


def _command_line(ctx: typer.Context) -> list[str]:
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


def _backend_name(manifest: dict[str, Any]) -> str:
    config = manifest.get("backend_config") or {}
    name = config.get("model") or manifest.get("backend", {}).get("model", "?")
    if config.get("backend") == "local":
        return f"local {name} ({config.get('kernels')} kernels)"
    return f"{name} at {config.get('base_url') or 'the OpenAI API'}"


def _engine_facts(manifest: dict[str, Any]) -> str | None:
    """How the local engine ran: kernels, their implementation, device, batch sizes."""
    config, facts = manifest.get("backend_config") or {}, manifest.get("backend") or {}
    if config.get("backend") != "local":
        return None
    impl = facts.get("kernel_impl") or "triton"
    sizes = ", ".join(str(size) for size in facts.get("batch_sizes") or config.get("batch_sizes") or [])
    return (f"{facts.get('kernels', config.get('kernels'))} kernels ({impl} on {facts.get('device', '?')}, "
            f"{facts.get('dtype', '?')}); repeats cycle through batch sizes {sizes}, beside random fillers")


def _run_info(store: RunStore, result: RunResult | None = None) -> dict[str, Any]:
    m = store.manifest
    info = {"id": m["run_id"], "dir": str(store.path), "status": m.get("status"),
            "probe": m["probe"]["name"], "n": m["n"], "backend": m.get("backend"),
            "started_at": m.get("started_at"), "ended_at": m.get("ended_at")}
    if m.get("fillers"):
        info["fillers"] = m["fillers"]
    if result is not None:
        info.update(sent=result.sent, elapsed_s=round(result.elapsed_s, 3),
                    requests_per_s=round(result.sent / result.elapsed_s, 1) if result.elapsed_s else None,
                    failure=result.reason)
    return info


def _analyze_store(store: RunStore, threshold_pct: float) -> Analysis:
    m = store.manifest
    samples = store.samples()
    frames = build_frames(samples, m.get("tracked") or [])
    probe = Probe.from_dict(m["probe"], source=f"{store.path}/manifest.json")
    split = None  # a text-only run's first divergence: the model's tokens, else characters
    if not probe.asks_logprobs or any(s.error_kind == NO_LOGPROBS_KIND for s in samples):
        config = m.get("backend_config") or {}
        split = tokenization.text_splitter(str(config.get("model", "")),
                                           local=config.get("backend") == "local")
    analysis = analyze(frames, threshold_pct=threshold_pct, probe_kind=probe.kind,
                       logprobs_requested=probe.asks_logprobs, answer_regex=probe.answer_regex,
                       tokenize=split[1] if split else None, tokenizer=split[0] if split else None)
    if not analysis.text_only:
        analysis.insight = build_insight(frames, samples)  # logit grid, top-k entropy
    return analysis


def _render(analysis: Analysis, manifest: dict[str, Any] | None, title: str | None = None) -> None:
    from detaudit.report import render_report

    if title is None and manifest is not None:
        title = f"{manifest['probe']['name']} x {manifest['n']:,} on {_backend_name(manifest)}"
    render_report(analysis, Console(highlight=False), title=title,
                  facts=_engine_facts(manifest) if manifest is not None else None)


# --- report, export, analyze, probes ----------------------------------------------------

@app.command(epilog="[bold]Examples[/]\n\n  detaudit report results/<run-id>\n"
                    "  detaudit report results/<run-id> --threshold-pct 0.001 --json")
@_cli_errors
def report(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. results/<run-id>."),
    threshold_pct: float = typer.Option(DEFAULT_THRESHOLD_PCT, min=0.0, callback=threshold_option, help="Cluster gap, in percentage points of probability."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Re-analyse a stored run (any threshold, no requests sent)."""
    with RunStore.open_read_only(run_dir) as store:
        analysis = _analyze_store(store, threshold_pct)
        info = _run_info(store)
        notes = _data_notes(store)
    if info["status"] != "complete":
        stderr.print(f"[yellow]note:[/] this run is {info['status']}; finish it with "
                     f"detaudit run --resume {run_dir}", highlight=False)
    if json_out:
        _print_json({"run": {**info, "notes": notes}, **analysis.to_dict()})
    else:
        _render(analysis, store.manifest)
        _print_notes(notes)


@app.command(epilog="[bold]Example[/]\n\n  detaudit export results/<run-id> --clusters clusters.csv --samples samples.csv")
@_cli_errors
def export(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. results/<run-id>."),
    clusters: Optional[Path] = typer.Option(None, help="Write one row per logprob cluster here."),
    samples: Optional[Path] = typer.Option(None, help="Write one row per sample here."),
    threshold_pct: float = typer.Option(DEFAULT_THRESHOLD_PCT, min=0.0, callback=threshold_option, help="Cluster gap, in percentage points of probability."),
) -> None:
    """Write a stored run as CSV files: clusters and/or samples."""
    if clusters is None and samples is None:
        raise UsageProblem("nothing to export: give --clusters FILE.csv and/or --samples FILE.csv")
    with RunStore.open_read_only(run_dir) as store:
        analysis = _analyze_store(store, threshold_pct)
    _write_csvs(analysis, clusters, samples)


@app.command("analyze", epilog="[bold]Examples[/]\n\n  detaudit analyze gpt4o-heads.csv\n"
                    "  detaudit analyze logprobs.jsonl --token Heads --json\n"
                    "  detaudit analyze logprobs.csv --clusters clusters.csv")
@_cli_errors
def analyze_file(
    file: Path = typer.Argument(..., help="CSV or JSONL, one row per sample, with a 'logprob' column."),
    token: Optional[str] = typer.Option(None, help="Analyse only the rows of this token."),
    threshold_pct: float = typer.Option(DEFAULT_THRESHOLD_PCT, min=0.0, callback=threshold_option, help="Cluster gap, in percentage points of probability."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    clusters: Optional[Path] = typer.Option(None, help="Also write the clusters CSV here."),
    samples: Optional[Path] = typer.Option(None, help="Also write the samples CSV here."),
) -> None:
    """Analyse logprobs recorded elsewhere (CSV or JSONL) like a stored run."""
    from detaudit.ingest import load_table

    frames = load_table(file, token=token)
    kind = "outcome" if frames.samples["output"].notna().any() else None
    analysis = analyze(frames, threshold_pct=threshold_pct, probe_kind=kind)
    analysis.insight = build_insight(frames)  # log-odds grid (a file has no top-k lists)
    if json_out:
        _print_json({"file": str(file), **analysis.to_dict()})
    else:
        _render(analysis, None, title=str(file))
    _write_csvs(analysis, clusters, samples, quiet=json_out)


def _write_csvs(analysis: Analysis, clusters: Path | None, samples: Path | None,
                quiet: bool = False) -> None:
    from detaudit.export import write_clusters_csv, write_samples_csv

    for path, write in ((clusters, write_clusters_csv), (samples, write_samples_csv)):
        if path is None:
            continue
        try:
            write(analysis, path)
        except OSError as exc:
            raise UsageProblem(f"{path}: cannot write ({exc.strerror})") from None
        if quiet:
            stderr.print(f"wrote {path}", highlight=False)
        else:
            typer.echo(str(path))


@app.command(epilog="[bold]Example[/]\n\n  detaudit probes --json")
@_cli_errors
def probes(json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout.")) -> None:
    """List the built-in probes: name, kind, defaults and what each measures."""
    rows = []
    for name in builtin_names():
        p = load_probe(name)
        rows.append({"name": p.name, "kind": p.kind, "api": p.api, "n": p.default_n,
                     "concurrency": p.default_concurrency, "description": p.description})
    if json_out:
        _print_json({"probes": rows})
        return
    table = Table("probe", "kind", "n", "description", title="Built-in probes", title_justify="left")
    for r in rows:
        table.add_row(r["name"], r["kind"], f"{r['n']:,}", r["description"])
    Console().print(table)
    typer.echo("Use one with: detaudit run --probe NAME (or --probe FILE.toml)")


insight.register(app, _cli_errors)  # compare, plot, tokens
from detaudit import commands_serve  # noqa: E402  (it imports cli's helpers lazily)
commands_serve.register(app, _cli_errors)  # serve, gate


def main() -> None:
    """The console script. A traceback (always a bug) is printed redacted too."""
    try:
        app()
    except Exception:  # SystemExit and KeyboardInterrupt pass through
        sys.stderr.write(redact(traceback.format_exc()))
        sys.exit(1)


if __name__ == "__main__":
    main()
