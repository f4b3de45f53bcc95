"""``detaudit serve`` as a real subprocess on 127.0.0.1 (port 0: the URL it prints
says which port). Shared by the serve tests, the reliability tests and the benches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def cli_env() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), COLUMNS="120")
    env.pop("OPENAI_API_KEY", None)
    env.pop("OPENAI_BASE_URL", None)
    return env


class Server:
    """A running ``detaudit serve``: ``url`` (…/v1), ``root`` (no /v1), ``stderr`` lines."""

    def __init__(self, *args: str, startup_s: float = 120.0, open_files: int | None = None):
        """``open_files``: the server's limit on open files (ulimit -n), soft and hard."""
        self.args = ["--port", "0", *args]
        limit = None
        if open_files is not None:
            import resource
            limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))  # noqa: E731
        self.proc = subprocess.Popen([sys.executable, "-m", "detaudit.cli", "serve", *self.args],
                                     cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=limit)
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

    @property
    def address(self) -> tuple[str, int]:
        """(host, port), for raw sockets."""
        host, port = self.root.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

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

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
