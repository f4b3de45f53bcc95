"""Did the distribution change between two runs (two days, two fingerprints, two servers)?

Tests, one family, Holm-corrected together (so the chance that any of them flags a
difference between two runs of the same distribution stays at ``alpha``):

- outputs: a contingency table of run x distinct output. Pearson's chi-square test
  of independence; Fisher's exact test for a 2x2 table with an expected count
  below 5; for larger tables with small expected counts, a permutation test of the
  chi-square statistic (run labels shuffled, seeded, so the p-value repeats).
- each tracked token present in both runs (matched by label and position): the
  two-sample Kolmogorov-Smirnov test on its logprobs. On discrete data (few
  distinct values, many ties) its p-value is conservative: a "differ" stays trustworthy.

Beside the tests, for each outcome label: the difference of outcome shares
(B - A) with Newcombe's hybrid score interval built from the two Wilson intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from detaudit.analysis.frame import Frames
from detaudit.analysis.stats import wilson_interval
from detaudit.analysis.summary import json_safe

DEFAULT_ALPHA = 0.05
PERMUTATIONS = 4000
MIN_EXPECTED = 5.0


@dataclass
class StatTest:
    """One hypothesis test of "A and B come from the same distribution"."""

    name: str  # "outputs" or "logprob of <label>"
    method: str
    statistic: float | None
    p_value: float | None  # None: nothing to test (a side has no data)
    p_holm: float | None = None
    significant: bool = False
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class OutcomeDiff:
    label: str
    count_a: int
    n_a: int
    count_b: int
    n_b: int
    share_a: float
    share_b: float
    diff: float  # share_b - share_a
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Comparison:
    alpha: float
    n_a: int  # successful samples
    n_b: int
    tests: list[StatTest]
    outcomes: list[OutcomeDiff]
    fingerprints_a: dict[str, int]
    fingerprints_b: dict[str, int]
    only_in_a: list[str]  # tracked tokens without a partner
    only_in_b: list[str]

    @property
    def differ(self) -> bool:
        return any(t.significant for t in self.tests)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "alpha": self.alpha, "differ": self.differ, "n_a": self.n_a, "n_b": self.n_b,
            "correction": "holm", "tests": [t.to_dict() for t in self.tests],
            "outcomes": [o.to_dict() for o in self.outcomes],
            "fingerprints_a": self.fingerprints_a, "fingerprints_b": self.fingerprints_b,
            "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
        })


def compare(a: Frames, b: Frames, alpha: float = DEFAULT_ALPHA,
            outcome_labels: list[str] | None = None, seed: int = 0) -> Comparison:
    """Compare run A with run B. ``outcome_labels``: labels whose output shares are
    compared (default: the labels tracked in both runs)."""
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha {alpha!r} must be between 0 and 1, e.g. 0.05")
    ok_a, ok_b = _ok_outputs(a), _ok_outputs(b)
    tests = [outputs_test(ok_a, ok_b, seed=seed)]
    keys_a, keys_b = _token_keys(a), _token_keys(b)
    for key in [k for k in keys_a if k in keys_b]:
        tests.append(logprob_test(key, _logprobs(a, keys_a[key]), _logprobs(b, keys_b[key])))
    holm(tests, alpha)
    shared = [key for key in keys_a if key in keys_b]
    labels = outcome_labels if outcome_labels is not None else \
        list(dict.fromkeys(label for label, _position in shared))
    return Comparison(
        alpha=alpha, n_a=len(ok_a), n_b=len(ok_b), tests=tests,
        outcomes=[outcome_diff(label, ok_a, ok_b) for label in labels if label],
        fingerprints_a=_fingerprints(a), fingerprints_b=_fingerprints(b),
        only_in_a=[_name(k) for k in keys_a if k not in keys_b],
        only_in_b=[_name(k) for k in keys_b if k not in keys_a])


PROBE_KEYS = ("name", "kind", "api", "track", "request")


def incomparable(probe_a: dict[str, Any] | None, probe_b: dict[str, Any] | None,
                 tracked_a: list[dict[str, Any]], tracked_b: list[dict[str, Any]]) -> str | None:
    """Why A and B cannot be compared, or None.

    Two probes (or one probe sending other requests) measure different things, so a
    "no significant difference" between them would mean nothing; ``None`` for a side
    read from a file, which has no probe. A label tracked by two different tokens
    (Tails as "T" under one tokenizer and as "Tails" under another) would pair the
    logprobs of two tokens; an unresolved token (None) pairs with anything."""
    if probe_a is not None and probe_b is not None:
        for key in PROBE_KEYS:
            value_a, value_b = probe_a.get(key), probe_b.get(key)
            if value_a == value_b:
                continue
            if key == "request" and isinstance(value_a, dict) and isinstance(value_b, dict):
                keys = sorted(k for k in set(value_a) | set(value_b) if value_a.get(k) != value_b.get(k))
                return f"their probes send different requests ({', '.join(keys)} differ)"
            return f"they ran different probes ({key}: {_short(value_a)} vs {_short(value_b)})"
    tokens_b = {(str(t["label"]), t["position"]): t["token"] for t in tracked_b}
    for t in tracked_a:
        other = tokens_b.get((str(t["label"]), t["position"]))
        if t["token"] is not None and other is not None and other != t["token"]:
            return (f"they track {t['label']!r} by different tokens ({t['token']!r} vs "
                    f"{other!r}: other tokenizers), so its logprobs are not the same quantity")
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def outputs_test(a: pd.Series, b: pd.Series, seed: int = 0) -> StatTest:
    """Are the outputs distributed alike? ``a``, ``b``: one output text per sample."""
    if a.empty or b.empty:
        return StatTest("outputs", "none", None, None, detail={"reason": "a run has no successful samples"})
    table = contingency(a, b)
    if table.shape[1] == 1:  # one and the same output everywhere: nothing differs
        return StatTest("outputs", "identical", 0.0, 1.0, detail={"distinct_outputs": 1})
    expected = stats.contingency.expected_freq(table)
    detail = {"distinct_outputs": int(table.shape[1]), "min_expected": float(expected.min())}
    if expected.min() >= MIN_EXPECTED:
        chi2, p, dof, _ = stats.chi2_contingency(table)
        return StatTest("outputs", "chi-square", float(chi2), float(p), detail={**detail, "dof": int(dof)})
    if table.shape == (2, 2):
        odds, p = stats.fisher_exact(table)
        return StatTest("outputs", "fisher-exact", float(odds), float(p), detail=detail)
    chi2, p = permutation_chi2(table, seed=seed)
    return StatTest("outputs", "chi-square-permutation", chi2, p,
                detail={**detail, "permutations": PERMUTATIONS})


def contingency(a: pd.Series, b: pd.Series) -> np.ndarray:
    """2 x outputs count table (missing outputs as their own category)."""
    counts = pd.concat([a.fillna("\0none").value_counts().rename("a"),
                        b.fillna("\0none").value_counts().rename("b")], axis=1).fillna(0)
    return counts.to_numpy(dtype=np.int64).T


def permutation_chi2(table: np.ndarray, seed: int = 0,
                     permutations: int = PERMUTATIONS) -> tuple[float, float]:
    """Chi-square statistic and its permutation p-value (run labels shuffled)."""
    observed = _chi2(table)
    categories = np.repeat(np.arange(table.shape[1]), table.sum(axis=0))
    n_a = int(table[0].sum())
    rng = np.random.default_rng(seed)
    at_least = 0
    for _ in range(permutations):
        first = np.bincount(rng.permutation(categories)[:n_a], minlength=table.shape[1])
        at_least += _chi2(np.vstack([first, table.sum(axis=0) - first])) >= observed - 1e-12
    return observed, (at_least + 1) / (permutations + 1)


def _chi2(table: np.ndarray) -> float:
    expected = stats.contingency.expected_freq(table)
    return float(((table - expected) ** 2 / expected).sum())


def logprob_test(key: tuple[str, int], a: np.ndarray, b: np.ndarray) -> StatTest:
    """Kolmogorov-Smirnov on the logprobs of one tracked token."""
    name = f"logprob of {_name(key)}"
    detail = {"n_a": int(a.size), "n_b": int(b.size),
              "distinct_a": int(np.unique(a.view(np.int64)).size),
              "distinct_b": int(np.unique(b.view(np.int64)).size),
              "mean_a": float(a.mean()) if a.size else math.nan,
              "mean_b": float(b.mean()) if b.size else math.nan}
    if a.size == 0 or b.size == 0:
        return StatTest(name, "none", None, None, detail={**detail, "reason": "absent from a run's top-k"})
    result = stats.ks_2samp(a, b)
    return StatTest(name, "kolmogorov-smirnov", float(result.statistic), float(result.pvalue), detail=detail)


def holm(tests: list[StatTest], alpha: float) -> None:
    """Holm's step-down adjustment over the tests that have a p-value (in place)."""
    tested = sorted((t for t in tests if t.p_value is not None), key=lambda t: t.p_value)
    m = len(tested)
    running = 0.0
    for i, t in enumerate(tested):
        running = max(running, min(1.0, (m - i) * t.p_value))
        t.p_holm = running
        t.significant = running < alpha


def outcome_diff(label: str, a: pd.Series, b: pd.Series, confidence: float = 0.95) -> OutcomeDiff:
    """Share of outputs starting with ``label`` in B minus in A, with Newcombe's
    hybrid score interval (method 10), which behaves at shares of 0 and 1."""
    count_a = int(_starts_with(a, label).sum())
    count_b = int(_starts_with(b, label).sum())
    n_a, n_b = len(a), len(b)
    share_a = count_a / n_a if n_a else math.nan
    share_b = count_b / n_b if n_b else math.nan
    diff = share_b - share_a
    if not (n_a and n_b):
        return OutcomeDiff(label, count_a, n_a, count_b, n_b, share_a, share_b, diff, math.nan, math.nan)
    lo_a, hi_a = wilson_interval(count_a, n_a, confidence)
    lo_b, hi_b = wilson_interval(count_b, n_b, confidence)
    low = diff - math.sqrt((share_b - lo_b) ** 2 + (hi_a - share_a) ** 2)
    high = diff + math.sqrt((hi_b - share_b) ** 2 + (share_a - lo_a) ** 2)
    return OutcomeDiff(label, count_a, n_a, count_b, n_b, share_a, share_b, diff, low, high)


def _starts_with(outputs: pd.Series, label: str) -> pd.Series:
    return outputs.fillna("").astype(str).str.lstrip().str.startswith(label)


def _ok_outputs(frames: Frames) -> pd.Series:
    samples = frames.samples
    return samples.loc[samples["status"] == "ok", "output"].reset_index(drop=True)


def _token_keys(frames: Frames) -> dict[tuple[str, int], int]:
    """(label, position) -> slot, in report order."""
    slots = frames.tracked[["slot", "label", "position"]].drop_duplicates("slot").sort_values("slot")
    keys: dict[tuple[str, int], int] = {}
    for r in slots.itertuples():
        keys.setdefault((str(r.label), int(r.position)), int(r.slot))
    return keys


def _logprobs(frames: Frames, slot: int) -> np.ndarray:
    values = frames.tracked.loc[frames.tracked["slot"] == slot, "logprob"].to_numpy(np.float64)
    return values[np.isfinite(values)]  # absent (NaN) and bad (NaN, inf) values left out


def _fingerprints(frames: Frames) -> dict[str, int]:
    samples = frames.samples
    ok = samples[samples["status"] == "ok"]
    return {str(k): int(v) for k, v in ok["system_fingerprint"].fillna("(none)").value_counts().items()}


def _name(key: tuple[str, int]) -> str:
    label, position = key
    return label if position == 0 else f"{label} @ {position}"
