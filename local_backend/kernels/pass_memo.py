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
def one_plan_per_pass():
    """Reuse attention plans while the same slots/positions tensors come back (one
    forward pass). The caller promises not to change them in place meanwhile."""
    memo.depth += 1
    try:
        yield
    finally:
        memo.depth -= 1
        if not memo.depth:
            memo.plans.clear()
