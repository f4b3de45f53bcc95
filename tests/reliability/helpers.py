"""Shared by the reliability tests: the CLI in-process and as a subprocess, and the store
read back with plain sqlite3 (not through detaudit's own reader)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from detaudit.cli import app

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gpt-4o-mini"


def cli(*args, env: dict[str, str] | None = None):
    """The typer app in-process; stdout and stderr apart. Unexpected exceptions re-raise."""
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def remote(fake, out, *args, env: dict[str, str] | None = None):
    return cli("run", "--model", MODEL, "--base-url", fake.url, "--out", out, "--quiet", *args,
               env=env)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120", **extra)
    env.pop("OPENAI_BASE_URL", None)
    return env


def detaudit_command(*args) -> list[str]:
    return [sys.executable, "-m", "detaudit.cli", *map(str, args)]


def run_detaudit(*args, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(detaudit_command(*args), cwd=ROOT, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def only_run(out: Path) -> Path:
    (run_dir,) = [p for p in Path(out).iterdir() if p.is_dir()]
    return run_dir


def rows(run_dir: Path, sql: str, *params) -> list[tuple]:
    conn = sqlite3.connect(Path(run_dir) / "samples.sqlite")
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def manifest(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "manifest.json").read_text())
