"""The session layer: how a run is assembled, sent, resumed and summarised.

``detaudit run``, ``report``, ``gate`` and the Python API (``detaudit.run``,
``detaudit.open_run``) all go through these functions, so a run made by any of them has
the same manifest, the same request path and the same summary. Nothing here prints a
report or exits: bad input raises ``UsageProblem`` (the CLI's exit 2), and the heavy
libraries (pandas, scipy, torch, openai) are imported only by the functions that use them.

The steps of a fresh run: ``prepare`` (probe, backend config, n; nothing sent, no
folder), ``start`` (the backend and the run folder with its manifest), ``execute`` (the
runner), then ``summary``. A resume is ``reopen`` then ``execute``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from detaudit import __version__, budget
from detaudit import load as load_sweep
from detaudit.backends.base import DEFAULT_REQUEST_TIMEOUT_S
from detaudit.defaults import (DEFAULT_BATCH_SIZES, DEFAULT_KERNEL_IMPL, DEFAULT_KERNELS,
                               DEFAULT_PROBE, DEFAULT_THRESHOLD_PCT, LOCAL_MODEL, MAX_LEVEL,
                               is_local_model)
from detaudit.probes import Probe, load_probe
from detaudit.ratelimit import RateLimits, tokens_per_request
from detaudit.redact import api_key_env_problem
from detaudit.runlock import describe as describe_holder
from detaudit.runner import RunResult, error_budget, resolve_tracked
from detaudit.runner import run as run_probe
from detaudit.store import MANIFEST, RunStore, StoreError, new_run_id, read_manifest, utc_now
from detaudit.terminal import stderr
from detaudit.urls import BadBaseURL, check_base_url

if TYPE_CHECKING:
    from rich.console import Console

    from detaudit.analysis import Analysis, Frames
    from detaudit.records import Sample, SampleColumns


class UsageProblem(Exception):
    """Bad input from the user (a flag, an argument): the CLI prints it in red, exit 2."""


class Terminated(Exception):
    """SIGTERM during a run: handled as Ctrl-C is (partial report, resumable), exit 143.
    Not a KeyboardInterrupt: it is raised inside the event loop, which treats those apart."""


# --- what to send -------------------------------------------------------------------------

@dataclass
class Prepared:
    """A fresh run before anything exists: its probe (overrides applied, load levels
    final), the backend config that rebuilds its backend on resume, and n in all."""

    probe: Probe
    config: dict[str, Any]
    n: int


def prepare(probe: str = DEFAULT_PROBE, *, model: str | None = None, base_url: str | None = None,
            n: int | None = None, api: str | None = None, api_key_env: str = "OPENAI_API_KEY",
            backend: str | None = None, kernels: str | None = None,
            kernel_impl: str | None = None, batch_sizes: str | list[int] | None = None,
            levels: str | list[int] | None = None, max_level: int = MAX_LEVEL,
            prompt: str | None = None, max_tokens: int | None = None,
            temperature: float | None = None, seed: int | None = None,
            top_logprobs: int | None = None, no_logprobs: bool = False,
            stream: bool | None = None) -> Prepared:
    """Probe, backend config and n of a fresh run; ``n`` per level for a load sweep;
    ``no_logprobs``: a text-only audit (the probe asks for no logprobs); ``stream``:
    set the probe's ``stream`` (true: server-sent events, endpoints only)."""
    check_api_key_env(api_key_env)
    if isinstance(batch_sizes, (list, tuple)):
        batch_sizes = ",".join(str(size) for size in batch_sizes)
    probe_obj = build_probe(probe, api=api, prompt=prompt, max_tokens=max_tokens,
                            temperature=temperature, seed=seed, top_logprobs=top_logprobs,
                            no_logprobs=no_logprobs, stream=stream)
    config = backend_config(backend, model, base_url, api_key_env, kernels, batch_sizes,
                            max_level, kernel_impl)
    if probe_obj.request.get("stream") and config["backend"] == "local":
        raise UsageProblem(f"{probe_obj.source}: stream = true needs an HTTP endpoint; the "
                           "in-process engine answers whole. Serve it (detaudit serve) and "
                           "run with --model tiny --base-url http://127.0.0.1:PORT/v1")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UsageProblem(f"n = {n!r}: give a positive whole number of samples")
    n = n or default_n(probe_obj, config)
    budget.check_n(n)
    if probe_obj.kind == "load-sweep" or levels is not None:  # n per level -> n in all
        probe_obj, config, n = load_sweep.configure(probe_obj, config, levels, batch_sizes, n,
                                                    max_level)
        budget.check_n(n)
    return Prepared(probe_obj, config, n)


def build_probe(name_or_path: str, *, api: str | None, prompt: str | None,
                no_logprobs: bool = False, **overrides: Any) -> Probe:
    """A built-in probe or a probe file, with the run's overrides applied."""
    try:
        probe = load_probe(name_or_path)
    except UnicodeDecodeError:
        raise UsageProblem(f"{name_or_path}: not a UTF-8 text file; a probe file is TOML "
                           "(see probes/coin-flip.toml)") from None
    except OSError as exc:
        raise UsageProblem(f"{name_or_path}: cannot read the probe file ({exc.strerror})") from None
    if api is not None and api != probe.api:
        probe = switch_api(probe, api)
    top = overrides.get("top_logprobs")
    if no_logprobs and top is not None:
        raise UsageProblem("--top-logprobs asks for logprobs and --no-logprobs for none; drop one")
    if top is not None:
        overrides["logprobs"] = top > 0 or probe.request.get("logprobs", False)
    probe = probe.with_overrides(prompt=prompt, **overrides)
    return probe.without_logprobs() if no_logprobs else probe


def switch_api(probe: Probe, api: str) -> Probe:
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


def backend_config(backend: str | None, model: str | None, base_url: str | None,
                   api_key_env: str, kernels: str | None, batch_sizes: str | None,
                   max_level: int = MAX_LEVEL,
                   kernel_impl: str | None = None) -> dict[str, Any]:
    """Which backend, with the arguments that rebuild it on --resume (no secrets)."""
    # a local model at a URL is detaudit serve: the openai backend
    local = backend == "local" or (backend is None and base_url is None and is_local_model(model))
    if local:
        if base_url is not None:
            raise UsageProblem("--base-url is for remote models; give --model NAME "
                               "(without --model the bundled local engine runs)")
        return {"backend": "local", "model": model or LOCAL_MODEL,
                "kernels": kernels or DEFAULT_KERNELS, "kernel_impl": kernel_impl or DEFAULT_KERNEL_IMPL,
                "batch_sizes": parse_batch_sizes(batch_sizes, max_level) if batch_sizes
                else list(DEFAULT_BATCH_SIZES)}
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


def default_n(probe: Probe, config: dict[str, Any]) -> int:
    """The probe's n; on the local engine without a GPU, at most ``LOCAL_CPU_DEFAULT_N``."""
    if config["backend"] != "local" or probe.default_n <= LOCAL_CPU_DEFAULT_N:
        return probe.default_n
    import torch  # the local extra is installed: the backend is about to load

    if torch.cuda.is_available():
        return probe.default_n
    stderr.print(f"[dim]no GPU: n = {LOCAL_CPU_DEFAULT_N} on the CPU (the probe's default is "
                 f"{probe.default_n:,}; set --n to choose)[/]", highlight=False)
    return LOCAL_CPU_DEFAULT_N


def parse_batch_sizes(text: str, max_level: int = MAX_LEVEL) -> list[int]:
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


def make_backend(config: dict[str, Any], probe: Probe,
                 timeout: float = DEFAULT_REQUEST_TIMEOUT_S) -> Any:
    """The backend a config describes (the local engine loads here)."""
    if config["backend"] == "local":
        try:
            from detaudit.backends.local import LocalBackend
        except ImportError as exc:
            raise UsageProblem(f"the local engine needs its extras ({exc.name} is missing): "
                               "pip install 'detaudit[local]'") from None
        return LocalBackend(config["model"], kernels=config["kernels"],
                            batch_sizes=config["batch_sizes"],
                            kernel_impl=config.get("kernel_impl", DEFAULT_KERNEL_IMPL),
                            prefix_cache=bool(config.get("prefix_cache", False)))
    from detaudit.backends.openai_backend import OpenAIBackend
    return OpenAIBackend(config["model"], config.get("base_url"), api=probe.api,
                         api_key_env=config["api_key_env"], timeout=timeout)


# --- limits --------------------------------------------------------------------------------

def parse_max_errors(text: str | float | None) -> float | None:
    """--max-errors: a count (20), a fraction of n (0.05) or a percentage (5%)."""
    if text is None:
        return None
    try:
        value = (float(text[:-1]) / 100 if isinstance(text, str) and text.strip().endswith("%")
                 else float(text))
        error_budget(value, 1)
    except ValueError:
        raise UsageProblem(f"--max-errors {text!r}: give a count of failed samples (e.g. 20) "
                           "or a fraction of n (e.g. 0.05 or 5%)") from None
    if value >= 1 and value != int(value):
        raise UsageProblem(f"--max-errors {text!r}: a count must be a whole number "
                           "(or give a fraction below 1, e.g. 0.05)")
    return value


def rate_limits(probe: Probe, config: dict[str, Any], rpm: float | None,
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


def limits_record(limits: RateLimits | None, max_attempts: int, max_errors: str | float | None,
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


# --- the run folder ---------------------------------------------------------------------------

def check_out(root: Path) -> None:
    """``out`` holds run folders; a run folder itself is refused."""
    if (root / MANIFEST).is_file():
        raise UsageProblem(f"--out {root}: this is a run folder; give the folder that "
                           f"holds run folders (e.g. {root.parent}), or finish it with "
                           f"--resume {root}")


def start(prepared: Prepared, root: Path, *, concurrency: int | None = None,
          timeout: float = DEFAULT_REQUEST_TIMEOUT_S, max_attempts: int = 5,
          max_errors: str | float | None = None, limits: RateLimits | None = None,
          command: list[str] | None = None, filler_caps: Any = None, run_id: str | None = None,
          **manifest_extra: Any) -> tuple[RunStore, Any, int]:
    """The backend and a new run folder under ``root`` with its manifest:
    (store, backend, concurrency). Nothing is sent yet. ``run_id``: the folder's name
    (default: time, probe and model)."""
    probe, config, n = prepared.probe, prepared.config, prepared.n
    check_out(root)
    backend = make_backend(config, probe, timeout)
    if probe.kind == "load-sweep":
        backend = load_sweep.wrap(backend, probe, n, filler_caps)
    run_concurrency = concurrency or probe.default_concurrency
    manifest = {
        "tool_version": __version__, "probe": probe.to_dict(), "n": n,
        "concurrency": run_concurrency, "backend": backend.describe(),
        "backend_config": config,
        "tracked": resolve_tracked(probe, backend), "status": "running",
        "started_at": utc_now(), "ended_at": None,
        "command": command or ["detaudit", "run"],
        "limits": limits_record(limits, max_attempts, max_errors, timeout),
        **manifest_extra,
    }
    store = RunStore.create(root, run_id or new_run_id(probe.name, config["model"]), manifest)
    return store, backend, run_concurrency


def reopen(path: Path, api_key_env: str = "OPENAI_API_KEY", request_timeout: float | None = None,
           lock: bool = True) -> tuple[RunStore, Probe, Any, int, float]:
    """The stored run, locked for this process (``runlock``), its probe, a rebuilt
    backend, n, and the request timeout: the flag's, else the one the run was started with."""
    matrix = read_manifest(Path(path)).get("matrix")  # before the lock: a refusal touches no file
    if isinstance(matrix, dict):  # its levels are sent by detaudit.matrix alone
        raise UsageProblem(f"{path}: the {matrix.get('axis')} axis of a detaudit matrix; it cannot "
                           "be resumed on its own: run detaudit matrix again")
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
        backend = make_backend(config, probe, timeout)
    except BaseException:
        store.close()
        raise
    return store, probe, backend, n, timeout


# --- sending --------------------------------------------------------------------------------

def execute(probe: Probe, backend: Any, store: RunStore, n: int, concurrency: int,
            max_attempts: int = 5, progress: "Console | None" = None,
            limits: RateLimits | None = None, max_errors: float | None = None,
            session_n: int | None = None) -> RunResult:
    """Send what the run still lacks (indices below ``session_n``, default n) and store
    it; closes the backend. Works inside a running event loop too (a notebook)."""
    # --max-errors as a fraction: of every request of the whole run, fillers included
    requests = budget.plan_requests(probe, store.manifest["backend_config"], n).total
    return run_sync(lambda: run_session(probe, backend, store, session_n or n, concurrency,
                                        max_attempts, progress, limits, max_errors, requests))


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_sync(make_coroutine: Callable[[], Any]) -> Any:
    """``asyncio.run``; inside a running loop (Jupyter) on a worker thread instead."""
    if not _loop_running():
        return asyncio.run(make_coroutine())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make_coroutine())).result()


async def run_session(probe: Probe, backend: Any, store: RunStore, n: int, concurrency: int,
                      max_attempts: int, progress: "Console | None",
                      limits: RateLimits | None = None, max_errors: float | None = None,
                      requests: int | None = None) -> RunResult:
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
        record_fillers(store, backend)


def record_fillers(store: RunStore, backend: Any) -> None:
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


# --- reading a run --------------------------------------------------------------------------

def frames_of(store: RunStore, samples: "list[Sample] | SampleColumns | None" = None) -> "Frames":
    """The analysis frames of a stored run (samples, tracked tokens); ``samples``: the
    run's samples (or ``store.sample_columns()``) when the caller has read them already."""
    from detaudit.analysis import build_frames

    samples = store.sample_columns() if samples is None else samples
    return build_frames(samples, store.manifest.get("tracked") or [])


def analyze_store(store: RunStore, threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> "Analysis":
    """The analysis of a stored run, with its logit grid and top-k entropy."""
    from detaudit import tokenization
    from detaudit.analysis import analyze
    from detaudit.analysis.agreement import NO_LOGPROBS_KIND
    from detaudit.analysis.insight import build_insight

    m = store.manifest
    samples = store.sample_columns()
    frames = frames_of(store, samples)
    probe = Probe.from_dict(m["probe"], source=f"{store.path}/manifest.json")
    split = None  # a text-only run's first divergence: the model's tokens, else characters
    if not probe.asks_logprobs or NO_LOGPROBS_KIND in samples.error_kind:
        config = m.get("backend_config") or {}
        split = tokenization.text_splitter(str(config.get("model", "")),
                                           local=config.get("backend") == "local")
    analysis = analyze(frames, threshold_pct=threshold_pct, probe_kind=probe.kind,
                       logprobs_requested=probe.asks_logprobs, answer_regex=probe.answer_regex,
                       tokenize=split[1] if split else None, tokenizer=split[0] if split else None)
    if not analysis.text_only:
        analysis.insight = build_insight(frames, samples)  # logit grid, top-k entropy
    return analysis


def logprobs_not_returned(analysis: "Analysis") -> bool:
    """The run asked for logprobs and the server sent none: only a text-only run helps."""
    from detaudit.analysis.agreement import NOT_RETURNED

    return analysis.logprobs == NOT_RETURNED


def run_info(store: RunStore, result: RunResult | None = None) -> dict[str, Any]:
    """The ``run`` object of the JSON summary: run facts, and this session's, if any."""
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


def data_notes(store: RunStore) -> list[str]:
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


def summary(store: RunStore, threshold_pct: float = DEFAULT_THRESHOLD_PCT,
            result: RunResult | None = None,
            analysis: "Analysis | None" = None) -> dict[str, Any]:
    """The JSON summary that ``run --json`` and ``report --json`` print: ``run`` (facts
    and notes) and the analysis."""
    analysis = analysis if analysis is not None else analyze_store(store, threshold_pct)
    return {"run": {**run_info(store, result), "notes": data_notes(store)}, **analysis.to_dict()}


def backend_name(manifest: dict[str, Any]) -> str:
    """Where a run's requests went, in words."""
    config = manifest.get("backend_config") or {}
    name = config.get("model") or manifest.get("backend", {}).get("model", "?")
    if config.get("backend") == "local":
        return f"local {name} ({config.get('kernels')} kernels)"
    return f"{name} at {config.get('base_url') or 'the OpenAI API'}"


def engine_facts(manifest: dict[str, Any]) -> str | None:
    """How the local engine ran: kernels, their implementation, device, batch sizes."""
    config, facts = manifest.get("backend_config") or {}, manifest.get("backend") or {}
    if config.get("backend") != "local":
        return None
    impl = facts.get("kernel_impl") or "triton"
    sizes = ", ".join(str(size) for size in facts.get("batch_sizes") or config.get("batch_sizes") or [])
    return (f"{facts.get('kernels', config.get('kernels'))} kernels ({impl} on {facts.get('device', '?')}, "
            f"{facts.get('dtype', '?')}); repeats cycle through batch sizes {sizes}, beside random fillers")
