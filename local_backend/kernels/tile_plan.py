"""Which tokens share a tile: the host plan of a mixed pass, for both attention kernels
(``attention.py``'s and ``attention_hopper.py``'s)."""

from __future__ import annotations

import torch


def build_tiles(slots: list[int], BLOCK_M: int) -> torch.Tensor:
    """[num_tiles, BLOCK_M] token indices, each row from one sequence, -1 as padding
    (on the CPU, from a host list of slots). Sequences in slot order, each one's tiles
    filled with its tokens in batch order.

    Which tile or row a token lands in does not change its result (see the module
    docstring of attention.py). Plain Python: torch's CPU ops on a few thousand indices cost more in
    thread-pool dispatch (ms on a many-core host) than the work itself.
    """
    tokens_of: dict[int, list[int]] = {}
    for token, slot in enumerate(slots):
        tokens_of.setdefault(slot, []).append(token)
    rows: list[int] = []
    for slot in sorted(tokens_of):
        tokens = tokens_of[slot]
        rows += tokens
        rows += [-1] * (-len(tokens) % BLOCK_M)
    return torch.tensor(rows, dtype=torch.int64).view(-1, BLOCK_M)


_sm_count: dict[torch.device, int] = {}


def sm_count(device: torch.device) -> int:
    """The GPU's multiprocessors (cached: asked in every layer of every pass)."""
    if device not in _sm_count:
        _sm_count[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_count[device]
