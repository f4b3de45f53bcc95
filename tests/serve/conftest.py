"""``detaudit serve`` as a real subprocess on 127.0.0.1 (port 0: the URL it prints
says which port), and ``detaudit`` commands run as subprocesses against it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers.serve_process import ROOT, Server, cli_env  # noqa: F401 (Server: re-exported)

COIN = [{"role": "user", "content": "Flip a coin. Return Heads or Tails only."}]


def detaudit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI as a user would; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "detaudit.cli", *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def json_out(proc: subprocess.CompletedProcess) -> dict:
    assert proc.stdout.strip(), f"no JSON on stdout; stderr:\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def server_default():
    """Plain torch kernels: results depend on the batch."""
    server = Server("--kernels", "default")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server_invariant():
    """Batch-invariant Triton kernels (interpreter on CPU: ~0.3 s per forward)."""
    server = Server("--kernels", "batch-invariant")
    yield server
    server.stop()


@pytest.fixture
def small_load_probe(tmp_path) -> Path:
    """The load-sweep probe with short fillers, so the interpreter keeps up."""
    text = (ROOT / "probes" / "load-sweep.toml").read_text()
    text = text.replace("filler_min_tokens = 8", "filler_min_tokens = 2")
    text = text.replace("filler_max_tokens = 64", "filler_max_tokens = 6")
    path = tmp_path / "small-load.toml"
    path.write_text(text)
    return path
