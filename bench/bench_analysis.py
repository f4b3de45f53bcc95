"""How long does the analysis of a large run take? Prints the time of each stage.

Synthetic coin-flip run shaped like the published GPT-4o study: a few dozen distinct
P(Heads) values, most samples on a handful of them, two fingerprints, a few errors.

    python bench/bench_analysis.py            # 1,000,000 samples
    python bench/bench_analysis.py -n 100000
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from detaudit.analysis import analyze, build_frames
from detaudit.records import Completion, Position, Sample, TokenLogprob

TRACKED = [{"label": "Heads", "token": "Heads", "position": 0},
           {"label": "Tails", "token": "T", "position": 0}]


def synthetic_samples(n: int, distinct: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    # a few dozen values around P(Heads) = 0.53, a few 1e-4 pp apart, some far apart
    probs = 0.53 + rng.normal(0, 2e-4, distinct) + np.repeat([0, 0.001, 0.003], -(-distinct // 3))[:distinct]
    weights = rng.zipf(1.6, distinct).astype(float)
    choice = rng.choice(distinct, size=n, p=weights / weights.sum())
    heads = [(repr(math.log(p)), math.log(p)) for p in probs]
    tails = [(repr(math.log(1 - p - 0.01)), math.log(1 - p - 0.01)) for p in probs]
    filler = [TokenLogprob(f"t{k}", -10.0 - k, repr(-10.0 - k)) for k in range(18)]
    samples = []
    for i, c in enumerate(choice.tolist()):
        if i % 5000 == 4999:
            samples.append(Sample(i, "error", None, 3, 0.0, 1.0, error_kind="rate_limit"))
            continue
        (h_text, h), (t_text, t) = heads[c], tails[c]
        top = [TokenLogprob("Heads", h, h_text), TokenLogprob("T", t, t_text)] + filler
        completion = Completion("Heads", "stop", [Position("Heads", h, h_text, top)], "gpt-4o",
                                "fp_a" if c % 2 else "fp_b")
        samples.append(Sample(i, "ok", completion, 1, 0.0, 0.2))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1_000_000)
    parser.add_argument("--distinct", type=int, default=40)
    parser.add_argument("--threshold-pct", type=float, default=0.01)
    args = parser.parse_args()

    t0 = time.perf_counter()
    samples = synthetic_samples(args.n, args.distinct)
    t1 = time.perf_counter()
    frames = build_frames(samples, TRACKED)
    t2 = time.perf_counter()
    result = analyze(frames, threshold_pct=args.threshold_pct, probe_kind="outcome")
    t3 = time.perf_counter()
    summary = json.dumps(result.to_dict(), allow_nan=False)
    t4 = time.perf_counter()

    print(f"samples            {args.n:>12,}   (top-20 logprobs each)")
    print(f"make samples       {t1 - t0:>10.2f} s   (synthetic input, not analysis)")
    print(f"build_frames       {t2 - t1:>10.2f} s")
    print(f"analyze            {t3 - t2:>10.2f} s")
    print(f"to_dict + json     {t4 - t3:>10.2f} s   ({len(summary):,} bytes)")
    print(f"analysis total     {t4 - t1:>10.2f} s")
    for t in result.tokens:
        print(f"  {t.label:<6} distinct {t.distinct_logprobs:>4}  clusters {len(t.clusters):>3}  "
              f"missing {t.missing}")


if __name__ == "__main__":
    main()
