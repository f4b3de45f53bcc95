"""The typer app every command registers on, and ``guard``: the one place where expected
errors become one red line and an exit code (0 ok, 1 the run failed, 2 usage error,
130 interrupted by Ctrl-C, 143 by SIGTERM), never a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import typer

from detaudit import __version__
from detaudit.backends.base import BackendError
from detaudit.budget import BudgetError
from detaudit.probes import ProbeError
from detaudit.runlock import RunLocked
from detaudit.runner import RunFailed
from detaudit.session import Terminated, UsageProblem
from detaudit.store import StoreError
from detaudit.terminal import fail, stderr

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143

app = typer.Typer(
    name="detaudit", add_completion=False, no_args_is_help=True,
    pretty_exceptions_enable=False, rich_markup_mode="rich",
    help="Does an LLM give the same answer twice? Send one request many times, store "
         "every answer, and count the distinct logprobs and outputs.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"detaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Does an LLM give the same answer twice? Send one request many times, store every answer, and count the distinct logprobs and outputs."""


def interrupt_code(exc: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


def usage_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (exit 2). Those of modules that pull in heavy
    libraries (pandas, torch) count only once loaded: unloaded, they cannot be raised."""
    errors: list[type[BaseException]] = [UsageProblem, ProbeError, StoreError, BackendError,
                                         BudgetError, RunLocked]
    for module, name in (("detaudit.ingest", "IngestError"), ("local_backend.config", "ModelLoadError")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            errors.append(getattr(loaded, name))
    return tuple(errors)


def guard(command: Callable) -> Callable:
    """Turn expected errors into one red line and an exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except RunFailed as exc:
            fail(str(exc), 1)
        except (KeyboardInterrupt, Terminated) as exc:
            stderr.print("[yellow]interrupted[/]")
            raise typer.Exit(interrupt_code(exc)) from None
        except Exception as exc:
            if isinstance(exc, usage_errors()):
                fail(str(exc), 2)
            raise

    return wrapper
