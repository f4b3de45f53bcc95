"""Python's cyclic collector in a process that runs the engine.

Every collection of the oldest generation walks every tracked object: the model's
modules and parameters, the tokenizer's tables, CUDA graph handles, and the results a
run accumulates. A decode step on a GPU lasts a few milliseconds, so such walks show
as a spread in throughput. ``freeze_startup_objects`` (as vLLM and SGLang do once
start-up is over) moves what exists after loading into the permanent generation, which
collections skip; only what was made since (requests, tokens, results) is walked.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Collect once, then exempt every object alive now from later collections.
    Call after the engine is loaded (and warmed), not per request: frozen objects are
    never freed by the collector, so freeze only what lives as long as the process."""
    gc.collect()
    gc.freeze()
