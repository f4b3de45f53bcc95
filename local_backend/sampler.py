"""Greedy and seeded sampling whose result depends only on the row's logits and on
(seed, position): never on the batch, the slot, or the row's place in the batch.

Probabilities are computed one row at a time (``ops.log_softmax`` of that row alone,
then exp in float64), so the row's numbers do not depend on its neighbours. The
random draw for a position is a hash of (seed, position), not a generator shared by
the batch: the same seed reproduces a completion in any batch.
"""

from __future__ import annotations

import hashlib
import secrets

import torch

from local_backend.kernels import Ops


def uniform(seed: int | None, position: int) -> float:
    """A number in [0, 1) fixed by (seed, position); fresh randomness when seed is None."""
    if seed is None:
        return secrets.randbits(53) / (1 << 53)
    digest = hashlib.sha256(f"detaudit-sampler:{seed}:{position}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / (1 << 53)


def greedy(logprobs: torch.Tensor) -> int:
    """argmax of one row; ties go to the lowest token id."""
    best = logprobs.max()
    return int(torch.nonzero(logprobs == best)[0, 0])


def sample(logits: torch.Tensor, logprobs: torch.Tensor, ops: Ops, temperature: float,
           top_p: float, seed: int | None, position: int) -> int:
    """One token from one row. ``logprobs`` (temperature-free) decide greedy picks;
    otherwise ``logits`` / temperature, cut to the top_p nucleus, and a seeded draw."""
    if temperature <= 0:
        return greedy(logprobs)
    scaled = ops.log_softmax((logits.float() / temperature)[None, :])[0]
    probs = scaled.double().cpu().exp()
    # Most probable first; a stable sort keeps the lower id first among ties.
    probs, ids = torch.sort(probs, descending=True, stable=True)
    cumulative = torch.cumsum(probs, 0)
    if top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (at least one token).
        keep = int((cumulative - probs < top_p).sum().clamp(min=1))
        probs, ids, cumulative = probs[:keep], ids[:keep], cumulative[:keep]
    target = uniform(seed, position) * float(cumulative[-1])
    index = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64), right=True))
    return int(ids[min(index, len(ids) - 1)])
