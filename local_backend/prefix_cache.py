"""A prefix cache over the slot KV cache: a request whose prompt starts with blocks
already computed skips their prefill, and gets the same bits as with the cache off.

Prompts are cut into blocks of BLOCK tokens from position 0; block i's key is a
hash of block i - 1's key and block i's tokens (vLLM's block hashes), so one key
names a whole prefix. The index maps a key to the slot whose positions
[i * BLOCK, (i + 1) * BLOCK) hold that prefix's K/V; a freed slot keeps its
K/V (and its keys) until it is handed out again. On admission the longest run of
indexed blocks is copied into the new slot (nothing is copied when the new slot is
the one that holds them) and only the rest of the prompt is prefilled; the last
prompt token is always computed, since its logits give the first token.

Why the bits do not change: with batch-invariant kernels a token's K/V depends only
on the tokens up to it, never on the pass that computed it (prefill = decode, alone =
batched), and attention cuts every sweep into chunks and splits at fixed positions
(BLOCK_N, SPLIT), so a suffix token reads the cached keys in the same chunks, folded
in the same order, as it would after a full prefill. With the default kernels
neither holds, so there the cache changes numbers (as it does on other servers).
"""

from __future__ import annotations

import hashlib

from local_backend.kv_cache import KVCache

BLOCK = 16  # tokens per hashed block


def block_keys(ids: list[int], block: int = BLOCK) -> list[bytes]:
    """Chained keys of the full blocks of ``ids``: key i names ids[: (i + 1) * block]."""
    keys, parent = [], b""
    for start in range(0, len(ids) - block + 1, block):
        parent = hashlib.sha256(parent + b"".join(t.to_bytes(4, "little") for t in ids[start:start + block])).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    def __init__(self, cache: KVCache, block: int = BLOCK):
        self.cache, self.block = cache, block
        self._where: dict[bytes, int] = {}        # key -> slot holding that block (at its own position)
        self._keys: dict[int, set[bytes]] = {}    # slot -> keys it holds
        self.hit_tokens = 0                       # prompt tokens taken from the cache, in all
        self.prompt_tokens = 0

    def admit(self, prompt_ids: list[int]) -> tuple[int, int]:
        """(slot, tokens already cached) for a new request: takes a free slot and copies
        the longest cached prefix into it (at most all but the last prompt token)."""
        keys = block_keys(prompt_ids[:len(prompt_ids) - 1], self.block)
        hits: list[int] = []  # source slot of block 0, 1, ...
        for key in keys:
            if key not in self._where:
                break
            hits.append(self._where[key])
        wanted = set(keys[:len(hits)])

        def cost(s: int) -> tuple[int, int, int]:  # (indexed blocks lost, blocks to copy, slot)
            held = self._keys.get(s, set())
            return len(held - wanted), sum(src != s for src in hits), s
        slot = self.cache.allocate(min(self.cache.free_list(), key=cost))
        start = 0
        for i in range(1, len(hits) + 1):  # one copy per run of blocks from the same slot
            if i == len(hits) or hits[i] != hits[start]:
                if hits[start] != slot:
                    self._copy(hits[start], slot, start * self.block, i * self.block)
                start = i
        self.forget(slot)  # past the copied prefix, the old content will be overwritten
        self._index(slot, keys[:len(hits)])
        cached = len(hits) * self.block
        self.hit_tokens += cached
        self.prompt_tokens += len(prompt_ids)
        return slot, cached

    def forget(self, slot: int) -> None:
        """``slot`` is about to be overwritten by something other than admit()."""
        for key in self._keys.pop(slot, set()):
            if self._where.get(key) == slot:
                del self._where[key]

    def record(self, slot: int, ids: list[int]) -> None:
        """ids[:n] have their K/V in ``slot`` at positions 0..n-1 (after a pass wrote them)."""
        self._index(slot, block_keys(ids, self.block))

    def _index(self, slot: int, keys: list[bytes]) -> None:
        for key in keys:
            self._where[key] = slot
            self._keys.setdefault(slot, set()).add(key)

    def _copy(self, src: int, dst: int, begin: int, end: int) -> None:
        span = slice(begin, end)
        for layer in range(len(self.cache.k)):
            self.cache.k[layer][dst, span] = self.cache.k[layer][src, span]
            self.cache.v[layer][dst, span] = self.cache.v[layer][src, span]

    def stats(self) -> dict[str, int]:
        return {"prefix_hit_tokens": self.hit_tokens, "prompt_tokens": self.prompt_tokens,
                "indexed_blocks": len(self._where)}

