"""Batch-invariance checks run in a fresh process, so that the BLAS and torch settings
chosen by environment variables (OPENBLAS_CORETYPE, ATEN_CPU_CAPABILITY, thread
counts) apply from the first import. tests/kernels/test_blas_conditions.py runs this
script under each condition and reads the one JSON object it prints.

For each batch-invariant implementation: a needle row alone vs inside batches of
1+3 and 1+40 at random positions, for linear (fp32 and bf16), rms_norm, silu_mul,
log_softmax and attention (a prompt prefilled alone, decoded token by token, and
inside a batch of other sequences); then a short coin flip on the bundled tiny
model over batch sizes 1, 3, 8 and 32. The default kernels run the same checks as
a negative control. numpy's own matmul is checked too, to show that the condition
is one that breaks a BLAS's row invariance.
"""

from __future__ import annotations

import json
import os
import sys

import torch

# Run from anywhere: the repo root (for local_backend and detaudit) and this folder.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE))]

if os.environ.get("DETAUDIT_PROBE_THREADS"):
    torch.set_num_threads(int(os.environ["DETAUDIT_PROBE_THREADS"]))

from local_backend.kernels import get_ops  # noqa: E402


def _gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _needle_batches(needle: torch.Tensor, others: torch.Tensor, gen: torch.Generator):
    for extra in (3, 40):
        at = int(torch.randint(0, extra + 1, (1,), generator=gen))
        yield torch.cat([others[:at], needle[None], others[at:extra]]), at


def rowwise_differences(ops) -> dict[str, int]:
    """Batches in which the needle row's output was not bitwise equal to the row alone."""
    gen = _gen()
    found: dict[str, int] = {}

    def check(name, fn, needle, others):
        alone = fn(needle[None])[0]
        found[name] = sum(not torch.equal(fn(batch)[at], alone)
                          for batch, at in _needle_batches(needle, others, gen))

    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(72, 136, generator=gen).to(dtype)
        b = torch.randn(72, generator=gen).to(dtype)
        check(f"linear_{str(dtype)[6:]}", lambda x: ops.linear(x, w, b),
              torch.randn(136, generator=gen).to(dtype), torch.randn(40, 136, generator=gen).to(dtype))
    wn = torch.randn(96, generator=gen)
    check("rms_norm", lambda x: ops.rms_norm(x, wn, 1e-6), torch.randn(96, generator=gen) * 3,
          torch.randn(40, 96, generator=gen) * 3)
    check("silu_mul", lambda x: ops.silu_mul(x, x * 0.5 + 1.0), torch.randn(200, generator=gen) * 3,
          torch.randn(40, 200, generator=gen) * 3)
    check("log_softmax", ops.log_softmax, torch.randn(700, generator=gen) * 4,
          torch.randn(40, 700, generator=gen) * 4)
    found["attention"] = attention_differences(ops, gen)
    return found


def attention_differences(ops, gen: torch.Generator) -> int:
    """A 40-token prompt in slot 0: prefilled alone, decoded one token at a time, and
    prefilled beside a 20-token prompt and two decode tokens; outputs must all agree."""
    S, L, HQ, HKV, D = 4, 96, 6, 2, 40
    k = torch.randn(S, L, HKV, D, generator=gen)
    v = torch.randn(S, L, HKV, D, generator=gen)
    q = torch.randn(40, HQ, D, generator=gen)
    scale = D ** -0.5
    slots = torch.zeros(40, dtype=torch.int64)
    positions = torch.arange(40)
    alone = ops.attention(q, k, v, slots, positions, scale)
    differing = 0
    for t in (0, 17, 39):  # decode steps of the same tokens
        one = ops.attention(q[t:t + 1], k, v, slots[t:t + 1], positions[t:t + 1], scale)
        differing += not torch.equal(one[0], alone[t])
    other_q = torch.randn(22, HQ, D, generator=gen)
    other_slots = torch.tensor([1] * 20 + [2, 3])
    other_pos = torch.cat([torch.arange(20), torch.tensor([90, 5])])
    mixed = ops.attention(torch.cat([other_q[:11], q, other_q[11:]]), k, v,
                          torch.cat([other_slots[:11], slots, other_slots[11:]]),
                          torch.cat([other_pos[:11], positions, other_pos[11:]]), scale)
    differing += not torch.equal(mixed[11:51], alone)
    return differing


def coin_flip(kernels: str, implementation: str, batch_sizes=(1, 3, 8, 32), n: int = 8) -> dict[str, list[str]]:
    """Distinct logprob texts of each tracked token over n repeats cycling through batch_sizes
    (each repeat beside random fillers, at a random place in its batch)."""
    from detaudit.backends.local import LocalBackend
    from detaudit.probes import load_probe

    backend = LocalBackend(kernels=kernels, kernel_impl=implementation, batch_sizes=list(batch_sizes))
    probe = load_probe("coin-flip")
    seen: dict[str, set[str]] = {"Heads": set(), "Tails": set()}
    for index in range(n):
        completion = backend._complete(probe, index)
        for top in completion.positions[0].top:
            if top.token in seen:
                seen[top.token].add(top.logprob_text)
    return {label: sorted(texts) for label, texts in seen.items()}


def packed_score_differences(implementation: str) -> int:
    """Completions whose teacher-forced logprobs change bits when packed beside others
    (``Engine.score_many``, what crosscheck's reference does) against scored alone."""
    from local_backend.engine import Engine

    engine = Engine.load("tiny", kernels="batch-invariant", kernel_impl=implementation,
                         device="cpu", max_slots=4, max_len=64)
    prompt = [0, 4, 389, 461, 417, 5]
    completions = [[(13 * i + 7 * j) % 400 + 10 for j in range(length)]
                   for i, length in enumerate((2, 11, 5, 17, 1, 8))]
    packed = engine.score_many(prompt, completions)
    return sum(engine.score(prompt, ids) != scores for ids, scores in zip(completions, packed))


def numpy_matmul_row_differences() -> int:
    """Rows of numpy's float32 matmul of one fixed 128-row block that change bits when
    the row moves from place 0 to place i (what the interpreter's tl.dot used to do)."""
    import numpy as np

    rng = np.random.default_rng(0)
    block = rng.standard_normal((128, 256), dtype=np.float32)
    w = rng.standard_normal((256, 512), dtype=np.float32)
    full = block @ w
    differing = 0
    for i in range(1, 81):
        moved = block.copy()
        moved[[0, i]] = moved[[i, 0]]
        differing += not np.array_equal((moved @ w)[0], full[i])
    return differing


def main() -> None:
    import time

    started = time.perf_counter()
    implementations = sys.argv[1].split(",") if len(sys.argv) > 1 else ["cpu-exact", "triton"]
    report: dict = {"numpy_matmul_rows_differing": numpy_matmul_row_differences(), "implementations": {}}
    for implementation in implementations:
        ops = get_ops("batch-invariant", "cpu", implementation)
        report["implementations"][implementation] = {
            "ran": ops.implementation,
            "rowwise": rowwise_differences(ops),
            "packed_scores_differing": packed_score_differences(implementation)
            if implementation == "cpu-exact" else 0,
            # The interpreter costs seconds per batch of fillers: fewer and smaller batches there.
            "coin_flip": coin_flip("batch-invariant", implementation) if implementation == "cpu-exact"
            else coin_flip("batch-invariant", implementation, batch_sizes=(1, 3, 8), n=3),
        }
    default = get_ops("default")
    report["default"] = {"rowwise": rowwise_differences(default), "coin_flip": coin_flip("default", "auto")}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
