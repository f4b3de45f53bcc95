"""Helpers for the insight tests: the real CLI in-process, runs against the fake server."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from detaudit.cli import app

MODEL = "gpt-4o-mini"


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def make_run(fake, out: Path, *args) -> Path:
    """One complete run against the fake server; returns its folder."""
    before = set(out.iterdir()) if out.exists() else set()
    result = cli("run", "--model", MODEL, "--base-url", fake.url, "--out", out, "--quiet",
                 "--concurrency", "4", *args)
    assert result.exit_code == 0, result.stderr
    (run_dir,) = set(out.iterdir()) - before
    return run_dir


def stored_rows(run_dir: Path) -> list[dict]:
    """The stored samples, read straight from SQLite (not through detaudit)."""
    with sqlite3.connect(run_dir / "samples.sqlite") as conn:
        rows = conn.execute("SELECT idx, status, output, system_fingerprint, positions "
                            "FROM sample_rows ORDER BY idx").fetchall()
    return [{"idx": i, "status": s, "output": o, "fp": fp, "positions": json.loads(p or "[]")}
            for i, s, o, fp, p in rows]


def top_logprob(row: dict, token: str, position: int = 0) -> float | None:
    """The float of ``token``'s logprob text in the stored top-k, or None."""
    for entry in row["positions"][position]["top"]:
        if entry["token"] == token:
            return float(entry["logprob_text"])
    return None
