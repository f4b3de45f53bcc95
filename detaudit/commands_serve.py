"""``detaudit serve`` and ``detaudit gate``.

``detaudit.cli`` registers them with ``register(app, guard)``, as it does the insight
commands. ``serve`` runs the bundled engine behind an OpenAI-compatible API
(``local_backend.server``); ``gate`` runs the probes of a config file against an
endpoint and exits 0 within limits, 3 beyond them, 1 when the run itself failed,
2 on a bad config (``detaudit.gate``).
"""

from __future__ import annotations

import asyncio
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

stderr = Console(stderr=True, highlight=False)


class Kernels(str, Enum):
    batch_invariant = "batch-invariant"
    default = "default"


SERVE_EXAMPLES = """\
[bold]Examples[/]

  detaudit serve                                   [dim]# tiny model, batch-invariant kernels, :8000[/]
  detaudit serve --kernels default --port 8001     [dim]# the nondeterministic control[/]
  detaudit serve --model ./my-model --max-batch 64 --device cuda --dtype bfloat16
  detaudit run --probe load-sweep --model tiny --base-url http://127.0.0.1:8000/v1
"""


def serve(
    model: str = typer.Option("tiny", help="'tiny' (bundled) or a Hugging Face model folder (config.json + *.safetensors)."),
    kernels: Kernels = typer.Option(Kernels.batch_invariant, case_sensitive=False,
                                    help="batch-invariant: the same bits in any batch; default: plain torch ops."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port (0: a free one; the URL printed says which)."),
    max_batch: int = typer.Option(32, min=1, help="Sequences per forward pass (engine slots)."),
    max_queue: int = typer.Option(256, min=0, help="Sequences waiting beyond a full batch before 429."),
    max_body_bytes: int = typer.Option(1 << 20, min=1, help="Largest request body accepted (413 above)."),
    request_timeout: float = typer.Option(600.0, min=0.001, help="Seconds a request may take, queue included (504 after)."),
    shutdown_grace: float = typer.Option(10.0, min=0.0, help="On SIGTERM/Ctrl-C, seconds in-flight requests get to finish."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda \\[default: cuda when available]."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 \\[default: the model's]."),
    max_len: int = typer.Option(2048, min=2, help="Context length per sequence (capped by the model's)."),
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
                         max_slots=max_batch, max_len=max_len)
    model_id = model if model == "tiny" else Path(model).name
    try:
        run_server(engine, model_id, host, port, max_queue=max_queue, max_body_bytes=max_body_bytes,
                   request_timeout_s=request_timeout, shutdown_grace_s=shutdown_grace,
                   log=lambda line: stderr.print(line, highlight=False, soft_wrap=True))
    except OSError as exc:
        fail(str(exc), 2)
    stderr.print("server stopped", highlight=False)


def fail(message: str, code: int) -> None:
    """One red line on stderr, then exit (the CLI's convention). Raised here rather than
    as cli.UsageProblem: under ``python -m detaudit.cli`` that class exists twice."""
    stderr.print("[bold red]error:[/] ", end="")
    stderr.print(message, markup=False, style="red", soft_wrap=True)
    raise typer.Exit(code)


def register(app: typer.Typer, guard: Callable[[Callable], Callable]) -> None:
    """Add serve and gate to the CLI app, wrapped in its error guard."""
    app.command(epilog=SERVE_EXAMPLES)(guard(serve))
