"""Copies between host and device that do not make the host wait: what lets the
engine prepare decode step N+1 while step N still runs on the GPU (overlap
scheduling, as vLLM's and SGLang's async schedulers do).

A blocking copy (``tensor.cpu()``, ``torch.tensor(..., device="cuda")``) waits for
every kernel queued before it, so the host could not get ahead of the GPU. Here a
step's inputs go up from pinned memory without waiting (``to_device``), and its
packed picks come down into pinned memory behind a CUDA event (``PicksInFlight``),
read only when the host needs them, after the next step is launched. On a CPU the
same calls are plain copies: the scheduling is the same, only nothing runs ahead.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Copy a host tensor into ``out`` (on the device) without waiting for the device."""
    if out.is_cuda:
        out.copy_(host.pin_memory(), non_blocking=True)  # the pinned block is kept until the copy is done
    else:
        out.copy_(host)
    return out


class PicksInFlight:
    """One pass's packed picks (``Engine._pick_launch``) on their way to the host.

    ``deferred``: the copy runs behind the device's queue and ``rows()`` waits for it;
    otherwise it was copied at once. ``tokens`` (deferred only): the chosen token ids
    on the device, one more 0 at the end (padding rows' token), for the next step to
    read without a round trip. ``tie_rows``: logprobs rows to re-sort exactly when a
    top-k tie crosses the k-th place (a copy when deferred: a graph's output buffer is
    overwritten by the next replay)."""

    def __init__(self, packed: torch.Tensor, width: int, k: int, tie_rows: torch.Tensor,
                 tokens: torch.Tensor | None = None):
        self.width, self.k, self.tie_rows, self.tokens = width, k, tie_rows, tokens
        self.deferred = tokens is not None
        self._ready = None
        if self.deferred and packed.is_cuda:
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = packed.cpu()

    def rows(self) -> list[list[float]]:
        if self._ready is not None:
            self._ready.synchronize()  # this pass's work only, not what was queued after it
        return self._host.tolist()
