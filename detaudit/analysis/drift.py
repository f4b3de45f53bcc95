"""Drift against a baseline with a measured noise floor: does a new run differ from two
or more baseline runs of the same probe by more than they differ from each other?

Two runs of one endpoint can differ without anything having changed: other batches,
other load, another replica, sampling. A plain two-sample test (``compare A B``) flags
those. Here the baseline runs measure how much the endpoint differs from itself, and a
new run is flagged only when it is further away than that.

Model: run j has its own offset u_j ~ N(0, tau^2) (run-to-run variation), and its
samples add sampling noise. The rule, per statistic D (a distance between two sets of
samples: ``detaudit.analysis.two_sample``, ``mmd``), with k baseline runs:

1. NEW's distance: d = D(NEW, the k baseline runs pooled).
2. p_samples: the permutation test of NEW against the pooled baseline (samples shuffled
   between the two, seeded): is NEW more than sampling noise away from the baseline?
   For completions this is the MMD test of Model Equality Testing (Gao et al., ICLR 2025:
   unbiased MMD^2, Hamming kernel).
3. The noise floor, from the baseline runs alone. Leave one run out: d_i = D(run i, the
   other baseline runs pooled), and m_i = the mean of D^2 over random splits of those
   samples into groups of the same sizes (what sampling alone gives that split). Then
   tau^2 = max(0, (k-1)/k * mean(d_i^2 - m_i)), the run-to-run variance beyond sampling
   noise (E d_i^2 = tau^2 k/(k-1) + m_i), and noise^2 = the m_i rescaled to NEW's and the
   pool's sizes (as c (1/n_x + 1/n_y), the variance of a difference of two means).
   floor = sqrt(tau^2 (1 + 1/k) + noise^2): the expected distance of one more run of the
   endpoint from the pooled baseline. For a statistic that is one number per run (a
   mean) and runs of equal size, floor = max(s sqrt(1 + 1/k), noise), s the standard
   deviation of the k run values.
4. p_runs = P(|t_(k-1)| >= d / floor), Student's t with k - 1 degrees of freedom: the
   prediction interval of one more run under a normal random-effects model, exact there
   whatever tau is (a floor that sampling noise bounds from below only makes it
   safer). Few runs know the floor poorly and pay for it: at alpha 0.05 NEW must be
   12.7 floors away with 2 baseline runs, 4.3 with 3, 2.8 with 5, 2.3 with 10 (``bound``
   = floor * t_(k-1)(1 - alpha/2)). Without run-to-run variation the floor shrinks with
   the sample size, so more samples per run find smaller shifts.
5. p = max(p_runs, p_samples): a statistic differs only when it is beyond the endpoint's
   run-to-run floor and beyond sampling noise. Holm's correction across the statistics;
   NEW differs when any adjusted p < alpha.

Statistics: the outputs (total variation distance), or for completions the token
sequences instead (MMD with the Hamming kernel: the outputs are their text, and a
total variation over texts that are nearly all distinct says nothing); each tracked
token present in NEW and in at least two baseline runs (Wasserstein-1 distance of its
logprobs, in nats, over the samples where it is in the top-k). Baseline runs of similar
size estimate the floor best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from detaudit.analysis.compare import holm
from detaudit.analysis.frame import Frames
from detaudit.analysis.mmd import HammingMMD
from detaudit.analysis.summary import COMPLETION_KINDS, json_safe
from detaudit.analysis.two_sample import (OutputShares, TwoSample, ValueDistribution,
                                          distance, null_distribution, p_value)

DEFAULT_ALPHA = 0.05
PERMUTATIONS = 2000
FLOOR_PERMUTATIONS = 400  # per baseline run: only the mean of its null is used


@dataclass
class Floor:
    """How far the baseline runs are from each other, in the statistic's distance."""

    leave_one_out: list[float]  # per baseline run: D(run, pool of the other runs)
    leave_one_out_noise: list[float]  # per baseline run: RMS distance sampling alone gives it
    pairwise: list[list[float]]  # D(run i, run j)
    between_runs: float  # tau: run-to-run spread beyond sampling noise
    sampling_noise: float  # RMS distance sampling alone gives NEW vs the pooled baseline
    distance: float  # sqrt(between_runs^2 (1 + 1/k) + sampling_noise^2): expected for one more run
    multiplier: float  # t_(k-1)(1 - alpha/2)
    bound: float  # distance * multiplier: the distance at which p_runs = alpha


@dataclass
class DriftTest:
    """One statistic: NEW's distance, the floor, and both p-values."""

    name: str  # "outputs", "logprob of Heads", "token sequences"
    distance: str  # the distance's name, e.g. "total variation"
    test: str  # what the permutation test ranks
    n_new: int
    n_baseline: list[int]  # samples with this statistic, per baseline run
    new_distance: float | None = None
    floor: Floor | None = None
    ratio: float | None = None  # new_distance / floor.distance: the t value
    p_runs: float | None = None
    test_statistic: float | None = None
    p_samples: float | None = None
    p: float | None = None  # max(p_runs, p_samples)
    p_holm: float | None = None
    differs: bool = False
    reason: str | None = None  # why it was not tested
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def p_value(self) -> float | None:  # the name ``compare.holm`` reads
        return self.p

    @property
    def significant(self) -> bool:
        return self.differs

    @significant.setter
    def significant(self, value: bool) -> None:
        self.differs = value

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "floor"}
        out["floor"] = None if self.floor is None else dict(self.floor.__dict__)
        return out


@dataclass
class Drift:
    alpha: float
    permutations: int
    seed: int
    n_new: int  # successful samples
    n_baseline: list[int]
    tests: list[DriftTest]
    fingerprints_new: dict[str, int]
    fingerprints_baseline: list[dict[str, int]]

    @property
    def differs(self) -> bool:
        return any(t.differs for t in self.tests)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "differs": self.differs, "alpha": self.alpha, "correction": "holm",
            "rule": RULE, "permutations": self.permutations, "seed": self.seed,
            "baseline_runs": len(self.n_baseline), "n_new": self.n_new,
            "n_baseline": self.n_baseline, "statistics": [t.to_dict() for t in self.tests],
            "fingerprints_new": self.fingerprints_new,
            "fingerprints_baseline": self.fingerprints_baseline,
        })


RULE = ("per statistic: d = distance of NEW from the pooled baseline; p_samples = "
        "permutation p of NEW vs the pooled baseline; floor = sqrt(tau^2 (1 + 1/k) + noise^2), "
        "tau^2 = max(0, (k-1)/k mean(d_i^2 - m_i)), d_i = distance of baseline run i from the "
        "other baseline runs, m_i = its mean square under permutation, noise^2 = the m_i "
        "rescaled to NEW's size; p_runs = P(|t_(k-1)| >= d / floor); p = max(p_runs, "
        "p_samples); Holm across statistics; differs when any adjusted p < alpha")


def drift(new: Frames, baselines: Sequence[Frames], alpha: float = DEFAULT_ALPHA,
          permutations: int = PERMUTATIONS, seed: int = 0,
          probe_kind: str | None = None) -> Drift:
    """Test the run ``new`` against two or more ``baselines`` (see the module docstring).
    ``probe_kind``: a completion kind switches on the token-sequence MMD, which any run
    with multi-token answers gets anyway."""
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha {alpha!r} must be between 0 and 1, e.g. 0.05")
    if len(baselines) < 2:
        raise ValueError(f"{len(baselines)} baseline run(s): a noise floor needs at least two")
    if permutations < 1:
        raise ValueError(f"permutations {permutations!r} must be at least 1")
    runs = [new, *baselines]
    ok = [_ok(f) for f in runs]

    def tested(stat: TwoSample, sizes: list[int]) -> DriftTest:
        new_rows, *baseline_rows = _run_rows(sizes)
        return assess(stat, new_rows, baseline_rows, alpha, permutations, seed)

    lengths = [o["tokens"].map(len) for o in ok]
    multi_token = any(len(n) and int(n.max()) > 1 for n in lengths)
    sequences = [tuple(t) for o in ok for t in o["tokens"]]
    completions = (multi_token or probe_kind in COMPLETION_KINDS) and any(sequences)
    sizes = [len(o) for o in ok]
    tests = [tested(HammingMMD(sequences), sizes) if completions else
             tested(OutputShares(pd.concat([o["output"] for o in ok]).tolist()), sizes)]
    for key in _shared_keys(runs):
        values = [_logprobs(f, key) for f in runs]
        stat = ValueDistribution(np.concatenate(values))
        stat.name, stat.distance_name = f"logprob of {_name(key)}", "W1, nats"
        tests.append(tested(stat, [len(v) for v in values]))
    holm(tests, alpha)
    return Drift(alpha=alpha, permutations=permutations, seed=seed, n_new=len(ok[0]),
                 n_baseline=[len(o) for o in ok[1:]], tests=tests,
                 fingerprints_new=_fingerprints(ok[0]),
                 fingerprints_baseline=[_fingerprints(o) for o in ok[1:]])


def assess(stat: TwoSample, new: np.ndarray, baseline: Sequence[np.ndarray], alpha: float,
           permutations: int = PERMUTATIONS, seed: int = 0) -> DriftTest:
    """Steps 1-5 of the module docstring (Holm aside) for one statistic: ``new`` and each
    of ``baseline`` are index arrays of that run's samples in ``stat``'s data."""
    test = DriftTest(stat.name, stat.distance_name, stat.test_name, n_new=len(new),
                     n_baseline=[len(r) for r in baseline])
    usable = [r for r in baseline if len(r) >= stat.min_per_side]
    if len(new) < stat.min_per_side:
        test.reason = f"NEW has {len(new)} sample(s) with it (needs {stat.min_per_side})"
        return test
    if len(usable) < 2:
        test.reason = f"{len(usable)} baseline run(s) have it (a floor needs two)"
        return test
    if len(usable) < len(baseline):
        test.detail["baseline_runs_without_it"] = len(baseline) - len(usable)
    pool = np.concatenate(usable)
    test.new_distance, test.test_statistic = distance(stat, new, pool)
    _, null = null_distribution(stat, new, pool, permutations, seed)
    test.p_samples = p_value(null, test.test_statistic)
    test.floor = noise_floor(stat, usable, len(new), alpha, permutations, seed)
    floor, d = test.floor.distance, test.new_distance
    if d <= 0.0:
        test.ratio, test.p_runs = 0.0, 1.0
    elif floor == 0.0:  # the baseline runs agree exactly, and sampling moves nothing
        test.ratio, test.p_runs = math.inf, 0.0
    else:
        test.ratio = d / floor
        test.p_runs = float(min(1.0, 2 * stats.t.sf(test.ratio, len(usable) - 1)))
    test.p = max(test.p_runs, test.p_samples)
    return test


def noise_floor(stat: TwoSample, runs: Sequence[np.ndarray], n_new: int, alpha: float,
                permutations: int = PERMUTATIONS, seed: int = 0) -> Floor:
    """Step 3 of the module docstring: how far one more run of the endpoint, of ``n_new``
    samples, is expected to be from the pooled ``runs`` (two or more), and the bound."""
    k = len(runs)
    sizes = np.array([len(r) for r in runs], dtype=np.float64)
    loo, loo_noise = [], []
    for i, run in enumerate(runs):
        rest = np.concatenate(list(runs[:i]) + list(runs[i + 1:]))
        loo.append(distance(stat, run, rest)[0])
        null, _ = null_distribution(stat, run, rest, min(permutations, FLOOR_PERMUTATIONS),
                                    seed + 1 + i)
        loo_noise.append(float(np.mean(np.square(null))))
    noise = np.array(loo_noise)
    # each m_i is c (1/n_i + 1/n_rest_i), as for a difference of two means: c, then NEW's
    unit = float(np.mean(noise / (1 / sizes + 1 / (sizes.sum() - sizes))))
    noise2 = unit * (1 / n_new + 1 / sizes.sum())
    between2 = max(0.0, (k - 1) / k * float(np.mean(np.square(loo) - noise)))
    floor = math.sqrt(between2 * (1 + 1 / k) + noise2)
    pairwise = [[0.0 if i == j else distance(stat, a, b)[0] for j, b in enumerate(runs)]
                for i, a in enumerate(runs)]
    multiplier = float(stats.t.isf(alpha / 2, k - 1))
    return Floor(leave_one_out=loo, leave_one_out_noise=[math.sqrt(m) for m in loo_noise],
                 pairwise=pairwise, between_runs=math.sqrt(between2),
                 sampling_noise=math.sqrt(noise2), distance=floor, multiplier=multiplier,
                 bound=floor * multiplier)


def _run_rows(sizes: list[int]) -> list[np.ndarray]:
    """Index ranges of each run's samples in the concatenated data."""
    ends = np.cumsum(sizes)
    return [np.arange(end - size, end) for size, end in zip(sizes, ends)]


def _ok(frames: Frames) -> pd.DataFrame:
    samples = frames.samples
    return samples[samples["status"] == "ok"].reset_index(drop=True)


def _slot_keys(frames: Frames) -> dict[tuple[str, int, str], int]:
    """(label, position, token) -> slot; a slot whose token was never resolved has none."""
    keys: dict[tuple[str, int, str], int] = {}
    for slot, t in enumerate(frames.tracked_tokens):
        if t.get("token") is not None and isinstance(t.get("position"), int):
            keys.setdefault((str(t["label"]), int(t["position"]), str(t["token"])), slot)
    return keys


def _shared_keys(runs: list[Frames]) -> list[tuple[str, int, str]]:
    """Tracked tokens of NEW that at least two baseline runs track too, in NEW's order."""
    new_keys, *baseline_keys = [_slot_keys(f) for f in runs]
    return [key for key in new_keys if sum(key in keys for keys in baseline_keys) >= 2]


def _logprobs(frames: Frames, key: tuple[str, int, str]) -> np.ndarray:
    slot = _slot_keys(frames).get(key)
    if slot is None:
        return np.empty(0)
    values = frames.tracked.loc[frames.tracked["slot"] == slot, "logprob"].to_numpy(np.float64)
    return values[np.isfinite(values)]  # absent (NaN) and bad (NaN, inf) values left out


def _fingerprints(ok: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in ok["system_fingerprint"].fillna("(none)").value_counts().items()}


def _name(key: tuple[str, int, str]) -> str:
    label, position, _token = key
    return label if position == 0 or label == f"pos {position}" else f"{label} @ {position}"
