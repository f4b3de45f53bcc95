"""The ``detaudit`` command line: one module per command group, each a thin shell over
``detaudit.session`` (the run assembly) and the analysis, registered on one typer app.

    run.py      run (and --resume)
    report.py   report, export, analyze, probes
    insight.py  compare, plot, tokens; run's dry run and cost cap
    serve.py    serve, gate
    matrix.py   matrix
    crosscheck.py  crosscheck (server logprobs vs a teacher-forced reference)

Conventions: logs, progress and errors go to stderr; results (the report, JSON, file
paths) go to stdout. ``--json`` prints exactly one JSON object on stdout. Exit codes:
0 ok, 1 the run failed, 2 usage error (bad flag, malformed probe or input file,
unreadable run folder, a run folder in use), 3 gate (or crosscheck --max-abs-diff) beyond limits, 4 compare differs,
130 interrupted by Ctrl-C, 143 by SIGTERM. Heavy libraries (pandas, scipy, torch,
openai, matplotlib) are imported by the commands that use them, so --help is instant.
"""

from __future__ import annotations

import sys
import traceback

from detaudit.commands import crosscheck, insight, matrix, report, run, serve
from detaudit.commands.app import app, guard
from detaudit.redact import redact

for _group in (run, report, insight, serve, crosscheck, matrix):
    _group.register(app, guard)

__all__ = ["app", "main"]


def main() -> None:
    """The console script. A traceback (always a bug) is printed redacted too."""
    try:
        app()
    except Exception:  # SystemExit and KeyboardInterrupt pass through
        sys.stderr.write(redact(traceback.format_exc()))
        sys.exit(1)
