"""Per-forward-pass memo of attention plans, shared by both kernel modes.

Every layer of one forward pass gets the very same ``slots`` and ``positions``
tensors, so whatever an attention op derives from them (tile lists, padded
layouts, lengths that need a device -> host copy) can be computed once per pass
instead of once per layer. Inside ``one_plan_per_pass()`` a plan is reused
while the same tensor objects come back; outside it, every call plans afresh,
because only the caller knows that the tensors do not change in between.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch


class _PassMemo:
    def __init__(self):
        self.depth = 0
        self.plans: dict[str, tuple[tuple, Any]] = {}
        # True inside a decode pass: every token is the one new token of its own
        # sequence. Attention may then plan on the device, with no device -> host
        # copy, which is what lets a decode step be captured in a CUDA graph.
        self.decode_only = False

    def get(self, name: str, key: tuple, build: Callable[[], Any]) -> Any:
        """The plan called ``name`` for ``key`` (tensors compared by identity, the
        rest by value), built by ``build()`` unless this pass already has it."""
        if self.depth and name in self.plans:
            old_key, plan = self.plans[name]
            if len(old_key) == len(key) and all(
                    a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(old_key, key)):
                return plan
        plan = build()
        if self.depth:
            self.plans[name] = (key, plan)
        return plan


memo = _PassMemo()


@contextlib.contextmanager
def one_plan_per_pass(decode_only: bool = False):
    """Reuse attention plans while the same slots/positions tensors come back (one
    forward pass). The caller promises not to change them in place meanwhile, and,
    with ``decode_only``, that each token is its sequence's only token in the pass
    (the caller has checked the indices: a device plan cannot)."""
    memo.depth += 1
    outer = memo.decode_only
    memo.decode_only = decode_only
    try:
        yield
    finally:
        memo.depth -= 1
        memo.decode_only = outer
        if not memo.depth:
            memo.plans.clear()
