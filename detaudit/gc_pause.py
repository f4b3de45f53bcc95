"""The cyclic garbage collector paused while a run becomes columns or frames: those
steps make millions of tuples and lists but no cycle, and each collection would walk
every one of them again (seconds for a run of a million samples)."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def collector_paused():
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
