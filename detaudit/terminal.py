"""The CLI's output conventions, in one place for every command module: logs,
progress and errors on stderr; results on stdout; errors as one red line. Every
text printed on stderr goes through ``redact`` first, so no secret reaches it."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console

from detaudit.redact import redact


class _RedactingConsole(Console):
    """A rich console whose printed strings pass through ``redact``."""

    def print(self, *objects: Any, **kwargs: Any) -> None:  # noqa: A003 (rich's name)
        super().print(*(redact(o) if isinstance(o, str) else o for o in objects), **kwargs)


stderr = _RedactingConsole(stderr=True, highlight=False)


def fail(message: str, code: int) -> None:
    """One red line on stderr (the message is data, not rich markup), then exit."""
    stderr.print("[bold red]error:[/] ", end="")
    stderr.print(message, markup=False, style="red", soft_wrap=True)
    raise typer.Exit(code)


def threshold_option(value: float | None) -> float | None:
    """typer callback of every --threshold-pct: inf or NaN is a usage error (exit 2)."""
    from detaudit.analysis.summary import check_threshold

    if value is None:
        return None
    try:
        return check_threshold(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def print_json(data: dict[str, Any]) -> None:
    """Exactly one JSON object on stdout: no NaN, nothing else."""
    sys.stdout.write(json.dumps(data, allow_nan=False, ensure_ascii=False) + "\n")
    sys.stdout.flush()
