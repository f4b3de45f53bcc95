"""Decode steps padded to fixed batch-size buckets and, on a GPU, replayed from a
CUDA graph captured once per bucket.

A decode step of n requests (each contributes its one new token) runs at the
smallest bucket b >= n. Rows n .. b-1 are padding: their tokens write K/V into a
scratch slot that no request owns, at position 0, and their outputs are dropped.
With batch-invariant kernels a row's bits depend on that row alone, so the bucket
a request lands in never changes them (tests/local/test_decode_buckets.py checks
it). On a GPU each bucket's pass (model, logits, log-softmax) is captured once into
a CUDA graph over static input buffers and then replayed: one launch instead of the
~400 Python-side launches of an eager step, and attention plans on the device
(``one_plan_per_pass(decode_only=True)``), so nothing in the pass waits on the host.
"""

from __future__ import annotations

import torch

from local_backend.kernels import Ops
from local_backend.kv_cache import KVCache
from local_backend.overlap import to_device

MODES = ("auto", "on", "off", "buckets")  # auto: graphs on a GPU, off elsewhere; buckets: padding, no graph


def bucket_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 (of 16 past 64, of 32 past 256), ending at max_rows."""
    sizes, b = [], 1
    while b < max_rows:
        sizes.append(b)
        b = b * 2 if b < 8 else b + (8 if b < 64 else 16 if b < 256 else 32)
    return sizes + [max_rows]


class DecodeRunner:
    def __init__(self, model, ops: Ops, cache: KVCache, scratch_slot: int, max_rows: int,
                 device: torch.device, graphs: bool):
        self.model, self.ops, self.cache, self.device = model, ops, cache, device
        self.scratch_slot, self.graphs = scratch_slot, graphs
        self.buckets = bucket_sizes(max_rows)
        # rows: token ids, slots, positions; buckets read the first b columns
        self._inputs = torch.zeros((3, max_rows), dtype=torch.long, device=device)
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None
        self.replays = 0  # decode steps run from a graph (or, without graphs, padded eagerly)

    @property
    def captured(self) -> list[int]:
        """The buckets that have a CUDA graph so far."""
        return sorted(self._captured)

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} decode rows but the largest bucket is {self.buckets[-1]}")

    def padded(self, token_ids: list[int], slots: list[int], positions: list[int], fill: int = 0) -> torch.Tensor:
        """[3, bucket] host tensor: the step's rows, then padding rows (token ``fill``) in the scratch slot."""
        pad = self.bucket(len(token_ids)) - len(token_ids)
        return torch.tensor([token_ids + [fill] * pad, slots + [self.scratch_slot] * pad, positions + [0] * pad],
                            dtype=torch.long)

    def run(self, token_ids: list[int], slots: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits fp32, logprobs) [n, vocab] of one decode step of n rows."""
        n = len(token_ids)
        self.replays += 1
        host = self.padded(token_ids, slots, positions)
        b = host.shape[1]
        if not self.graphs:
            ids, sl, pos = host.to(self.device)
            logits, logprobs = self._forward(ids, sl, pos)
            return logits[:n], logprobs[:n]
        if b not in self._captured:
            self.capture(b)
        graph, logits, logprobs = self._captured[b]
        self._inputs[:, :b].copy_(host)
        graph.replay()
        return logits[:n], logprobs[:n]

    def run_fed(self, tokens: torch.Tensor, source: list[int], slots: list[int],
                positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``run``, but row i's token id is ``tokens[source[i]]``, already on the device
        (the previous step's picks; its last element is the padding rows' 0). Nothing
        here waits for the device, so the host can queue this step while the last runs."""
        n = len(source)
        self.replays += 1
        host = self.padded(source, slots, positions, fill=tokens.shape[0] - 1)
        b = host.shape[1]
        if self.graphs and b not in self._captured:
            self.capture(b)
        inputs = to_device(host, self._inputs[:, :b])  # row 0: where each row's token is, for now
        inputs[0].copy_(tokens.index_select(0, inputs[0]))
        if not self.graphs:
            logits, logprobs = self._forward(inputs[0], inputs[1], inputs[2])
            return logits[:n], logprobs[:n]
        graph, logits, logprobs = self._captured[b]
        graph.replay()
        return logits[:n], logprobs[:n]

    def capture_all(self) -> None:
        """Capture every bucket now (largest first, as the memory pool prefers), so
        that no request waits for a capture later."""
        for b in reversed(self.buckets):
            if b not in self._captured:
                self.capture(b)

    def capture(self, b: int) -> None:
        """Warm the bucket's kernels up eagerly (Triton compiles outside the capture),
        then capture its pass. Inputs are all padding meanwhile: no request's K/V is touched."""
        self._inputs[0].zero_()
        self._inputs[1].fill_(self.scratch_slot)
        self._inputs[2].zero_()
        ids, sl, pos = self._inputs[0, :b], self._inputs[1, :b], self._inputs[2, :b]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(ids, sl, pos)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits, logprobs = self._forward(ids, sl, pos)
        self._pool = graph.pool()
        self._captured[b] = (graph, logits, logprobs)

    def _forward(self, ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor):
        hidden = self.model(ids, slots, positions, self.cache, self.ops, decode_only=True)
        logits = self.model.logits(hidden, self.ops).float()
        return logits, self.ops.log_softmax(logits)
