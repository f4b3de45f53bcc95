"""Shared by the reliability tests: the CLI in-process and as a subprocess, and the store
read back with plain sqlite3 (not through detaudit's own reader)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

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


def stored_count(out: Path) -> int:
    """Samples stored so far in the one run folder under ``out`` (0 before it exists)."""
    runs = list(Path(out).glob("*/samples.sqlite"))
    if not runs:
        return 0
    conn = sqlite3.connect(runs[0])
    try:
        return conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0
    finally:
        conn.close()


def interrupt_after(out, stored: int, *args, sig: int = signal.SIGINT,
                    before_signal: Callable[[subprocess.Popen], None] | None = None
                    ) -> tuple[int, str, str]:
    """Start `detaudit *args` as a subprocess, send ``sig`` (Ctrl-C by default) once
    ``stored`` samples are in the store under ``out``, and return (exit code, stdout,
    stderr). ``before_signal`` sees the running process just before the signal."""
    proc = subprocess.Popen(detaudit_command(*args), cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and stored_count(out) < stored and proc.poll() is None:
            time.sleep(0.02)
        if before_signal is not None:
            before_signal(proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc.returncode, stdout, stderr
