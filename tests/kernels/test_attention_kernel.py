"""attention: correct against a float64 reference, and a query token's output is
the same bits alone, in any batch, at any position in the batch, and in prefill
or in decode."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import DEVICE, DTYPES, assert_close_to, randn
from local_backend.kernels import attention as attention_module
from local_backend.kernels.attention import BLOCK_N, SPLIT, tile_config

S, L = 4, 160              # cache slots and their length
HQ, HKV, D = 6, 2, 40      # GQA group of 3 (not a power of two), head_dim not a power of two
SCALE = D ** -0.5
PROMPT = 70                # spans several query tiles and KV chunks
assert PROMPT > tile_config(HQ // HKV, D, torch.float32)[0] and PROMPT > BLOCK_N


def ints(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int64, device=DEVICE)


def span(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop, device=DEVICE)


def make_cache(gen, dtype, fill=float("nan")):
    """A cache whose unwritten positions hold NaN: any read of them shows up in the output."""
    k = torch.full((S, L, HKV, D), fill, dtype=dtype, device=DEVICE)
    v = torch.full((S, L, HKV, D), fill, dtype=dtype, device=DEVICE)
    return k, v


def write(cache, slot, length, gen, dtype):
    k, v = cache
    k[slot, :length] = randn(length, HKV, D, gen=gen, dtype=dtype)
    v[slot, :length] = randn(length, HKV, D, gen=gen, dtype=dtype)


def reference(q, cache, slots, positions):
    k, v = cache
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for t in range(q.shape[0]):
        keys = k[slots[t], : positions[t] + 1].double().repeat_interleave(HQ // HKV, dim=1)  # [n, HQ, D]
        vals = v[slots[t], : positions[t] + 1].double().repeat_interleave(HQ // HKV, dim=1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[t].double(), keys) * SCALE, dim=-1)
        out[t] = torch.einsum("hn,nhd->hd", weights, vals)
    return out


def needle_setup(gen, dtype):
    """A 70-token prompt in slot 0 plus other sequences of other lengths in slots 1-3."""
    cache = make_cache(gen, dtype)
    for slot, length in [(0, PROMPT), (1, 20), (2, 131), (3, 4)]:
        write(cache, slot, length, gen, dtype)
    needle_q = randn(PROMPT, HQ, D, gen=gen, dtype=dtype)
    # Other tokens: a 20-token prefill (slot 1) and two decode tokens (slots 2 and 3).
    other_slots = ints([1] * 20 + [2, 3])
    other_pos = torch.cat([span(0, 20), ints([130, 3])])
    other_q = randn(len(other_slots), HQ, D, gen=gen, dtype=dtype)
    return cache, needle_q, other_q, other_slots, other_pos


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_float64_reference(bi, gen, dtype):
    cache, needle_q, other_q, other_slots, other_pos = needle_setup(gen, dtype)
    q = torch.cat([needle_q, other_q])
    slots = torch.cat([ints([0] * PROMPT), other_slots])
    positions = torch.cat([span(0, PROMPT), other_pos])
    out = bi.attention(q, *cache, slots, positions, SCALE)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_to(out, reference(q, cache, slots, positions), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_is_batch_invariant(bi, gen, dtype):
    cache, needle_q, other_q, other_slots, other_pos = needle_setup(gen, dtype)
    needle_slots = ints([0] * PROMPT)
    alone = bi.attention(needle_q, *cache, needle_slots, span(0, PROMPT), SCALE)
    assert torch.isfinite(alone).all(), "read an unwritten (NaN) cache position"

    # Other sequences in the batch, every token at a shuffled position.
    q = torch.cat([needle_q, other_q])
    slots = torch.cat([needle_slots, other_slots])
    positions = torch.cat([span(0, PROMPT), other_pos])
    for _ in range(2):
        perm = torch.randperm(len(q), generator=gen).to(DEVICE)
        out = bi.attention(q[perm], *cache, slots[perm], positions[perm], SCALE)
        needle_rows = (perm < PROMPT).nonzero().squeeze(1)
        assert torch.equal(out[needle_rows], alone[perm[needle_rows]])

    # The same prompt in another slot of the cache.
    k, v = cache
    k[3], v[3] = k[0], v[0]
    moved = bi.attention(needle_q, k, v, ints([3] * PROMPT), span(0, PROMPT), SCALE)
    assert torch.equal(moved, alone)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_equals_decode_and_chunked_prefill(bi, gen, dtype):
    cache, needle_q, other_q, _, _ = needle_setup(gen, dtype)
    alone = bi.attention(needle_q, *cache, ints([0] * PROMPT), span(0, PROMPT), SCALE)

    # Decode: one needle token per step, next to a decode token of another sequence.
    for p in range(PROMPT):
        q = torch.stack([other_q[-1], needle_q[p]]) if p % 2 else torch.stack([needle_q[p], other_q[-1]])
        out = bi.attention(q, *cache, ints([3, 0] if p % 2 else [0, 3]),
                           ints([3, p] if p % 2 else [p, 3]), SCALE)
        assert torch.equal(out[p % 2], alone[p]), f"decode of position {p} differs from prefill"

    # Chunked prefill: 30 tokens, then the other 40.
    first = bi.attention(needle_q[:30], *cache, ints([0] * 30), span(0, 30), SCALE)
    rest = bi.attention(needle_q[30:], *cache, ints([0] * (PROMPT - 30)),
                        span(30, PROMPT), SCALE)
    assert torch.equal(torch.cat([first, rest]), alone)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_kv_is_the_same_bits_as_one_pass(gen, dtype):
    """A sequence over two split boundaries: the single-pass kernel (folding its
    state at each boundary) and split-KV (one program per split, folded by a
    second kernel) give the same bits, in prefill and in decode, alone and
    batched; and both are right."""
    length = 2 * SPLIT + 37
    k = randn(2, length, HKV, D, gen=gen, dtype=dtype)
    v = randn(2, length, HKV, D, gen=gen, dtype=dtype)
    q = randn(length, HQ, D, gen=gen, dtype=dtype)
    slots, positions = ints([1] * length), span(0, length)
    run = lambda *args, split: attention_module.attention(*args, SCALE, split_kv=split)  # noqa: E731
    one_pass = run(q, k, v, slots, positions, split=False)
    assert torch.equal(run(q, k, v, slots, positions, split=True), one_pass)
    for p in [SPLIT - 1, SPLIT, 2 * SPLIT + 1, length - 1]:
        # decode of position p, alone and next to a short decode token in slot 0
        for split in (False, True):
            alone = run(q[p:p + 1], k, v, ints([1]), ints([p]), split=split)
            batched = run(torch.stack([q[0], q[p]]), k, v, ints([0, 1]), ints([5, p]), split=split)
            assert torch.equal(alone[0], one_pass[p]), f"decode of {p} (split_kv={split}) differs from prefill"
            assert torch.equal(batched[1], one_pass[p])
    rows = torch.tensor([0, SPLIT, length - 1])
    assert_close_to(one_pass[rows], reference(q[rows], (k, v), slots[rows], positions[rows]), dtype)


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (8, 1, 16), (2, 1, 256)])
def test_attention_head_layouts(bi, gen, hq, hkv, d):
    """Plain multi-head, multi-query, and the largest head_dim."""
    k, v = randn(2, 24, hkv, d, gen=gen), randn(2, 24, hkv, d, gen=gen)
    q = randn(5, hq, d, gen=gen)
    slots, positions = ints([0, 0, 0, 1, 1]), ints([0, 1, 2, 23, 10])
    out = bi.attention(q, k, v, slots, positions, d ** -0.5)
    for t in range(5):
        keys = k[slots[t], : positions[t] + 1].repeat_interleave(hq // hkv, dim=1).double()
        vals = v[slots[t], : positions[t] + 1].repeat_interleave(hq // hkv, dim=1).double()
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[t].double(), keys) * d ** -0.5, dim=-1)
        assert_close_to(out[t], torch.einsum("hn,nhd->hd", w, vals), torch.float32)


def test_negative_control_default_attention_is_not_batch_invariant(default_ops, gen):
    """Padded SDPA reduces over the longest sequence in the batch: a token's output
    changes with its neighbours, and the check must see it."""
    k, v = randn(4, 128, 2, 64, gen=gen, device="cpu"), randn(4, 128, 2, 64, gen=gen, device="cpu")
    q = randn(4, 4, 64, gen=gen, device="cpu")
    alone = default_ops.attention(q[:1], k, v, torch.tensor([0]), torch.tensor([30]), 0.125)
    batch = default_ops.attention(q, k, v, torch.tensor([0, 1, 2, 3]), torch.tensor([30, 100, 5, 77]), 0.125)
    assert not torch.equal(alone[0], batch[0])


def test_attention_rejects_bad_input_clearly(bi, gen):
    k = randn(1, 8, 2, 16, gen=gen)
    one = ints([0])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        bi.attention(randn(1, 3, 16, gen=gen), k, k, one, one, 1.0)
    with pytest.raises(ValueError, match="over the supported 256"):
        big = randn(1, 8, 1, 512, gen=gen)
        bi.attention(randn(1, 1, 512, gen=gen), big, big, one, one, 1.0)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 8\)"):
        bi.attention(randn(1, 2, 16, gen=gen), k, k, one, ints([8]), 1.0)


def test_tile_plan_groups_each_sequence_in_batch_order():
    """The host plan of a mixed pass: every token exactly once, each tile from one
    sequence, sequences in slot order, each one's tokens in batch order, -1 only at the
    end of a sequence's last tile."""
    import random
    rng = random.Random(0)
    for _ in range(50):
        block_m = rng.choice([1, 2, 3, 8, 16])
        slots = [rng.randrange(0, 9) for _ in range(rng.randint(1, 120))]
        tiles = attention_module._build_tiles(slots, block_m)
        assert tiles.shape[1] == block_m
        seen = []
        for row in tiles.tolist():
            real = [t for t in row if t >= 0]
            assert real and row == real + [-1] * (block_m - len(real))
            assert len({slots[t] for t in real}) == 1
            seen += real
        assert sorted(seen) == list(range(len(slots)))
        assert seen == sorted(range(len(slots)), key=lambda t: slots[t])  # stable: batch order kept


def test_hopper_plan_covers_every_token_once_in_sequence_tiles():
    """The Gluon kernels' host plan (attention_hopper.host_plan): every token exactly once,
    each tile from one sequence with its slot and sweep length, longest sweeps first, two
    consumer warpgroups per tile only where sequences fill them; a warpgroup's bulk-store bit
    set exactly where its tokens are real and consecutive (one box of the output)."""
    import random
    from local_backend.kernels import attention_hopper as hopper
    rng = random.Random(1)
    tokens = hopper.tokens_per_warpgroup(4)
    boxes = rows_of_boxes = 0
    for case in range(60):
        lengths = [rng.choice([1, 1, 2, 17, 40, 200]) for _ in range(rng.randint(1, 9))]
        slots = [s for s, n in enumerate(lengths) for _ in range(n)]
        positions = [p for n in lengths for p in range(n)]
        if case % 2:  # the other half keeps the batch in sequence order: whole boxes
            rng.shuffle(order := list(range(len(slots))))
            slots, positions = [slots[i] for i in order], [positions[i] for i in order]
        plan = hopper.host_plan(slots, positions, 4, SPLIT, "cpu")
        width = plan.consumers * tokens
        assert plan.tiles.shape[1] == width
        seen = []
        for row, row_pos, slot, word in zip(plan.tiles.tolist(), plan.tile_pos.tolist(), plan.cta_slot.tolist(),
                                            plan.cta_len.tolist()):
            real = [t for t in row if t >= 0]
            assert real and row == real + [-1 - real[0]] * (width - len(real))  # padding names the first token
            assert row_pos == [positions[t] for t in real] + [positions[real[0]]] * (width - len(real))
            assert {slots[t] for t in real} == {slot}
            assert word & 0xFFFFFFFF == max(positions[t] for t in real) + 1
            for wg in range(plan.consumers):
                own = row[wg * tokens:(wg + 1) * tokens]
                box = own == list(range(own[0], own[0] + tokens))
                assert bool(word >> (32 + wg) & 1) == box, (row, wg)
                boxes += box
            assert word >> (32 + plan.consumers) == 0
            seen += real
        assert sorted(seen) == list(range(len(slots)))
        sweeps = [word & 0xFFFFFFFF for word in plan.cta_len.tolist()]
        assert sweeps == sorted(sweeps, reverse=True)  # longest sweeps first
        assert plan.consumers == (2 if all(n >= 40 for n in lengths) else plan.consumers)
        rows_of_boxes += plan.tiles.shape[0] * plan.consumers
    assert 0 < boxes < rows_of_boxes  # both stores are planned
    decode_only = hopper.host_plan(list(range(8)), [5] * 8, 4, SPLIT, "cpu")
    assert decode_only.consumers == 1
