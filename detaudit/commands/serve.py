"""``detaudit serve`` and ``detaudit gate``.

``detaudit.commands`` registers them with ``register(app, guard)``, as it does every
command group. ``serve`` runs the bundled engine behind an OpenAI-compatible API
(``local_backend.server``); ``gate`` runs the probes of a config file against an
endpoint and exits 0 within limits, 3 beyond them, 1 when the run itself failed,
2 on a bad config (``detaudit.gate``).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from detaudit.defaults import DEFAULT_KERNELS, DEFAULT_THRESHOLD_PCT, LOCAL_MODEL, KERNEL_MODES, model_id
from detaudit.redact import redact
from detaudit.terminal import fail, stderr, threshold_option

# typer's choices, from the one list of kernel names (local_backend.kernel_names)
Kernels = Enum("Kernels", {name.replace("-", "_"): name for name in KERNEL_MODES}, type=str)


SERVE_EXAMPLES = """\
[bold]Examples[/]

  detaudit serve                                   [dim]# tiny model, batch-invariant kernels, :8000[/]
  detaudit serve --kernels default --port 8001     [dim]# the nondeterministic control[/]
  detaudit serve --model ./my-model --max-batch 64 --device cuda --dtype bfloat16
  detaudit run --probe load-sweep --model tiny --base-url http://127.0.0.1:8000/v1
"""


def serve(
    model: str = typer.Option(LOCAL_MODEL, help="'tiny' (bundled) or a Hugging Face model folder (config.json + *.safetensors)."),
    kernels: Kernels = typer.Option(Kernels(DEFAULT_KERNELS), case_sensitive=False,
                                    help="batch-invariant: the same bits in any batch; default: plain torch ops."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port (0: a free one; the URL printed says which)."),
    max_batch: int = typer.Option(32, min=1, help="Sequences per forward pass (engine slots)."),
    max_queue: int = typer.Option(256, min=0, help="Sequences waiting beyond a full batch before 429."),
    max_body_bytes: int = typer.Option(1 << 20, min=1, help="Largest request body accepted (413 above)."),
    request_timeout: float = typer.Option(600.0, min=0.001, help="Seconds a request may take, queue included (504 after; its work stops then)."),
    header_timeout: float = typer.Option(20.0, min=0.001, help="Seconds a connection has to send a request's headers (closed with 408 after)."),
    body_timeout: float = typer.Option(60.0, min=0.001, help="Seconds a request has to send its body (408 after)."),
    max_connections: int = typer.Option(1024, min=1, help="Open connections at most; more get a 503 and are closed at once."),
    shutdown_grace: float = typer.Option(10.0, min=0.0, help="On SIGTERM/Ctrl-C, seconds in-flight requests get to finish."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda \\[default: cuda when available]."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 \\[default: the model's]."),
    max_len: int = typer.Option(2048, min=2, help="Context length per sequence (capped by the model's)."),
    prefix_cache: bool = typer.Option(False, "--prefix-cache", help="Reuse the K/V of prompt prefixes already "
                                      "computed (batch-invariant kernels: the same bits as without)."),
    prefill_chunk: Optional[int] = typer.Option(None, min=1, help="Chunked prefill: prompt tokens of one request "
                                                "per forward pass at most \\[default: the whole prompt].", metavar="TOKENS"),
) -> None:
    """Serve the bundled engine over an OpenAI-compatible API (chat, completions, logprobs).

    Concurrent requests share forward passes (continuous batching), so load changes the
    batches as on vLLM or SGLang. The URL is printed on stderr once the server is ready;
    SIGTERM or Ctrl-C shuts it down cleanly.
    """
    try:
        from local_backend.engine import Engine
        from local_backend.server.main import serve as run_server
    except ImportError as exc:
        fail(f"detaudit serve needs the local extras ({exc.name} is missing): "
             "pip install 'detaudit[local]'", 2)
    engine = Engine.load(model, kernels=kernels.value, device=device, dtype=dtype,
                         max_slots=max_batch, max_len=max_len, prefix_cache=prefix_cache,
                         prefill_chunk=prefill_chunk)
    if prefix_cache:
        stderr.print("prefix cache on", highlight=False)
    try:
        run_server(engine, model_id(model), host, port, max_queue=max_queue, max_body_bytes=max_body_bytes,
                   request_timeout_s=request_timeout, header_timeout_s=header_timeout,
                   body_timeout_s=body_timeout, max_connections=max_connections,
                   shutdown_grace_s=shutdown_grace,
                   log=lambda line: stderr.print(line, highlight=False, soft_wrap=True))
    except OSError as exc:
        fail(str(exc), 2)
    stderr.print("server stopped", highlight=False)


GATE_EXAMPLES = """\
[bold]Examples[/]

  detaudit gate --config detaudit.toml --junit gate.xml
  detaudit gate --config detaudit.toml --base-url http://vllm:8000/v1 --model my-model --json
  detaudit gate --model tiny --base-url http://127.0.0.1:8000/v1 --max-distinct-logprobs 1

[bold]Exit codes[/]: 0 within limits; 3 nondeterministic beyond limits; 1 a run failed
(endpoint down, errors over max_error_rate); 2 bad config or flag.
"""


def gate(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file with [endpoint], [limits] and [[check]] tables \\[default: one coin-flip check, n=20]."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL \\[default: the config's endpoint.base_url]."),
    model: Optional[str] = typer.Option(None, help="Model name \\[default: the config's endpoint.model; none: the bundled engine in process]."),
    api_key_env: Optional[str] = typer.Option(None, help="Environment variable holding the API key \\[default: OPENAI_API_KEY]."),
    junit: Optional[Path] = typer.Option(None, help="Write JUnit XML here: one testcase per check.", metavar="FILE"),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON summary on stdout."),
    out: Optional[Path] = typer.Option(None, help="Folder that receives the run folders \\[default: the config's out, or results]."),
    max_distinct_logprobs: Optional[int] = typer.Option(None, min=1, help="Limit per tracked token (1: bitwise identical)."),
    max_clusters: Optional[int] = typer.Option(None, min=1, help="Limit on logprob clusters per tracked token."),
    max_distinct_outputs: Optional[int] = typer.Option(None, min=1, help="Limit on distinct output texts."),
    max_prob_range: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Limit on max - min probability of a tracked token (0..1)."),
    max_error_rate: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Share of failed requests above which the run counts as failed (exit 1)."),
    max_distinct_logprob_vectors: Optional[int] = typer.Option(None, min=1, help="Completion probes: limit on distinct logprob vectors (tokens + chosen-token logprob bits) \\[default: max_distinct_logprobs]."),
    max_distinct_token_sequences: Optional[int] = typer.Option(None, min=1, help="Completion probes: limit on distinct token sequences \\[default: max_distinct_outputs]."),
    threshold_pct: Optional[float] = typer.Option(None, min=0.0, callback=threshold_option, help=f"Cluster gap, in percentage points \\[default: {DEFAULT_THRESHOLD_PCT:g}]."),
    max_attempts: int = typer.Option(3, min=1, help="Tries per request before it is stored as an error."),
    request_timeout: Optional[float] = typer.Option(None, min=0.001, help="Seconds one attempt may take in all (connect, send, every read); a timeout is retried \\[default: 60].", metavar="SECONDS"),
    no_logprobs: bool = typer.Option(False, "--no-logprobs", help="Every check text only, for servers without logprobs (or logprobs = false in one check of the config)."),
) -> None:
    """Run the checks of a config file against an endpoint and compare them with limits (for CI).

    Each check is a stored run (results/<run-id>/, with gate.json beside it). Exit 0
    within limits, 3 beyond them, 1 when a run failed, 2 on a bad config.
    """
    from detaudit import gate as gating
    from detaudit import session
    from detaudit.backends.base import DEFAULT_REQUEST_TIMEOUT_S

    flags = {"max_distinct_logprobs": max_distinct_logprobs, "max_clusters": max_clusters,
             "max_distinct_outputs": max_distinct_outputs, "max_prob_range": max_prob_range,
             "max_error_rate": max_error_rate,
             "max_distinct_logprob_vectors": max_distinct_logprob_vectors,
             "max_distinct_token_sequences": max_distinct_token_sequences}
    try:
        cfg = gating.load_config(config, flags)
    except gating.GateConfigError as exc:
        fail(str(exc), gating.EXIT_USAGE)
    endpoint = cfg.endpoint
    target = {"base_url": base_url or endpoint.get("base_url"), "model": model or endpoint.get("model"),
              "api_key_env": api_key_env or endpoint.get("api_key_env") or "OPENAI_API_KEY",
              "kernels": endpoint.get("kernels")}
    try:
        session.check_api_key_env(target["api_key_env"])
        session.check_request_timeout(request_timeout)
    except session.UsageProblem as exc:
        fail(f"{cfg.source}: {exc}" if api_key_env is None and endpoint.get("api_key_env")
             else str(exc), gating.EXIT_USAGE)
    if target["base_url"] and not target["model"]:
        fail(f"{cfg.source}: the endpoint {target['base_url']} needs a model name: give --model NAME "
             "or model = \"...\" in [endpoint]", gating.EXIT_USAGE)
    threshold = threshold_pct if threshold_pct is not None else cfg.threshold_pct
    plans = [_plan(cfg, i, check, target, no_logprobs) for i, check in enumerate(cfg.checks)]
    if target["base_url"]:
        _check_reachable(target["base_url"], plans, cfg, junit, json_out)
    folder = out or Path(cfg.out or "results")
    timeout = request_timeout or DEFAULT_REQUEST_TIMEOUT_S
    results = [_run_check(plan, folder, threshold, max_attempts, timeout) for plan in plans]
    _report(results, cfg, junit, json_out)


def _plan(cfg, index: int, check, target: dict, no_logprobs: bool = False) -> dict:
    """Probe, backend config and n of one check; a bad probe is a config error (exit 2)."""
    from detaudit import session
    from detaudit.backends.base import BackendError
    from detaudit.probes import ProbeError

    try:
        prepared = session.prepare(
            check.probe, model=target["model"], base_url=target["base_url"], n=check.n,
            api_key_env=target["api_key_env"], levels=check.levels,
            no_logprobs=no_logprobs or not check.logprobs,
            kernels=target["kernels"] if not target["base_url"] else None)
    except (ProbeError, BackendError, session.UsageProblem) as exc:
        fail(f"{cfg.source}: check[{index}] ({check.name}): {exc}", 2)
    return {"check": check, "prepared": prepared,
            "concurrency": check.concurrency or prepared.probe.default_concurrency}


def _check_reachable(base_url: str, plans: list, cfg, junit, json_out) -> None:
    """An endpoint that refuses connections fails every check at once (exit 1), instead
    of after every request's retries."""
    import httpx

    from detaudit import gate as gating

    try:
        httpx.get(base_url.rstrip("/") + "/models", timeout=10.0)
    except httpx.HTTPError as exc:
        message = redact(f"endpoint down: {base_url} did not answer ({type(exc).__name__}: {exc})")
        _report([gating.CheckResult(p["check"].name, p["check"].probe, "error",
                                    dict(p["check"].limits), message=message) for p in plans],
                cfg, junit, json_out)


def _run_check(plan: dict, folder: Path, threshold: float | None, max_attempts: int,
               timeout: float):
    """One stored run, as ``detaudit run`` makes it, then its verdict."""
    from detaudit import gate as gating
    from detaudit import session

    check, prepared = plan["check"], plan["prepared"]
    probe, n = prepared.probe, prepared.n
    store, backend, concurrency = session.start(
        prepared, folder, concurrency=plan["concurrency"], timeout=timeout,
        max_attempts=max_attempts, command=["detaudit", "gate", "check", check.name],
        gate_check=check.name)
    stderr.print(f"[bold]{check.name}[/]: {probe.name} x {n:,} -> {session.backend_name(store.manifest)}",
                 highlight=False, soft_wrap=True)
    try:
        result = session.execute(probe, backend, store, n, concurrency, max_attempts)
        analysis = session.analyze_store(store, threshold if threshold is not None else DEFAULT_THRESHOLD_PCT)
    finally:
        store.close()
    failure = result.reason if result.status == "failed" else None
    verdict = gating.evaluate(check, analysis, str(store.path), failure, result.elapsed_s)
    return verdict


def _report(results: list, cfg, junit: Path | None, json_out: bool) -> None:
    """JSON summary (stdout with --json, and gate.json in every run folder), JUnit XML,
    a table otherwise; then exit with the gate's code."""
    import json

    from rich.table import Table

    from detaudit import gate as gating

    data = gating.summary(results, cfg.source)
    text = json.dumps(data, allow_nan=False, ensure_ascii=False, indent=2)
    for r in results:
        if r.run_dir:
            (Path(r.run_dir) / "gate.json").write_text(text + "\n", encoding="utf-8")
    if junit is not None:
        try:
            junit.parent.mkdir(parents=True, exist_ok=True)
            junit.write_text(gating.junit_xml(results), encoding="utf-8")
        except OSError as exc:
            fail(f"{junit}: cannot write the JUnit XML ({exc.strerror})", 2)
    if json_out:
        typer.echo(json.dumps(data, allow_nan=False, ensure_ascii=False))
    else:
        table = Table("check", "status", "logprobs", "clusters", "outputs", "vectors", "P range",
                      "errors",
                      title="detaudit gate (measured / limit)", title_justify="left")
        style = {"pass": "green", "fail": "red", "error": "yellow"}
        for r in results:
            m = r.measured

            def show(key: str, limit: str, fmt: str = "{}") -> str:
                value = m.get(key)
                return "-" if value is None else f"{fmt.format(value)} / {r.limits[limit]:g}"

            table.add_row(r.name, f"[{style[r.status]}]{r.status}[/]",
                          show("distinct_logprobs", "max_distinct_logprobs"),
                          show("clusters", "max_clusters"),
                          show("distinct_outputs", "max_distinct_outputs"),
                          show("distinct_logprob_vectors", "max_distinct_logprob_vectors"),
                          show("prob_range", "max_prob_range", "{:.3g}"),
                          show("error_rate", "max_error_rate", "{:.1%}"))
        console = Console(highlight=False)
        console.print(table)
        for r in results:
            console.print(f"[{style[r.status]}]{r.name}[/]: ", end="")
            console.print(r.message, markup=False, soft_wrap=True)
        verdicts = {0: "[green]PASS[/]: every check within limits",
                    3: "[red]FAIL[/]: nondeterministic beyond limits (exit 3)",
                    1: "[yellow]ERROR[/]: a run failed (exit 1)"}
        console.print(verdicts[data["gate"]["exit_code"]])
    raise typer.Exit(data["gate"]["exit_code"])


def register(app: typer.Typer, guard: Callable[[Callable], Callable]) -> None:
    """Add serve and gate to the CLI app, wrapped in its error guard."""
    app.command(epilog=SERVE_EXAMPLES)(guard(serve))
    app.command(epilog=GATE_EXAMPLES)(guard(gate))
