"""``transformers serve``: a real third-party OpenAI-compatible server, on 127.0.0.1.

It serves the bundled tiny model folder with continuous batching on the CPU, names
the model by its folder path (as vLLM and SGLang do) and ignores ``logprobs``: the
setup a user meets when auditing a self-hosted server. Port 0: the port is read from
uvicorn's "Uvicorn running on http://127.0.0.1:PORT" line. Needs the test extra
(fastapi, accelerate, uvicorn: ``pip install -e '.[test]'``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "local_backend" / "models" / "tiny"
# A small paged KV cache: sized by default from a share of memory, its first allocation
# took 20-35 s of the first request on a 2-core CPU; 128 blocks take ~2 s and hold the
# tests' requests (16 in flight x ~120 tokens) many times over.
CACHE_BLOCKS = 128
_RUNNING = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")


class TransformersServe:
    """``url`` (…/v1), ``model`` (the name it serves: the folder path), ``log`` lines.

    Ready means: the port is open, /health answers 200 and one chat request has been
    answered (the first one builds the continuous-batching manager), so tests do not
    pay that start-up cost themselves."""

    def __init__(self, model: Path = TINY, startup_s: float = 240.0):
        self.model = str(model)
        self.log: list[str] = []
        self.url = ""
        self._ready = threading.Event()
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "transformers.cli.transformers", "serve", self.model,
             "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
             "--log-level", "info", "--cb-num-blocks", str(CACHE_BLOCKS)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + startup_s
        try:
            if not self._ready.wait(startup_s) or not self.url:
                raise RuntimeError("transformers serve did not start")
            root = self.url.removesuffix("/v1")
            while _status(root + "/health") != 200:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("/health never answered 200")
                time.sleep(0.2)
            self.warm_up(timeout=max(1.0, deadline - time.monotonic()))
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{exc}; its output:\n" + "".join(self.log[-40:])) from None

    def warm_up(self, timeout: float) -> None:
        response = httpx.post(f"{self.url}/chat/completions", timeout=timeout, json={
            "model": self.model, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]})
        response.raise_for_status()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            match = _RUNNING.search(line)
            if match and not self.url:
                self.url = match.group(1) + "/v1"
                self._ready.set()
        self._ready.set()  # it ended: wake the waiter

    def stop(self) -> int:
        """SIGTERM to its process group (uvicorn and any worker), SIGKILL after 20 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5.0).status_code
    except httpx.HTTPError:
        return None
