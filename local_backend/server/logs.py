"""Rate-limited error logging: a flood of bad connections or failing requests must
not flood stderr (one such flood once wrote 243 MB of tracebacks in a minute).

Each kind of message (its key) gets at most ``burst`` lines per ``window_s``; the
rest are counted, and the next line of that kind after the window says how many
were left out. One limiter serves the app's tracebacks, uvicorn's and asyncio's
loggers, and the event loop's exception handler.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class _Window:
    start: float
    shown: int = 0
    suppressed: int = 0


class RateLimiter:
    def __init__(self, burst: int = 5, window_s: float = 10.0,
                 write: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self.write = write or (lambda text: print(text, file=sys.stderr, flush=True))
        self.suppressed_total = 0
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """True when a message of this kind may be written now."""
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window.start >= self.window_s:
                if window is not None and window.suppressed:
                    self.write(f"({window.suppressed} more messages like {key[:80]!r} were "
                               f"left out in {self.window_s:g} s)")
                if len(self._windows) > 1000:  # keys are message kinds; bound them anyway
                    self._windows.clear()
                window = self._windows[key] = _Window(now)
            if window.shown < self.burst:
                window.shown += 1
                return True
            window.suppressed += 1
            self.suppressed_total += 1
            return False

    def log(self, key: str, text: str) -> None:
        if self.allow(key):
            self.write(text)

    def logging_filter(self) -> logging.Filter:
        """A filter for a logger: records of the same message template share a budget."""
        limiter = self

        class _Filter(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                return limiter.allow(f"{record.name}: {record.msg}")

        return _Filter()

    def install(self, loop: asyncio.AbstractEventLoop, loggers: tuple[str, ...]) -> None:
        """Route the loop's exception handler and the named loggers through this limiter."""
        def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
            exc = context.get("exception")
            key = f"asyncio: {context.get('message')} {type(exc).__name__ if exc else ''}"
            if self.allow(key):
                loop.default_exception_handler(context)

        loop.set_exception_handler(handle)
        for name in loggers:
            logging.getLogger(name).addFilter(self.logging_filter())
