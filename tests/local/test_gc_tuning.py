"""``freeze_startup_objects``: what lives at start-up leaves the collections, and garbage
made afterwards (a request's reference cycles) is still collected."""

from __future__ import annotations

import gc
import weakref

from local_backend.gc_tuning import freeze_startup_objects


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_startup_objects_are_frozen_and_later_cycles_still_collected():
    before = gc.get_freeze_count()
    kept = Node()  # alive at "start-up"
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > before
        assert not any(obj is kept for obj in gc.get_objects())  # collections skip it now
        later = Node()
        gone = weakref.ref(later)
        del later
        gc.collect()
        assert gone() is None  # a cycle made after the freeze is freed as before
    finally:
        gc.unfreeze()
