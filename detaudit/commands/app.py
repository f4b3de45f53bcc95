"""The typer app every command registers on, and ``guard``: the one place where expected
errors become one red line and an exit code (0 ok, 1 the run failed, 2 usage error,
130 interrupted by Ctrl-C, 143 by SIGTERM), never a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import typer

from detaudit import __version__
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


# Expected errors, by the module that defines them: bad input (exit 2), a failed run
# (exit 1), SIGTERM (143). They are looked up among the loaded modules only (an error
# of a module never imported cannot have been raised), so --help imports none of them.
USAGE_ERRORS = {"detaudit.session": "UsageProblem", "detaudit.probes": "ProbeError",
                "detaudit.ingest": "IngestError", "detaudit.store": "StoreError",
                "detaudit.backends.base": "BackendError", "detaudit.budget": "BudgetError",
                "detaudit.runlock": "RunLocked", "local_backend.config": "ModelLoadError",
                "detaudit.html_report": "HtmlReportError"}
RUN_FAILED = ("detaudit.runner", "RunFailed")
TERMINATED = ("detaudit.session", "Terminated")


def _loaded(*where: tuple[str, str]) -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in where
                 if module in sys.modules)


def usage_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean bad input (exit 2), of the modules loaded."""
    return _loaded(*USAGE_ERRORS.items())


def interrupt_code(exc: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(exc, _loaded(TERMINATED)) else EXIT_INTERRUPTED


def guard(command: Callable) -> Callable:
    """Turn expected errors into one red line and an exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            stderr.print("[yellow]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if isinstance(exc, _loaded(TERMINATED)):
                stderr.print("[yellow]interrupted[/]")
                raise typer.Exit(EXIT_TERMINATED) from None
            if isinstance(exc, _loaded(RUN_FAILED)):
                fail(str(exc), 1)
            if isinstance(exc, usage_errors()):
                fail(str(exc), 2)
            raise

    return wrapper
