"""analyze(frames) -> Analysis: every figure the report, JSON summary and CSVs show.

Pure: frames in, dataclasses out, no I/O. Probabilities in the token spreads are
fractions (0..1); cluster centres, bounds and widths are in percent, as the
threshold is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from detaudit.analysis.agreement import REQUESTED, Agreement, agreement, logprobs_status
from detaudit.analysis.clusters import (NO_FINGERPRINT, DistinctValues, cluster_table,
                                         distinct_values, fingerprint_numbers)
from detaudit.analysis.divergence import Divergence, divergence
from detaudit.analysis.frame import Frames, is_null, natural_key, tracked_slots
from detaudit.records import Coded
from detaudit.analysis.logit_grid import log_odds_of_pct
from detaudit.analysis.stats import Spread, spread, wilson_interval
from detaudit.defaults import DEFAULT_THRESHOLD_PCT

COMPLETION_KINDS = ("fixed-seed", "greedy-divergence", "top-logprobs")
OUTCOME_KINDS = ("outcome", "load-sweep")
VALUES_CAP = 100  # distinct values listed per token in the JSON summary
OUTPUTS_CAP = 20  # top outputs listed


@dataclass
class TokenResult:
    """All figures for one tracked token."""

    label: str
    token: str | None
    position: int
    n: int  # successful samples
    missing: int  # samples whose top-k lacked the token
    bad: int  # samples whose value for the token was NaN or infinite (see frame.is_bad_logprob)
    distinct_logprobs: int
    logprob: Spread
    prob: Spread
    clusters: pd.DataFrame  # see clusters.cluster_table
    values: pd.DataFrame  # logprob_text, logprob, prob, count; most frequent first
    by_fingerprint: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self, threshold_pct: float) -> dict[str, Any]:
        clusters = [{"cluster": int(r.cluster), "centre_pct": r.centre, "min_pct": r.min,
                     "max_pct": r.max, "width_pct": r.width,
                     "centre_log_odds": float(log_odds_of_pct(r.centre)),
                     "min_log_odds": float(log_odds_of_pct(r.min)),
                     "max_log_odds": float(log_odds_of_pct(r.max)), "count": int(r.count),
                     "share": r.share, "distinct_values": int(r.distinct_values),
                     "fingerprints": r.fingerprints}
                    for r in self.clusters.itertuples()]
        values = [{"logprob_text": r.logprob_text, "logprob": r.logprob, "prob": r.prob,
                   "count": int(r.count)} for r in self.values.head(VALUES_CAP).itertuples()]
        return {
            "label": self.label, "token": self.token, "position": self.position,
            "n": self.n, "missing": self.missing, "bad_values": self.bad,
            "distinct_logprobs": self.distinct_logprobs, "clusters": len(self.clusters),
            "threshold_pct": threshold_pct,
            "prob": self.prob.to_dict(), "logprob": self.logprob.to_dict(),
            "cluster_list": clusters,
            "distinct_values": values,
            "distinct_values_truncated": self.distinct_logprobs > VALUES_CAP,
            "by_fingerprint": self.by_fingerprint,
        }


@dataclass
class Outcome:
    """P(output starts with the label), with its Wilson 95% interval, beside the mean
    probability the model reported for the label's tracked token."""

    label: str
    count: int
    n: int
    share: float
    ci_low: float
    ci_high: float
    mean_reported_prob: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Analysis:
    """The result of ``analyze``; ``to_dict()`` is the JSON summary. Keeps its frames
    so the samples CSV can be written from it."""

    n: int
    ok: int
    errors: int
    errors_by_kind: dict[str, int]
    threshold_pct: float
    probe_kind: str | None
    tokens: list[TokenResult]
    outcomes: list[Outcome]
    outputs_distinct: int
    outputs_top: list[tuple[str | None, int]]
    fingerprints: dict[str, int]
    groups: list[dict[str, Any]]
    divergence: Divergence | None
    # NaN or infinite logprobs among the successful samples (chosen and top-k): how
    # many samples carried any, and how many values in all. Never "deterministic".
    bad_logprobs: dict[str, int] = field(default_factory=lambda: {"samples": 0, "values": 0})
    frames: Frames | None = field(default=None, repr=False)
    # Logit grid and top-k entropy (detaudit.analysis.insight), attached by the caller
    # when the samples' top-k lists are at hand; in the JSON as "insight".
    insight: Any = field(default=None, repr=False)
    # requested | not_requested | not_returned (detaudit.analysis.agreement); without
    # logprobs the run is text-only: no tokens, no divergence, agreement figures instead
    logprobs: str = REQUESTED
    agreement: Agreement | None = None

    @property
    def text_only(self) -> bool:
        return self.logprobs != REQUESTED

    @property
    def deterministic(self) -> bool:
        """One distinct value for every tracked token, one distinct output, no bad
        (NaN, infinite) logprob, and for completions one token sequence and one
        logprob vector: the same text with other numbers is not deterministic."""
        return (self.ok > 0 and self.outputs_distinct <= 1 and not self.bad_logprobs["samples"]
                and all(t.distinct_logprobs <= 1 and not t.bad for t in self.tokens)
                and (self.divergence is None or self.divergence.deterministic))

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary: plain types only, NaN and inf as null."""
        return json_safe({
            "n": self.n, "ok": self.ok, "errors": self.errors,
            "errors_by_kind": self.errors_by_kind,
            "probe_kind": self.probe_kind, "threshold_pct": self.threshold_pct,
            "deterministic": self.deterministic,
            "bad_logprobs": self.bad_logprobs,
            "tokens": [t.to_dict(self.threshold_pct) for t in self.tokens],
            "outcomes": [o.to_dict() for o in self.outcomes],
            "outputs": {"distinct": self.outputs_distinct,
                        "top": [[text, count] for text, count in self.outputs_top]},
            "fingerprints": self.fingerprints,
            "groups": self.groups,
            "divergence": self.divergence.to_dict() if self.divergence else None,
            "logprobs": self.logprobs,
            "agreement": self.agreement.to_dict() if self.agreement else None,
            **({"insight": self.insight.to_dict()} if self.insight is not None else {}),
        })


def analyze(frames: Frames, threshold_pct: float = DEFAULT_THRESHOLD_PCT,
            probe_kind: str | None = "outcome", *, logprobs_requested: bool = True,
            answer_regex: str | None = None, tokenize: Callable[[str], Sequence[Any]] | None = None,
            tokenizer: str | None = None) -> Analysis:
    """Every figure of a run. ``probe_kind`` switches on the outcome shares (outcome,
    load-sweep) and the completion analysis (fixed-seed, greedy-divergence,
    top-logprobs; also any run with multi-token answers). None: data from a file.

    Text-only runs (logprobs not requested, or not returned) get no token figures and
    no logprob divergence; their agreement carries the first divergence by ``tokenize``
    (the model's tokenizer, named ``tokenizer``) or by character."""
    check_threshold(threshold_pct)
    samples = frames.samples
    is_ok = _equal(samples["status"], "ok")
    # only the columns read below: taking every column of a million rows costs more
    ok = samples.loc[is_ok, [c for c in _OK_COLUMNS if c in samples]]
    errors = samples.loc[~is_ok, ["error_kind"]]
    outputs = ok["output"].value_counts(dropna=False)
    fingerprints = ok["system_fingerprint"].fillna(NO_FINGERPRINT).value_counts()
    slots = tracked_slots(frames)
    status = logprobs_status(samples, logprobs_requested)
    text_only = status != REQUESTED
    labels = [s["label"] for s in slots] if text_only else None  # outcomes by text alone
    if text_only:
        slots = []
    rows = _Rows.of(frames) if slots else None
    slot_of = frames.tracked_array("slot") if slots else None
    tokens = [_token_result(rows, slot_of == slot, t, threshold_pct)
              for slot, t in enumerate(slots)]
    multi_token = bool(len(ok)) and max(map(len, ok["tokens"].to_numpy())) > 1
    completions = not text_only and (multi_token or (probe_kind in COMPLETION_KINDS and len(ok) > 0))
    return Analysis(
        n=len(samples), ok=len(ok), errors=len(errors),
        errors_by_kind={str(k): int(v) for k, v in
                        errors["error_kind"].fillna("unknown").value_counts().items()},
        threshold_pct=threshold_pct, probe_kind=probe_kind, tokens=tokens,
        outcomes=_outcomes(outputs, len(ok), tokens, labels) if probe_kind in OUTCOME_KINDS else [],
        outputs_distinct=len(outputs),
        outputs_top=[(None if is_null(k) else str(k), int(v))
                     for k, v in outputs.head(OUTPUTS_CAP).items()],
        fingerprints={str(k): int(v) for k, v in fingerprints.items()},
        groups=_groups(samples, frames, slots, threshold_pct, completions, rows),
        divergence=divergence(ok) if completions else None,
        bad_logprobs=_bad_logprobs(ok),
        frames=frames, logprobs=status,
        agreement=agreement(samples, answer_regex, tokenize, tokenizer, divergence=text_only),
    )


_OK_COLUMNS = ("status", "output", "system_fingerprint", "tokens", "logprobs", "bad_logprobs")


def _equal(column: pd.Series, value: Any) -> np.ndarray:
    """``column == value`` as a bool array, compared as Python objects (NaN: False)."""
    return column.to_numpy(dtype=object) == value


@dataclass
class _Rows:
    """Tracked rows as arrays: what the token figures read, without indexing a frame.
    Texts and groups are codes (``Coded``); fingerprints are numbered once for the
    whole frame (``fingerprints``: the names)."""

    logprob: np.ndarray  # float64
    received: np.ndarray  # a logprob text came with the row
    text: Coded
    fingerprint: np.ndarray  # int64 numbers into ``fingerprints``
    fingerprints: list[str]
    group: Coded
    finite: np.ndarray  # the logprob is a number (not NaN, not infinite)

    @classmethod
    def of(cls, frames: Frames) -> "_Rows":
        text = frames.tracked_coded("logprob_text")
        codes, names = fingerprint_numbers(frames.tracked_coded("system_fingerprint"))
        logprob = frames.tracked_array("logprob")
        received = ~text.equals(None)
        return cls(logprob=logprob, received=received, text=text, fingerprint=codes,
                   fingerprints=names, group=frames.tracked_coded("group"),
                   finite=np.isfinite(logprob))

    def where(self, mask: np.ndarray) -> "_Rows":
        return _Rows(self.logprob[mask], self.received[mask], self.text.take(mask),
                     self.fingerprint[mask], self.fingerprints, self.group.take(mask),
                     self.finite[mask])

    def __len__(self) -> int:
        return len(self.logprob)

    def fingerprint_labels(self) -> pd.Categorical:
        return pd.Categorical.from_codes(self.fingerprint, categories=self.fingerprints)


def check_threshold(threshold_pct: Any) -> float:
    """The cluster threshold, or ValueError: a finite number of percentage points >= 0
    (inf or NaN would make every value one cluster, or none)."""
    if not (isinstance(threshold_pct, (int, float)) and not isinstance(threshold_pct, bool)
            and math.isfinite(threshold_pct) and threshold_pct >= 0):
        raise ValueError(f"cluster threshold {threshold_pct!r} is not valid; give a finite "
                         "number of percentage points >= 0, e.g. 0.01")
    return threshold_pct


def _bad_logprobs(ok: pd.DataFrame) -> dict[str, int]:
    counts = ok["bad_logprobs"].to_numpy(np.int64) if "bad_logprobs" in ok else np.zeros(0, np.int64)
    return {"samples": int((counts > 0).sum()), "values": int(counts.sum())}


def _split(rows: _Rows, mask: np.ndarray) -> tuple[_Rows, int, int]:
    """The tracked rows of ``mask`` -> (those with a finite value, missing count, bad
    count). Missing: the token was not in the top-k (no text). Bad: the server sent it
    as NaN or infinity."""
    finite = rows.finite
    missing = int((mask & ~rows.received & ~finite).sum())
    bad = int((mask & rows.received & ~finite).sum())
    return rows.where(mask & finite), missing, bad


def _token_result(rows: _Rows, mask: np.ndarray, slot: dict[str, Any],
                  threshold_pct: float) -> TokenResult:
    present, missing, bad = _split(rows, mask)
    logprob = present.logprob
    distinct = distinct_values(logprob, present.text)
    values = pd.DataFrame({"logprob_text": distinct.text, "logprob": distinct.logprob,
                           "prob": np.exp(distinct.logprob), "count": distinct.count})
    values = values.sort_values(["count", "logprob"], ascending=[False, False], kind="stable")
    prob = np.exp(logprob)
    return TokenResult(
        label=slot["label"], token=slot["token"], position=int(slot["position"]),
        n=int(mask.sum()), missing=missing, bad=bad,
        distinct_logprobs=len(distinct.count), logprob=spread(logprob),
        prob=spread(prob),
        clusters=cluster_table(distinct, threshold_pct, present.fingerprint_labels()),
        values=values, by_fingerprint=_by_fingerprint(present, distinct, prob),
    )


def _by_fingerprint(present: _Rows, distinct: DistinctValues,
                    prob: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per system_fingerprint: samples with the token, distinct values, mean probability.
    Counted on the fingerprints' numbers. The mean is numpy's over the fingerprint's
    values in sample order, as for groups: pandas' group mean gave another last bit for
    the same values depending on where the group fell among the others."""
    if not len(present):
        return {}
    codes, names = present.fingerprint, present.fingerprints
    n = np.bincount(codes, minlength=len(names))
    pairs = np.unique(codes * len(distinct.count) + distinct.inverse)
    distinct_of = np.bincount(pairs // len(distinct.count), minlength=len(names))
    order = np.argsort(codes, kind="stable")  # each fingerprint's values, in sample order
    used = np.flatnonzero(n)
    chunks = np.split(np.asarray(prob, dtype=np.float64)[order], np.cumsum(n[used])[:-1])
    table = pd.DataFrame({"n": n[used], "distinct": distinct_of[used],
                          "mean_prob": [chunk.mean() for chunk in chunks]},
                         index=pd.Index([names[c] for c in used], name="fp"))
    table = table.sort_index().sort_values("n", ascending=False)
    return {str(fp): {"n": int(r.n), "distinct_logprobs": int(r.distinct),
                      "mean_prob": float(r.mean_prob)} for fp, r in table.iterrows()}


def _outcomes(outputs: pd.Series, n: int, tokens: list[TokenResult],
              labels: list[str] | None = None) -> list[Outcome]:
    """For each label: the share of outputs starting with it (leading whitespace ignored).
    ``outputs`` are the distinct outputs with their counts, so this is cheap at any n.
    ``labels``: a text-only run's labels, with no reported probability (NaN)."""
    texts = ["" if is_null(t) else str(t).lstrip() for t in outputs.index]
    counts = outputs.to_numpy()
    result = []
    seen: set[str] = set()
    pairs = [(t.label, t.prob.mean) for t in tokens] if labels is None else \
        [(label, math.nan) for label in labels]
    for label, reported in pairs:
        if label in seen or not label:
            continue
        seen.add(label)
        count = int(sum(c for text, c in zip(texts, counts) if text.startswith(label)))
        low, high = wilson_interval(count, n)
        result.append(Outcome(label=label, count=count, n=n,
                              share=count / n if n else math.nan, ci_low=low, ci_high=high,
                              mean_reported_prob=reported))
    return result


def _groups(samples: pd.DataFrame, frames: Frames, slots: list[dict[str, Any]],
            threshold_pct: float, completions: bool = False,
            rows: _Rows | None = None) -> list[dict[str, Any]]:
    """Per group (load level, batch size): distinct outputs and logprobs of each token;
    for completions also distinct token sequences and logprob vectors, and the first
    position where the vectors differ."""
    if samples["group"].isna().all():
        return []
    result = []
    keys = sorted(samples["group"].dropna().unique(), key=natural_key)
    sample_group = samples["group"].to_numpy(dtype=object)
    wanted = [c for c in ("status", "output", "bad_logprobs", "tokens", "logprobs") if c in samples]
    slot_of = frames.tracked_array("slot") if slots else None
    for key in keys:
        in_group = samples.loc[sample_group == key, wanted]
        is_ok = _equal(in_group["status"], "ok")
        ok = in_group[is_ok]
        entry: dict[str, Any] = {"group": str(key), "n": len(in_group),
                                 "errors": int((~is_ok).sum()),
                                 "distinct_outputs": int(ok["output"].nunique(dropna=False)),
                                 "bad_logprobs": _bad_logprobs(ok)["samples"],
                                 "tokens": []}
        if completions:
            d = divergence(ok)
            entry.update(distinct_token_sequences=d.distinct_token_sequences,
                         distinct_logprob_vectors=d.distinct_logprob_vectors,
                         first_difference=d.first_difference)
        tracked_in_group = rows.group.equals(key) if slots else None
        for slot, t in enumerate(slots):
            present, missing, bad = _split(rows, (slot_of == slot) & tracked_in_group)
            logprob = present.logprob
            distinct = distinct_values(logprob, present.text)
            entry["tokens"].append({
                "label": t["label"], "missing": missing, "bad_values": bad,
                "distinct_logprobs": len(distinct.count),
                "clusters": len(cluster_table(distinct, threshold_pct)),
                "mean_prob": float(np.exp(logprob).mean()) if logprob.size else math.nan,
            })
        result.append(entry)
    return result


def json_safe(value: Any) -> Any:
    """Plain JSON types: numpy scalars unwrapped, NaN/inf -> None, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value
