"""End to end: the engine in batch-invariant and default mode vs Hugging Face generate().

    PYTHONPATH=. python bench/bench_e2e.py --json out/e2e.json                  # 1,000 requests
    PYTHONPATH=. python bench/bench_e2e.py --requests 200 --json out/e2e.json   # a shorter run
    PYTHONPATH=. python bench/bench_e2e.py --skip-hf --overlap both             # overlap scheduling off vs on

A Llama-3.2-1B-shaped model (16 layers, hidden 2048, 32/8 heads, vocab 128256,
tied embeddings: 1.24 B parameters), random-initialised by transformers with a
fixed seed, bf16, no download. Both engine modes and transformers use the same
weight tensors. Workload: N requests, random prompts of 32-64 tokens, 90-110
generated tokens each (ignore_eos), greedy. The engine batches continuously
(--slots requests at a time); generate() gets static batches of --hf-batch
left-padded prompts and runs each to the longest request in it (tokens/s counts
only the tokens that were asked for, for all three). After the timed run, a few
requests are run again alone: "bitwise" says whether their tokens and logprobs
are the same bits as in the big batched run.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import random
import sys
import time

import torch

from gpu_info import gpu_info, header, write_json
from local_backend.config import ModelConfig
from local_backend.engine import Engine, Request
from local_backend.gc_tuning import freeze_startup_objects
from local_backend.kernels import get_ops
from local_backend.model import Transformer

LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "max_position_embeddings": 2048, "tie_word_embeddings": True, "hidden_act": "silu",
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}


def build_models(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_config = LlamaConfig(**{k: v for k, v in LLAMA_1B.items() if k != "architectures"})
    with torch.device(device):
        hf = LlamaForCausalLM(hf_config).to(torch.bfloat16).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    config = ModelConfig.from_dict(LLAMA_1B, name="llama-1b-random")
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()
             if "rotary_emb" not in k and k != "lm_head.weight"}
    with torch.device("meta"):
        ours = Transformer(config)
    ours.load_state_dict(state, assign=True)  # the very same tensors as hf's
    return hf, ours.eval(), config


def workload(n: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [Request(prompt_ids=[rng.randrange(1000, 120000) for _ in range(rng.randint(32, 64))],
                    max_tokens=rng.randint(90, 110), ignore_eos=True) for _ in range(n)]


def copy(r: Request) -> Request:
    return Request(prompt_ids=r.prompt_ids, max_tokens=r.max_tokens, ignore_eos=True)


def digest(results) -> str:
    """One hash of every token id and logprob bit pattern of a run: equal runs, equal bits."""
    h = hashlib.sha256()
    for r in results:
        h.update(repr([(t.token_id, t.logprob.hex()) for t in r.tokens]).encode())
    return h.hexdigest()[:16]


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run_engine(model, config, mode: str, requests: list[Request], slots: int, check: int, repeat: int,
               decode_graphs: str = "auto", admit_group: str = "auto", overlap: str = "auto",
               split_mixed: str = "off") -> dict:
    engine = Engine(model, config, get_ops(mode, "cuda"), None, torch.device("cuda"), torch.bfloat16,
                    "random-init", max_slots=slots, max_len=256, decode_graphs=decode_graphs,
                    overlap={"auto": None, "on": True, "off": False}[overlap])
    if admit_group != "auto":
        engine.admit_group = int(admit_group)
    engine.split_mixed = split_mixed == "on"
    passes = [0, 0]  # all passes, those fed from the device (overlap)
    forward, fed = engine._forward, engine._forward_fed
    engine._forward = lambda *a: passes.__setitem__(0, passes[0] + 1) or forward(*a)  # count passes
    engine._forward_fed = lambda *a: passes.__setitem__(1, passes[1] + 1) or fed(*a)
    engine.generate([Request(prompt_ids=r.prompt_ids, max_tokens=3, ignore_eos=True)
                     for r in requests[:slots + 8]])  # compile every kernel shape first
    engine.generate([Request(prompt_ids=requests[0].prompt_ids[:5], max_tokens=3, ignore_eos=True)])
    engine.warm_up()  # every matmul kernel of the table, every decode graph: outside the timed run
    runs, digests = [], []  # the timed run, again: the first may still meet kernel shapes the warm-up did not
    for _ in range(repeat):
        passes[:] = [0, 0]
        replays = engine.decode.replays if engine.decode is not None else 0
        results, seconds = timed(lambda: engine.generate([copy(r) for r in requests]))
        runs.append(seconds)
        digests.append(digest(results))
    steps, fed_steps, graphed = passes[0] + passes[1], passes[1], (engine.decode.replays - replays if engine.decode is not None else 0)
    tokens = sum(len(r.token_ids) for r in results)
    same = []
    for i in range(min(check, len(requests))):
        alone = engine.generate([copy(requests[i])])[0]
        same.append(alone.token_ids == results[i].token_ids and
                    [t.logprob for t in alone.tokens] == [t.logprob for t in results[i].tokens])
    engine_overlap = engine.overlap
    del engine
    torch.cuda.empty_cache()
    return {"mode": mode, "decode_graphs": decode_graphs, "admit_group": admit_group,
            "overlap": engine_overlap, "split_mixed": split_mixed, "fed_steps": fed_steps, "digest": digests[-1],
            "same_bits_every_run": len(set(digests)) == 1, "steps": steps,
            "decode_steps_padded_or_graphed": graphed, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "seconds_runs": runs, "tokens_per_s_runs": [tokens / s for s in runs],
            "bitwise_alone_vs_batched": all(same), "checked": len(same)}


def run_hf(hf, requests: list[Request], batch: int) -> dict:
    def generate_all():
        for b in range(0, len(requests), batch):
            chunk = requests[b:b + batch]
            width = max(len(r.prompt_ids) for r in chunk)
            ids = torch.tensor([[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r in chunk], device="cuda")
            mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in chunk],
                                device="cuda")
            new = max(r.max_tokens for r in chunk)
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                        do_sample=False)
    with torch.inference_mode():
        hf.generate(input_ids=torch.tensor([requests[0].prompt_ids], device="cuda"), max_new_tokens=3,
                    do_sample=False)
        _, seconds = timed(generate_all)
    tokens = sum(r.max_tokens for r in requests)
    return {"mode": "transformers generate()", "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--slots", type=int, default=256, help="engine: requests running at once")
    parser.add_argument("--hf-batch", type=int, default=128, help="transformers: prompts per generate() call")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per engine (tokens/s: the last)")
    parser.add_argument("--check", type=int, default=2, help="requests re-run alone for the bitwise check")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--admit-group", default="auto",
                        help="comma-separated: engine admit_group values to run (auto: the engine's own)")
    parser.add_argument("--decode-graphs", default="auto", choices=("auto", "off", "both"),
                        help="engine decode steps from CUDA graphs (auto), eager (off), or each mode both ways")
    parser.add_argument("--overlap", default="auto", choices=("auto", "off", "on", "both"),
                        help="engine overlap scheduling (auto: the engine's own, on for CUDA), or off then on")
    parser.add_argument("--split-mixed", default="off", choices=("off", "on", "both"),
                        help="engine: run a mixed pass as a prefill pass + a graphed decode step (Engine.split_mixed)")
    parser.add_argument("--gc", default="freeze", choices=("as-is", "freeze", "off"),
                        help="Python's collector: start-up objects frozen, as `detaudit serve` does "
                             "(gc_tuning; the default), as Python has it, or off")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_e2e needs a CUDA GPU")
    info = gpu_info()
    print(header(info))
    hf, ours, config = build_models("cuda")
    if args.gc == "freeze":
        freeze_startup_objects()
    elif args.gc == "off":
        gc.disable()
    requests = workload(args.requests)
    rows = []
    graph_modes = ("off", "auto") if args.decode_graphs == "both" else (args.decode_graphs,)
    overlaps = ("off", "on") if args.overlap == "both" else (args.overlap,)
    for graphs in graph_modes:
        for group in args.admit_group.split(","):
            for overlap in overlaps:
                for split in (("off", "on") if args.split_mixed == "both" else (args.split_mixed,)):
                    for mode in ("batch-invariant", "default"):
                        rows.append(run_engine(ours, config, mode, requests, args.slots, args.check, args.repeat, graphs,
                                               group, overlap, split))
                        print(rows[-1], flush=True)
    if not args.skip_hf:
        rows.append(run_hf(hf, requests, args.hf_batch))
        print(rows[-1], flush=True)
    print(f"\n{args.requests} requests, {rows[0]['tokens']} generated tokens, Llama-1B shape (random init), bf16")
    print(f"{'mode':>24} {'graphs':>6} {'admit':>5} {'overlap':>7} {'split':>5} | {'seconds':>8} {'tokens/s':>9} | {'vs default':>10} | bitwise alone = batched | tokens/s of each run")
    same = ("decode_graphs", "admit_group", "overlap", "split_mixed")
    for r in rows:  # each engine row against the default-mode row of the same engine settings
        base = next((d["tokens_per_s"] for d in rows if d["mode"] == "default"
                     and all(d.get(k) == r.get(k) for k in same)), rows[-1]["tokens_per_s"])
        print(f"{r['mode']:>24} {r.get('decode_graphs', '-'):>6} {r.get('admit_group', '-'):>5} {str(r.get('overlap', '-')):>7} {r.get('split_mixed', '-'):>5} | "
              f"{r['seconds']:>8.2f} {r['tokens_per_s']:>9.0f} | "
              f"{r['tokens_per_s'] / base:>10.2f} | {str(r.get('bitwise_alone_vs_batched', '-')):>23} | "
              + " ".join(f"{x:.0f}" for x in r.get("tokens_per_s_runs", [])))
    write_json(args.json, {"info": info, "args": vars(args), "rows": rows,
                           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30})
    print(header(gpu_info()))


if __name__ == "__main__":
    main()
