"""Where a step of the engine spends its time, on a GPU: the graph replay alone, the
whole decode step (replay + picks + bookkeeping), a whole-prompt prefill pass and a
mixed prefill + decode pass, for both kernel modes, on bench_e2e's Llama-1B shape.

    PYTHONPATH=.:bench python bench/profile_step.py --json out/profile_step.json

"host" is the decode step minus the replay: what the step's Python and its one copy
cost on top of the GPU's work. It says whether end to end is GPU- or host-bound.
"decode_step_overlap_ms": the same steps with overlap scheduling (Engine.overlap): the
host prepares step N+1 while replay N runs, so it should come down to the replay's time
("replay_overlap_ms", that bucket's replay alone). "prefill_group_pass_ms": a pass that
prefills --group requests with nothing else running (what a mixed pass would cost if its
decode rows ran as a replay instead). --trace FILE: torch.profiler's table of one mixed
pass (batch-invariant), the kernels and the host calls it spends its time in. Mixed passes:
the first of its shape ("mixed_pass_ms", which may meet kernel variants the warm-up did
not), one more ("mixed_pass_again_ms"), and one split into a prefill pass + a decode replay.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from bench_e2e import build_models
from gpu_info import gpu_info, header, write_json
from local_backend.engine import Engine, Request
from local_backend.kernels import get_ops


def _ms(fn, repeat: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def _requests(n: int, prompt: int, new: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [Request(prompt_ids=[rng.randrange(1000, 120000) for _ in range(prompt)], max_tokens=new,
                    ignore_eos=True) for _ in range(n)]


def settle(engine: Engine) -> None:
    """Read the pass still in flight (overlap), so the engine can switch modes."""
    if engine._in_flight is not None:
        engine._finish(engine._in_flight, None)
        engine._in_flight = None


def mixed_pass_trace(engine: Engine, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    with open(path, "w") as f:
        f.write(table.table(sort_by="cuda_time_total", row_limit=30) + "\n")
        f.write(table.table(sort_by="cpu_time_total", row_limit=30) + "\n")


def profile(model, config, mode: str, slots: int, prompt: int, group: int, repeat: int,
            trace: str | None = None) -> dict:
    engine = Engine(model, config, get_ops(mode, "cuda"), None, torch.device("cuda"), torch.bfloat16,
                    "random-init", max_slots=slots, max_len=512, decode_graphs="auto", overlap=False)
    engine.generate(_requests(slots, prompt, 3, 1))  # compile every kernel shape
    engine.decode.capture_all()
    row = {"mode": mode, "slots": slots}
    # a full batch, prefilled in one pass, then decode steps
    for r in _requests(slots, prompt, 10 * repeat, 2):
        engine.add_request(r)
    row["prefill_pass_ms"] = _ms(engine.step, 1)
    engine.step()
    row["decode_step_ms"] = _ms(engine.step, repeat)
    # the replay alone, on the inputs of the last real step (its K/V rewritten in place)
    graph = engine.decode._captured[engine.decode.bucket(slots)][0]
    row["replay_ms"] = _ms(graph.replay, repeat)
    forward, launch, read = engine._forward, engine._pick_launch, engine._pick_read
    spent = {"forward": 0.0, "pick": 0.0}

    def timed(name, fn):
        def wrapper(*args):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(*args)
            torch.cuda.synchronize()
            spent[name] += time.perf_counter() - start
            return out
        return wrapper
    engine._forward = timed("forward", forward)  # picks: launched (and, without overlap, copied), then read
    engine._pick_launch, engine._pick_read = timed("pick", launch), timed("pick", read)
    total = _ms(engine.step, repeat)
    row["decode_step_synced_ms"] = total
    row["forward_ms"] = spent["forward"] / repeat * 1e3
    row["pick_ms"] = spent["pick"] / repeat * 1e3
    row["rest_ms"] = total - row["forward_ms"] - row["pick_ms"]
    engine._forward, engine._pick_launch, engine._pick_read = forward, launch, read
    # a mixed pass: `group` requests abort, `group` new ones join beside slots - group decoding;
    # the first of its shape, the same again, and split (Engine.split_mixed)
    def mixed(seed: int, split: bool = False) -> float:
        for rid in [s.request.request_id for s in engine._running[:group]]:
            engine.abort(rid)
        engine.step()
        for r in _requests(group, prompt, 4, seed):
            engine.add_request(r)
        engine.admit_group, engine.split_mixed = 1, split
        ms = _ms(engine.step, 1)
        engine.split_mixed = False
        return ms
    row["mixed_pass_ms"] = mixed(3)
    row["mixed_pass_again_ms"] = mixed(6)
    row["mixed_pass_split_ms"] = mixed(7, split=True)
    row["host_ms"] = row["decode_step_ms"] - row["replay_ms"]
    if trace:  # one more mixed pass, under the profiler
        for rid in [s.request.request_id for s in engine._running[:group]]:
            engine.abort(rid)
        engine.step()
        for r in _requests(group, prompt, 4, 5):
            engine.add_request(r)
        mixed_pass_trace(engine, trace)
    # overlap scheduling: the same engine, each step launched before the last one is read
    engine.overlap = True
    for _ in range(5):  # the mixed pass's requests (4 tokens) finish; a steady batch remains
        engine.step()
    row["overlap_rows"] = len(engine._running)
    row["decode_step_overlap_ms"] = _ms(engine.step, repeat)
    graph = engine.decode._captured[engine.decode.bucket(len(engine._running))][0]
    row["replay_overlap_ms"] = _ms(graph.replay, repeat)
    settle(engine)
    engine.overlap = False
    for rid in [s.request.request_id for s in engine._running]:
        engine.abort(rid)
    engine.step()
    for r in _requests(group, prompt, 4, 4):
        engine.add_request(r)
    row["prefill_group_pass_ms"] = _ms(engine.step, 1)
    del engine
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--trace", help="write torch.profiler's table of a mixed pass here")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_step needs a CUDA GPU")
    info = gpu_info()
    print(header(info))
    _, ours, config = build_models("cuda")
    rows = [profile(ours, config, mode, args.slots, args.prompt, args.group, args.repeat,
                    args.trace if mode == "batch-invariant" else None)
            for mode in ("batch-invariant", "default")]
    keys = ["replay_ms", "decode_step_ms", "host_ms", "forward_ms", "pick_ms", "rest_ms",
            "prefill_pass_ms", "mixed_pass_ms", "mixed_pass_again_ms", "mixed_pass_split_ms", "decode_step_overlap_ms", "replay_overlap_ms",
            "prefill_group_pass_ms"]
    for r in rows:
        print(f"{r['mode']}: " + ", ".join(f"{k} {r[k]:.2f}" for k in keys))
    write_json(args.json, {"info": info, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
