"""Needle check: one prompt, greedy, in batches of every size; how many distinct answers?

    PYTHONPATH=. python bench/bench_needle.py --json out/needle.json
    PYTHONPATH=. python bench/bench_needle.py --sizes 1,8,64 --kinds short --modes default   # a shorter run

A random-initialised Qwen3 (12 layers, hidden 2048, 16 query / 8 KV heads of 128,
vocab 151936, tied embeddings), bf16, built by transformers with a fixed seed, no
download. For each prompt kind (short: 32 tokens; long: 1,500 tokens) and each kernel
mode, the needle prompt is completed greedily (48 tokens, ignore_eos, top-5 logprobs)
once per batch size: alone, then among B - 1 other requests of similar length whose
own lengths (8-64 tokens) differ, so the batch around the needle shrinks while it
decodes. Counted: distinct completions (token ids) and distinct logprob vectors (the
48 chosen-token logprobs and their top-5 lists, as exact bits). Batch-invariant
kernels must give 1 and 1, also with the prefix cache on (batch-invariant+prefix: from
the second batch size on, the needle's prompt comes from the cache); the default
kernels' counts are the measurement.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from gpu_info import gpu_info, header, write_json
from local_backend.config import ModelConfig
from local_backend.engine import Engine, Request
from local_backend.kernels import get_ops
from local_backend.model import Transformer

QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 6144, "num_hidden_layers": 12, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "max_position_embeddings": 4096, "tie_word_embeddings": True, "hidden_act": "silu",
    "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
}
SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 96, 128)
PROMPT = {"short": 32, "long": 1500}
NEW_TOKENS = 48


def build_model(device: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        hf = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in QWEN3.items() if k != "architectures"}))
    config = ModelConfig.from_dict(QWEN3, name="qwen3-12l-random")
    state = {k.removeprefix("model."): v.to(torch.bfloat16) for k, v in hf.state_dict().items()
             if "rotary_emb" not in k and k != "lm_head.weight"}
    with torch.device("meta"):
        ours = Transformer(config)
    ours.load_state_dict(state, assign=True)
    del hf
    return ours.eval(), config


def batch_for(kind: str, size: int) -> tuple[list[Request], int]:
    """The needle among size - 1 others; the needle's index in the batch."""
    rng = random.Random(size * 1000 + len(kind))
    length = PROMPT[kind]
    needle = Request(prompt_ids=[random.Random(7).randrange(1000, 150000) for _ in range(length)],
                     max_tokens=NEW_TOKENS, top_logprobs=5, ignore_eos=True)
    others = [Request(prompt_ids=[rng.randrange(1000, 150000) for _ in range(rng.randint(length // 2, length + length // 8))],
                      max_tokens=rng.randint(8, 64), ignore_eos=True) for _ in range(size - 1)]
    where = (size * 7) // 11 % size
    return others[:where] + [needle] + others[where:], where


def sweep(model, config, mode: str, kind: str, sizes, decode_graphs: str) -> dict:
    """One kernel mode ("+prefix": with the prefix cache on, so from the second batch
    size on the needle's prompt comes from the cache) over every batch size."""
    longest = max(PROMPT[kind] + PROMPT[kind] // 8, PROMPT[kind]) + 64
    kernels, _, extra = mode.partition("+")
    engine = Engine(model, config, get_ops(kernels, "cuda"), None, torch.device("cuda"), torch.bfloat16,
                    "random-init", max_slots=max(sizes), max_len=longest, decode_graphs=decode_graphs,
                    prefix_cache=extra == "prefix")
    completions, vectors, per_size = {}, {}, []
    torch.cuda.synchronize()
    start = time.perf_counter()
    for size in sizes:
        batch, where = batch_for(kind, size)
        t0 = time.perf_counter()
        result = engine.generate(batch)[where]
        tokens = tuple(result.token_ids)
        vector = tuple((t.logprob.hex(), tuple((i, lp.hex()) for i, _, lp in t.top)) for t in result.tokens)
        completions.setdefault(tokens, []).append(size)
        vectors.setdefault(vector, []).append(size)
        per_size.append({"size": size, "seconds": time.perf_counter() - t0,
                         "completion": list(completions).index(tokens), "vector": list(vectors).index(vector)})
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    captured = engine.decode.captured if engine.decode is not None else []
    prefix = engine.prefix.stats() if engine.prefix is not None else None
    overlap = engine.overlap
    del engine
    torch.cuda.empty_cache()
    return {"mode": mode, "kind": kind, "prompt_tokens": PROMPT[kind], "sizes": list(sizes),
            "distinct_completions": len(completions), "distinct_logprob_vectors": len(vectors),
            "completion_groups": list(completions.values()), "vector_groups": list(vectors.values()),
            "seconds": seconds, "per_size": per_size, "graph_buckets": captured, "decode_graphs": decode_graphs,
            "prefix_cache": prefix, "overlap": overlap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="batch sizes, comma-separated")
    parser.add_argument("--kinds", default="short,long", help="prompt kinds: short, long")
    parser.add_argument("--modes", default="batch-invariant,default,batch-invariant+prefix",
                        help="kernel modes; +prefix: with the prefix cache on")
    parser.add_argument("--decode-graphs", default="auto", help="engine decode_graphs: auto, off, buckets")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_needle needs a CUDA GPU")
    info = gpu_info()
    print(header(info), flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    model, config = build_model("cuda")
    rows = []
    for kind in args.kinds.split(","):
        for mode in args.modes.split(","):
            rows.append(sweep(model, config, mode, kind, sizes, args.decode_graphs))
            r = rows[-1]
            print(f"{kind:>5} {mode:>15}: {r['distinct_completions']} distinct completions, "
                  f"{r['distinct_logprob_vectors']} distinct logprob vectors over {len(sizes)} batch sizes, "
                  f"{r['seconds']:.1f} s; groups {r['completion_groups']}", flush=True)
    write_json(args.json, {"info": info, "args": vars(args), "rows": rows,
                           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30})


if __name__ == "__main__":
    main()
