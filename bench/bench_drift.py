"""How long does ``compare NEW --baseline A B C`` take on large completion runs? Prints
the time of the MMD permutation test alone and of the whole rule (floor included).

Synthetic sampled completions: every run draws its tokens from one distribution over a
vocabulary, so most (position, token) pairs recur (the costly case for the MMD counts).

    python bench/bench_drift.py                      # 4 runs x 1,000 samples x 100 tokens
    python bench/bench_drift.py -n 2000 --length 50 --vocab 50000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from detaudit.analysis.drift import PERMUTATIONS, assess
from detaudit.analysis.mmd import HammingMMD, encode
from detaudit.analysis.two_sample import permutation_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="samples per run")
    parser.add_argument("--runs", type=int, default=4, help="NEW + baseline runs")
    parser.add_argument("--length", type=int, default=100, help="tokens per completion")
    parser.add_argument("--vocab", type=int, default=200, help="distinct tokens")
    parser.add_argument("--permutations", type=int, default=PERMUTATIONS)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weights = rng.zipf(1.3, args.vocab).astype(float)
    total = args.n * args.runs
    tokens = rng.choice(args.vocab, size=(total, args.length), p=weights / weights.sum())
    sequences = [tuple(f"t{t}" for t in row) for row in tokens]

    start = time.perf_counter()
    stat = HammingMMD(encode(sequences))
    encoded = time.perf_counter() - start
    rows = [np.arange(i * args.n, (i + 1) * args.n) for i in range(args.runs)]
    start = time.perf_counter()
    permutation_test(stat, rows[0], np.concatenate(rows[1:]), args.permutations)
    mmd_test = time.perf_counter() - start
    start = time.perf_counter()
    assess(stat, rows[0], rows[1:], alpha=0.05, permutations=args.permutations)
    rule = time.perf_counter() - start
    print(json.dumps({"samples": total, "length": args.length, "vocab": args.vocab,
                      "shared_features": stat.feature_count, "permutations": args.permutations,
                      "encode_s": round(encoded, 3), "mmd_permutation_test_s": round(mmd_test, 3),
                      "whole_rule_s": round(rule, 3)}))


if __name__ == "__main__":
    main()
