"""The Gluon attention kernels (Hopper): right against a float64 reference, and a
query token's output is the same bits whichever launch computes it: alone or batched,
prefill or decode, in a tile of one consumer warpgroup or of two, in one pass or split
over the KV sweep, by a program of its own or a persistent one that takes many, with its
cache rows past the sweep holding NaN. On a Hopper GPU only
(the CPU runs attention.py's Triton kernel under the interpreter: test_attention_kernel)."""

from __future__ import annotations

import functools

import pytest
import torch

from local_backend.kernels import attention as attention_module
from local_backend.kernels.attention import SPLIT
from local_backend.kernels.pass_memo import one_plan_per_pass

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="Gluon kernels run on Hopper (sm_90) only")

HQ, HKV, D = 32, 8, 128
S, L = 4, 2 * SPLIT + 300


def run(q, cache, slots, positions, kernel="gluon", **kw):
    return attention_module.attention(q, *cache, slots, positions, D ** -0.5, kernel=kernel, **kw)


KERNELS = ["gluon", "gluon-grid"]  # persistent programs, one program per work item


def cuda(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int64, device="cuda")


@pytest.fixture
def setup():
    """Slot 0: a prompt over two split boundaries; slots 1-3: other sequences. Every cache
    position no sequence wrote holds NaN: any read of one shows in the output."""
    gen = torch.Generator().manual_seed(7)
    k = torch.full((S, L, HKV, D), float("nan"), dtype=torch.bfloat16)
    v = torch.full((S, L, HKV, D), float("nan"), dtype=torch.bfloat16)
    lengths = {0: 2 * SPLIT + 77, 1: 40, 2: SPLIT + 3, 3: 5}
    for slot, n in lengths.items():
        k[slot, :n] = torch.randn(n, HKV, D, generator=gen).bfloat16()
        v[slot, :n] = torch.randn(n, HKV, D, generator=gen).bfloat16()
    q = torch.randn(lengths[0], HQ, D, generator=gen).bfloat16().cuda()
    others = torch.randn(lengths[1] + 2, HQ, D, generator=gen).bfloat16().cuda()
    return (k.cuda(), v.cuda()), q, others, lengths


def reference(q, cache, slots, positions):
    k, v = cache
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for t in range(q.shape[0]):
        keys = k[slots[t], : positions[t] + 1].double().repeat_interleave(HQ // HKV, dim=1)
        vals = v[slots[t], : positions[t] + 1].double().repeat_interleave(HQ // HKV, dim=1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[t].double(), keys) * D ** -0.5, dim=-1)
        out[t] = torch.einsum("hn,nhd->hd", weights, vals)
    return out


@pytest.mark.parametrize("kernel", KERNELS)
def test_prefill_is_right_and_the_same_bits_in_every_launch(setup, kernel):
    cache, q, others, lengths = setup
    go = functools.partial(run, kernel=kernel)
    n = lengths[0]
    slots, positions = cuda([0] * n), torch.arange(n, device="cuda")
    one_pass = go(q, cache, slots, positions, split_kv=False)
    assert torch.isfinite(one_pass).all(), "read a NaN cache position"
    rows = torch.tensor([0, 1, SPLIT - 1, SPLIT, n - 1])
    ref = reference(q[rows], cache, slots[rows], positions[rows])
    err = (one_pass[rows].double() - ref).abs().max().item()
    assert err < 2e-2 * max(ref.abs().max().item(), 1.0)
    assert torch.equal(go(q, cache, slots, positions, split_kv=True), one_pass)
    # chunked prefill: 100 tokens, then the rest
    first = go(q[:100], cache, slots[:100], positions[:100])
    rest = go(q[100:], cache, slots[100:], positions[100:])
    assert torch.equal(torch.cat([first, rest]), one_pass)
    # batched with another prefill and two decode tokens, shuffled
    other_slots = cuda([1] * lengths[1] + [2, 3])
    other_pos = torch.cat([torch.arange(lengths[1], device="cuda"), cuda([lengths[2] - 1, lengths[3] - 1])])
    all_q = torch.cat([q, others])
    all_slots, all_pos = torch.cat([slots, other_slots]), torch.cat([positions, other_pos])
    perm = torch.randperm(len(all_q), generator=torch.Generator().manual_seed(3)).cuda()
    mixed = go(all_q[perm], cache, all_slots[perm], all_pos[perm])
    needle = (perm < n).nonzero().squeeze(1)
    assert torch.equal(mixed[needle], one_pass[perm[needle]])


@pytest.mark.parametrize("kernel", KERNELS)
def test_decode_is_the_same_bits_as_prefill(setup, kernel):
    """Decode of single tokens (alone, next to others, split-KV or one pass, planned on
    the device as in a CUDA graph) equals the prefill row of the same token."""
    cache, q, others, lengths = setup
    go = functools.partial(run, kernel=kernel)
    n = lengths[0]
    prefill = go(q, cache, cuda([0] * n), torch.arange(n, device="cuda"))
    for p in [0, 63, 64, SPLIT - 1, SPLIT, SPLIT + 1, 2 * SPLIT + 5, n - 1]:
        for split in (False, True):
            alone = go(q[p:p + 1], cache, cuda([0]), cuda([p]), split_kv=split)
            assert torch.equal(alone[0], prefill[p]), f"decode of {p} (split_kv={split}) differs"
            batch_q = torch.stack([others[-1], q[p], others[-2]])
            slots, positions = cuda([3, 0, 2]), cuda([lengths[3] - 1, p, lengths[2] - 1])
            with one_plan_per_pass(decode_only=True):
                batched = go(batch_q, cache, slots, positions, split_kv=split)
            assert torch.equal(batched[1], prefill[p])


def test_one_and_two_consumer_tiles_and_the_triton_kernel_agree(setup):
    """Two consumers per tile (a long prompt) and one (a prompt among many short ones)
    give each token the same bits. The Triton kernel's arithmetic is the same, on the same
    wgmma layouts; whether its bits equal is reported, not required."""
    cache, q, others, lengths = setup
    n = lengths[0]
    slots, positions = cuda([0] * n), torch.arange(n, device="cuda")
    two = run(q, cache, slots, positions)
    assert attention_module.hopper.host_plan(slots.tolist(), positions.tolist(), 4, SPLIT, "cuda").consumers == 2
    assert torch.equal(run(q, cache, slots, positions, kernel="gluon-grid"), two)
    # the prompt's first 3 tokens next to 8 single decode tokens: one consumer per tile
    few_slots = cuda([0, 0, 0] + [1, 2, 3] * 2 + [1, 2])
    few_pos = cuda([0, 1, 2] + [10, 20, 4] * 2 + [39, SPLIT])
    few_q = torch.cat([q[:3], others[:8]])
    assert attention_module.hopper.host_plan(few_slots.tolist(), few_pos.tolist(), 4, SPLIT, "cuda").consumers == 1
    assert torch.equal(run(few_q, cache, few_slots, few_pos)[:3], two[:3])
    triton_out = attention_module.attention(q, *cache, slots, positions, D ** -0.5, kernel="triton")
    print(f"\nGluon == Triton kernel bit for bit: {torch.equal(triton_out, two)}")


@pytest.mark.parametrize("split", [False, True])
def test_one_program_takes_every_work_item_in_turn(setup, monkeypatch, split):
    """A persistent grid of one program per SM, on a GPU of one SM: every (tile, KV head,
    split) item runs in turn through the same K/V ring, its stages' barriers carried from
    item to item; the bits are those of one program per item."""
    cache, q, others, lengths = setup
    n = lengths[0]
    all_q = torch.cat([q, others])
    slots = torch.cat([cuda([0] * n), cuda([1] * lengths[1] + [2, 3])])
    positions = torch.cat([torch.arange(n, device="cuda"), torch.arange(lengths[1], device="cuda"),
                           cuda([lengths[2] - 1, lengths[3] - 1])])
    expected = run(all_q, cache, slots, positions, kernel="gluon-grid", split_kv=split)
    decode = run(others[-2:], cache, cuda([2, 3]), cuda([lengths[2] - 1, lengths[3] - 1]), kernel="gluon-grid",
                 split_kv=split)
    monkeypatch.setattr(attention_module.hopper, "sm_count", lambda device: 1)
    assert torch.equal(run(all_q, cache, slots, positions, split_kv=split), expected)
    assert torch.equal(run(others[-2:], cache, cuda([2, 3]), cuda([lengths[2] - 1, lengths[3] - 1]), split_kv=split),
                       decode)


@pytest.mark.parametrize("hq,hkv", [(32, 8), (24, 8), (8, 8)])
def test_the_gluon_combine_folds_split_states_as_the_triton_combine_does(hq, hkv):
    """combine_hopper's kernel against attention._combine_kernel on the same split states:
    tokens of 1 to 70 splits (blocks of states, and a block in flight, on either side of a
    block's end), a GQA group padded to a power of two (24 / 8 = 3), every slicing of
    head_dim; state slots past a token's last split hold NaN and must never be read."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    positions = cuda([0, SPLIT - 1, SPLIT, 15 * SPLIT + 7, 16 * SPLIT, 33 * SPLIT + 1, 69 * SPLIT + 511])
    T, splits = positions.shape[0], 70
    part_m = torch.randn(T, hq, splits, device="cuda", generator=gen) * 4
    part_l = torch.rand(T, hq, splits, device="cuda", generator=gen) * 60 + 1
    part_acc = torch.randn(T, hq, splits, D, device="cuda", generator=gen) * 30
    for t, p in enumerate(positions.tolist()):
        part_m[t, :, p // SPLIT + 1:] = part_l[t, :, p // SPLIT + 1:] = part_acc[t, :, p // SPLIT + 1:] = float("nan")
    scale_log2e = D ** -0.5 * attention_module.LOG2_E
    for slices in (1, 2, 4):
        outs = []
        for gluon in (False, True):
            out = torch.empty(T, hq, D, dtype=torch.bfloat16, device="cuda")
            attention_module._combine(part_m, part_l, part_acc, out, positions, scale_log2e, splits, hkv, slices,
                                      gluon=gluon)
            outs.append(out)
        assert torch.isfinite(outs[1]).all(), "read a state past a token's last split"
        assert torch.equal(outs[1], outs[0]), f"slices={slices}: the Gluon combine's bits differ"


@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (8, 8, 128), (24, 8, 128), (64, 4, 128), (32, 8, 64)])
def test_decode_groups_of_any_size_are_the_prefill_rows(hq, hkv, d):
    """Decode passes (planned on the device) put the GQA group's heads in the dots' N
    (attention_hopper._decode_tile); prefill puts them in M with the tokens. For groups of
    1, 3 (padded to 4), 4 and 16 heads and head_dim 64 or 128, each decode token (split-KV
    and one pass, alone and batched with others) is its prefill row, bit for bit, and the
    cache past each sweep holds NaN."""
    gen = torch.Generator().manual_seed(11)
    lengths = [SPLIT + 130, 3 * SPLIT - 1, 64, 9]
    cache_len = 3 * SPLIT
    k = torch.full((len(lengths), cache_len, hkv, d), float("nan"), dtype=torch.bfloat16)
    v = torch.full_like(k, float("nan"))
    qs = []
    for slot, n in enumerate(lengths):
        k[slot, :n] = torch.randn(n, hkv, d, generator=gen).bfloat16()
        v[slot, :n] = torch.randn(n, hkv, d, generator=gen).bfloat16()
        qs.append(torch.randn(n, hq, d, generator=gen).bfloat16().cuda())
    k, v = k.cuda(), v.cuda()
    prefill = [attention_module.attention(q, k, v, cuda([slot] * len(q)), torch.arange(len(q), device="cuda"),
                                          d ** -0.5, kernel="gluon") for slot, q in enumerate(qs)]
    last = cuda([n - 1 for n in lengths])
    batch_q = torch.stack([q[-1] for q in qs])
    for split in (False, True):
        with one_plan_per_pass(decode_only=True):
            batched = attention_module.attention(batch_q, k, v, cuda(range(len(lengths))), last, d ** -0.5,
                                                 kernel="gluon", split_kv=split)
        with one_plan_per_pass(decode_only=True):
            alone = attention_module.attention(batch_q[1:2], k, v, cuda([1]), last[1:2], d ** -0.5,
                                               kernel="gluon", split_kv=split)
        assert torch.isfinite(batched).all(), "read a NaN cache position"
        for slot in range(len(lengths)):
            assert torch.equal(batched[slot], prefill[slot][-1]), f"slot {slot} (split_kv={split}) differs"
        assert torch.equal(alone[0], prefill[1][-1])
