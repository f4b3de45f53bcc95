"""How much does packing save crosscheck's reference? One run times the bundled engine's
teacher forcing of many completions of one prompt, one sequence per forward pass
(``Engine.score`` each) against packed passes (``Engine.score_many``, what
``detaudit crosscheck`` uses with batch-invariant kernels), and checks that every value
is bitwise the same.

    python bench/bench_crosscheck.py                      # tiny model, 256 completions
    python bench/bench_crosscheck.py --model DIR --device cuda --completions 1024
    python bench/bench_crosscheck.py --random-1b /tmp/llama1b --device cuda --dtype bfloat16
                                     # writes a random-init Llama-3.2-1B-shaped folder first

Seconds are wall time, best of --rounds; the ratio is what to read on a CPU.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from local_backend.engine import Engine  # noqa: E402


def write_random_1b(folder: Path) -> None:
    """A Llama-3.2-1B-shaped model with random weights (bf16), as bench_e2e uses."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--completions", type=int, default=256)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--random-1b", type=Path, metavar="DIR",
                        help="write a random-init Llama-3.2-1B-shaped model to DIR and score with it")
    args = parser.parse_args()
    if args.random_1b is not None:
        write_random_1b(args.random_1b)
        args.model = str(args.random_1b)

    engine = Engine.load(args.model, kernels="batch-invariant", device=args.device, dtype=args.dtype,
                         max_slots=args.slots, max_len=512)
    rng = random.Random(0)
    vocab = engine.config.vocab_size
    prompt = [rng.randrange(3, vocab) for _ in range(24)]
    completions = [[rng.randrange(3, vocab) for _ in range(rng.randint(args.min_tokens, args.max_tokens))]
                   for _ in range(args.completions)]
    tokens = sum(map(len, completions))

    def alone():
        return [engine.score(prompt, ids) for ids in completions]

    def packed():
        return engine.score_many(prompt, completions)

    best, results = {}, {}
    for _ in range(args.rounds):
        for name, fn in (("one per pass", alone), ("packed", packed)):
            started = time.perf_counter()
            results[name] = fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
    same = results["one per pass"] == results["packed"]
    facts = engine.describe()
    print(f"{args.completions} completions, {tokens:,} scored tokens, prompt 24 tokens; "
          f"{facts['kernels']} ({facts['kernel_impl']}, {facts['dtype']}) on {facts['device']}, "
          f"{args.slots} slots, best of {args.rounds}")
    for name, seconds in best.items():
        print(f"  {name:13s} {seconds:7.2f} s   {tokens / seconds:10,.0f} tok/s")
    print(f"  packed / one per pass: {best['one per pass'] / best['packed']:.2f}x faster; "
          f"bitwise equal: {same}")
    if not same:
        sys.exit("packed scores differ from scores alone")


if __name__ == "__main__":
    main()
