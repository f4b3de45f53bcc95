"""One process at a time per run folder: an OS lock on ``<run>/run.lock``.

``fcntl.flock`` is held for as long as the process keeps the file open, and the
kernel drops it when the process ends, however it ends (SIGKILL included), so a
lock can never outlive its holder. The file also holds the holder's pid, host,
command and start time, for the message another process prints when it is refused,
and to tell, on taking the lock, that the last holder died without releasing it
(the file still names it) rather than finishing (the file was emptied).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_FILE = "run.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]


class RunLocked(Exception):
    """The run folder cannot be locked: another process has it (the message names it),
    or the lock file cannot be made."""


class RunLock:
    """A held lock; ``release()`` (or process exit) gives it up."""

    def __init__(self, fd: int | None, path: Path, stale: dict[str, Any] | None):
        self.fd, self.path = fd, path
        self.stale = stale  # what a holder that died without releasing left in the file

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # empty: released cleanly, nothing stale
        except OSError:
            pass
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = None


def acquire(folder: str | os.PathLike) -> RunLock:
    """Lock ``folder`` for this process, or raise ``RunLocked`` at once (no waiting)."""
    path = Path(folder) / LOCK_FILE
    if fcntl is None:
        return RunLock(None, path, None)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunLocked(f"{folder}: cannot open the lock file {LOCK_FILE} ({exc.strerror}); "
                        "a run folder must be writable to run or resume") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read(fd)
        os.close(fd)
        raise RunLocked(f"{folder}: in use by {describe(holder)}; wait for it to finish, or "
                        f"stop it{_kill_hint(holder)}, then run this again") from None
    stale = _read(fd) or None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_me()).encode() + b"\n", 0)
    return RunLock(fd, path, stale)


def describe(holder: dict[str, Any] | None) -> str:
    """'pid 123 on host-a (detaudit run --resume), since 2026-...' from a lock file's facts."""
    if not holder:
        return "another detaudit process"
    text = f"pid {holder.get('pid', '?')}"
    if holder.get("host"):
        text += f" on {holder['host']}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    if holder.get("since"):
        text += f", since {holder['since']}"
    return text


def _me() -> dict[str, Any]:
    # The subcommand and --resume only: the full argv could carry a secret.
    words = ["detaudit", *sys.argv[1:2]] + (["--resume"] if "--resume" in sys.argv else [])
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(words),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _kill_hint(holder: dict[str, Any]) -> str:
    if holder.get("pid") and holder.get("host") in (None, socket.gethostname()):
        return f" (kill {holder['pid']})"
    return ""
