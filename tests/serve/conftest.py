"""``detaudit serve`` as a real subprocess on 127.0.0.1 (port 0: the URL it prints
says which port), and ``detaudit`` commands run as subprocesses against it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
COIN = [{"role": "user", "content": "Flip a coin. Return Heads or Tails only."}]


def cli_env() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), COLUMNS="120")
    env.pop("OPENAI_API_KEY", None)
    env.pop("OPENAI_BASE_URL", None)
    return env


class Server:
    """A running ``detaudit serve``: ``url`` (…/v1), ``root`` (no /v1), ``stderr`` lines."""

    def __init__(self, *args: str, startup_s: float = 120.0):
        self.args = ["--port", "0", *args]
        self.proc = subprocess.Popen([sys.executable, "-m", "detaudit.cli", "serve", *self.args],
                                     cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        self._ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(startup_s) or not self.url:
            self.stop()
            raise RuntimeError("detaudit serve did not start:\n" + "".join(self.stderr))
        self.root = self.url.removesuffix("/v1")
        deadline = time.monotonic() + 30
        while httpx.get(self.root + "/health").status_code != 200:
            assert time.monotonic() < deadline, "/health never answered 200"
            time.sleep(0.1)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            if " at http://" in line and not self.url:
                self.url = line.split(" at ", 1)[1].split()[0]
                self._ready.set()
        self._ready.set()

    def health(self) -> dict:
        return httpx.get(self.root + "/health").json()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


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
