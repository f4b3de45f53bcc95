"""A preallocated KV cache: per layer, K and V of shape [slots, max_len, Hkv, head_dim].

Each running sequence owns one slot; a token's K/V live at [slot, position]. Slots
are handed out lowest first, so the same sequence of requests uses the same slots.
Which slot a request gets never changes its numbers: attention reads only the
request's own slot, up to its own position.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, max_slots: int, max_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        shape = (max_slots, max_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_slots = max_slots
        self.max_len = max_len
        self._free = list(range(max_slots))

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V [T, Hkv, D] of T tokens at their (slot, position)."""
        self.k[layer][slots, positions] = k
        self.v[layer][slots, positions] = v

    def reserve(self) -> int:
        """Take the highest slot out of service for good: a scratch slot that padding
        rows write into (decode_graphs), which no request is ever given."""
        self._free.sort()
        return self._free.pop()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self, slot: int | None = None) -> int:
        """The lowest free slot, or ``slot`` if it is free (the prefix cache picks one)."""
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        self._free.sort()
        if slot is None:
            return self._free.pop(0)
        self._free.remove(slot)
        return slot

    def free_list(self) -> list[int]:
        """The free slots, lowest first."""
        return sorted(self._free)

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.max_slots:
            raise RuntimeError(f"slot {slot} is not allocated")
        self._free.append(slot)
