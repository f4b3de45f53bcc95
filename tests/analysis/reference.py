"""The analysis as it was before it worked per distinct positions entry (commit ad7984f),
kept as the oracle the fast path is checked against (tests/analysis/test_frame_equivalence.py)
and timed beside it (bench/bench_analysis.py). Plain and per sample on purpose: a loop
over ``Sample`` objects for the frames and the top-k table, pandas groupbys and sorts for
the figures. Not used by any command.

    frames = reference_frames(store.samples(), store.manifest["tracked"])
    analysis = reference_analyze(frames, probe_kind="outcome")
    analysis.insight = reference_insight(frames, store.samples())
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from detaudit.analysis.agreement import REQUESTED, agreement, logprobs_status
from detaudit.analysis.clusters import DistinctValues, cluster_ids
from detaudit.analysis.divergence import Divergence, first_divergence
from detaudit.analysis.entropy import ENTROPY_COLUMNS, entropy_by_position
from detaudit.analysis.frame import (SAMPLE_COLUMNS, TRACKED_COLUMNS, Frames, is_bad_logprob,
                                     natural_key, parse_logprob_text, tracked_slots)
from detaudit.analysis.insight import Insight, TokenGrid
from detaudit.analysis.logit_grid import detect_grid, log_odds, top_gap
from detaudit.analysis.stats import spread, wilson_interval
from detaudit.analysis.summary import (COMPLETION_KINDS, NO_FINGERPRINT, OUTCOME_KINDS,
                                       OUTPUTS_CAP, Analysis, Outcome, TokenResult,
                                       check_threshold)
from detaudit.records import Position, Sample, TokenLogprob

# --- frames: the per-sample loop --------------------------------------------------------


def reference_frames(samples: list[Sample], tracked: list[dict[str, Any]],
                     all_positions: bool = False) -> Frames:
    samples = sorted(samples, key=lambda s: s.index)
    if all_positions or any(t.get("position") == "all" for t in tracked):
        slots = _most_common_chosen(samples)
    else:
        slots = [_resolve(t, samples) for t in tracked]
    return Frames(samples=_samples_frame(samples), tracked=_tracked_frame(samples, slots),
                  tracked_tokens=slots)


def _resolve(entry: dict[str, Any], samples: list[Sample]) -> dict[str, Any]:
    label = str(entry.get("label") or entry.get("token") or "")
    position = int(entry.get("position", 0) or 0)
    token = entry.get("token")
    if token is None:
        wanted = label.strip()
        counts: Counter[str] = Counter()
        for s in samples:
            if s.status != "ok" or s.completion is None or position >= len(s.completion.positions):
                continue
            p = s.completion.positions[position]
            for candidate in {c.token for c in p.top} | {p.token}:
                stripped = candidate.strip()
                if stripped and wanted.startswith(stripped):
                    counts[candidate] += 1
        if counts:
            token = max(counts, key=lambda t: (counts[t], len(t.strip()), t))
    return {"label": label, "token": token, "position": position}


def _most_common_chosen(samples: list[Sample]) -> list[dict[str, Any]]:
    per_position: list[Counter[str]] = []
    for s in samples:
        if s.status != "ok" or s.completion is None:
            continue
        for i, p in enumerate(s.completion.positions):
            if i == len(per_position):
                per_position.append(Counter())
            per_position[i][p.token] += 1
    return [{"label": f"pos {i}", "token": max(counts, key=lambda t: (counts[t], t)), "position": i}
            for i, counts in enumerate(per_position)]


def _samples_frame(samples: list[Sample]) -> pd.DataFrame:
    completions = [s.completion for s in samples]
    positions = [c.positions if c else () for c in completions]
    value = functools.lru_cache(maxsize=None)(_parse_or)
    texts, top = operator.attrgetter("logprob_text", "logprob"), operator.attrgetter("top")
    logprob = operator.attrgetter("logprob")

    def bad(ps: list[Position]) -> int:
        entries = list(itertools.chain(ps, itertools.chain.from_iterable(map(top, ps))))
        if math.isfinite(sum(map(logprob, entries))):
            return 0
        return sum(map(is_bad_logprob, map(logprob, entries)))

    columns = {
        "index": np.fromiter((s.index for s in samples), dtype=np.int64, count=len(samples)),
        "status": [s.status for s in samples],
        "error_kind": [s.error_kind for s in samples],
        "output": [c.text if c else None for c in completions],
        "finish_reason": [c.finish_reason if c else None for c in completions],
        "system_fingerprint": [c.system_fingerprint if c else None for c in completions],
        "model": [c.model if c else None for c in completions],
        "group": [s.group for s in samples],
        "attempts": [s.attempts for s in samples],
        "latency_s": np.array([s.latency_s for s in samples], dtype=np.float64),
        "tokens": [tuple([p.token for p in ps]) for ps in positions],
        "logprobs": [tuple(itertools.starmap(value, map(texts, ps))) for ps in positions],
        "bad_logprobs": np.fromiter((bad(ps) for ps in positions), dtype=np.int64,
                                    count=len(positions)),
    }
    return pd.DataFrame(columns, columns=SAMPLE_COLUMNS)


def _tracked_frame(samples: list[Sample], slots: list[dict[str, Any]]) -> pd.DataFrame:
    ok = [s for s in samples if s.status == "ok" and s.completion is not None]
    texts: list[str | None] = []
    values: list[float] = []
    parsed: dict[str, float] = {}
    for s in ok:
        positions = s.completion.positions
        for t in slots:
            found = _find(positions, t["position"], t["token"])
            if found is None:
                texts.append(None)
                values.append(math.nan)
                continue
            text = found.logprob_text
            value = parsed.get(text)
            if value is None:
                value = parsed[text] = _parse_or(text, found.logprob)
            texts.append(text)
            values.append(value)
    k = len(slots)
    per_sample = lambda values: np.repeat(np.array(values, dtype=object), k)  # noqa: E731
    per_slot = lambda key: np.tile(np.array([t[key] for t in slots], dtype=object), len(ok))  # noqa: E731
    return pd.DataFrame({
        "index": np.repeat(np.array([s.index for s in ok], dtype=np.int64), k),
        "slot": np.tile(np.arange(k, dtype=np.int64), len(ok)),
        "label": per_slot("label"),
        "token": per_slot("token"),
        "position": np.tile(np.array([t["position"] for t in slots], dtype=np.int64), len(ok)),
        "logprob": np.array(values, dtype=np.float64),
        "logprob_text": np.array(texts, dtype=object),
        "system_fingerprint": per_sample([s.completion.system_fingerprint for s in ok]),
        "output": per_sample([s.completion.text for s in ok]),
        "group": per_sample([s.group for s in ok]),
    }, columns=TRACKED_COLUMNS)


def _find(positions: list[Position], position: int,
          token: str | None) -> TokenLogprob | Position | None:
    if token is None or position >= len(positions):
        return None
    p = positions[position]
    for candidate in p.top:
        if candidate.token == token:
            return candidate
    return p if p.token == token else None


def _parse_or(text: str, fallback: float) -> float:
    try:
        return parse_logprob_text(text)
    except (TypeError, ValueError):
        return float(fallback)


# --- the top-k table and the insight figures ----------------------------------------------


@dataclass
class ReferenceTopTable:
    index: np.ndarray
    position: np.ndarray
    fingerprint: np.ndarray
    top: np.ndarray  # one row per response


def reference_top_table(samples: list[Sample]) -> ReferenceTopTable:
    index, position, fingerprint, rows = [], [], [], []
    for s in samples:
        if s.status != "ok" or s.completion is None:
            continue
        fp = s.completion.system_fingerprint
        for i, p in enumerate(s.completion.positions):
            if not p.top:
                continue
            index.append(s.index)
            position.append(i)
            fingerprint.append(fp)
            rows.append([np.nan if is_bad_logprob(t.logprob) else t.logprob for t in p.top])
    k = max((len(r) for r in rows), default=0)
    top = np.full((len(rows), k), np.nan)
    for i, r in enumerate(rows):
        top[i, :len(r)] = r
    return ReferenceTopTable(index=np.array(index, dtype=np.int64),
                             position=np.array(position, dtype=np.int64),
                             fingerprint=np.array(fingerprint, dtype=object), top=top)


def reference_insight(frames: Frames, samples: list[Sample] | None = None) -> Insight:
    tops = reference_top_table(sorted(samples, key=lambda s: s.index)) if samples is not None else None
    gaps: dict[int, np.ndarray] = {}
    tokens = []
    tracked = frames.tracked
    for slot, t in enumerate(tracked_slots(frames)):
        rows = tracked[(tracked["slot"] == slot) & np.isfinite(tracked["logprob"])]
        logprob = rows["logprob"].to_numpy(np.float64)
        odds = log_odds(logprob)
        grid = TokenGrid(
            label=str(t["label"]), token=t["token"], position=int(t["position"]), n=len(rows),
            distinct_log_odds=int(np.unique(odds.view(np.int64)).size), log_odds=spread(odds),
            log_odds_grid=detect_grid(odds), logprob_grid=detect_grid(logprob))
        if tops is not None and tops.top.size:
            position = grid.position
            if position not in gaps:
                gap = top_gap(tops.top[tops.position == position])
                gaps[position] = gap[np.isfinite(gap)]
            gap = gaps[position]
            grid.distinct_gaps = int(np.unique(gap.view(np.int64)).size)
            grid.gap = spread(gap)
            grid.gap_grid = detect_grid(gap)
        tokens.append(grid)
    entropy = entropy_by_position(tops.position, tops.top) if tops is not None and tops.top.size \
        else pd.DataFrame(columns=ENTROPY_COLUMNS)
    return Insight(tokens=tokens, entropy=entropy)


# --- the figures: pandas groupbys and sorts -----------------------------------------------


def reference_distinct_values(logprob: np.ndarray, text) -> DistinctValues:
    logprob = np.ascontiguousarray(logprob, dtype=np.float64)
    bits = logprob.view(np.int64)
    unique_bits, first, inverse, count = np.unique(
        bits, return_index=True, return_inverse=True, return_counts=True)
    values = unique_bits.view(np.float64)
    order = np.argsort(values, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return DistinctValues(logprob=values[order], text=[str(text[i]) for i in first[order]],
                          count=count[order], inverse=rank[inverse.reshape(-1)])


def reference_cluster_table(distinct: DistinctValues, threshold_pct: float,
                            fingerprints: np.ndarray | None = None) -> pd.DataFrame:
    pct = np.exp(distinct.logprob) * 100.0
    order = np.argsort(pct, kind="stable")
    pct, count = pct[order], distinct.count[order]
    ids = cluster_ids(pct, threshold_pct)
    frame = pd.DataFrame({"cluster": ids, "pct": pct, "count": count, "weighted": pct * count})
    table = frame.groupby("cluster").agg(min=("pct", "min"), max=("pct", "max"),
                                         count=("count", "sum"), weighted=("weighted", "sum"),
                                         distinct_values=("pct", "size"))
    table["centre"] = table["weighted"] / table["count"]
    table["width"] = table["max"] - table["min"]
    total = table["count"].sum()
    table["share"] = table["count"] / total if total else np.nan
    table = table.reset_index()[["cluster", "centre", "min", "max", "width", "count",
                                 "share", "distinct_values"]]
    if fingerprints is not None:
        value_cluster = np.empty_like(ids)
        value_cluster[order] = ids
        per_sample = pd.DataFrame({"cluster": value_cluster[distinct.inverse],
                                   "fp": pd.Series(fingerprints, dtype=object).fillna("(none)").to_numpy()})
        counts = per_sample.groupby(["cluster", "fp"], sort=True).size()
        by_cluster: dict[int, dict[str, int]] = {}
        for (cluster, fp), n in counts.items():
            by_cluster.setdefault(int(cluster), {})[str(fp)] = int(n)
        table["fingerprints"] = [dict(sorted(by_cluster.get(int(c), {}).items(), key=lambda kv: -kv[1]))
                                 for c in table["cluster"]]
    return table


def reference_divergence(samples: pd.DataFrame) -> Divergence:
    ok = samples[samples["status"] == "ok"]
    bits = lambda v: np.asarray(v, dtype=np.float64).tobytes()  # noqa: E731
    token_counts = Counter(ok["tokens"])
    vector_counts = Counter(zip(ok["tokens"], (bits(v) for v in ok["logprobs"])))
    result = Divergence(
        completions=len(ok), unique_completions=int(ok["output"].nunique(dropna=False)),
        distinct_token_sequences=len(token_counts),
        distinct_logprob_vectors=len(vector_counts), reference_count=0, diverged=0)
    if not token_counts:
        return result
    reference, result.reference_count = max(token_counts.items(), key=lambda kv: (kv[1], kv[0]))
    result.reference_length = len(reference)
    for tokens, n in token_counts.items():
        at = first_divergence(tokens, reference)
        if at is not None:
            result.positions[at] = result.positions.get(at, 0) + n
    result.diverged = sum(result.positions.values())
    if result.positions:
        positions = np.repeat(list(result.positions), list(result.positions.values()))
        result.min_position = int(positions.min())
        result.median_position = float(np.median(positions))
    same = {b: n for (tokens, b), n in vector_counts.items() if tokens == reference}
    ref_bits = max(same.items(), key=lambda kv: (kv[1], kv[0]))[0]
    ref_values = np.frombuffer(ref_bits, dtype=np.int64)
    for b, n in same.items():
        differs = np.flatnonzero(np.frombuffer(b, dtype=np.int64) != ref_values)
        if differs.size:
            result.logprob_positions[int(differs[0])] = \
                result.logprob_positions.get(int(differs[0]), 0) + n

    def departure(tokens: tuple, values: np.ndarray) -> int:
        at = first_divergence(tokens, reference)
        common = len(tokens) if at is None else at
        differs = np.flatnonzero(values[:common] != ref_values[:common])
        if differs.size:
            return int(differs[0])
        return common if at is None else at

    result.first_difference = min(
        (departure(tokens, np.frombuffer(b, dtype=np.int64))
         for tokens, b in vector_counts if (tokens, b) != (reference, ref_bits)), default=None)
    return result


def reference_analyze(frames: Frames, threshold_pct: float = 0.01,
                      probe_kind: str | None = "outcome", *, logprobs_requested: bool = True,
                      answer_regex: str | None = None,
                      tokenize: Callable[[str], Sequence[Any]] | None = None,
                      tokenizer: str | None = None) -> Analysis:
    check_threshold(threshold_pct)
    samples, tracked = frames.samples, frames.tracked
    ok = samples[samples["status"] == "ok"]
    errors = samples[samples["status"] != "ok"]
    outputs = ok["output"].value_counts(dropna=False)
    fingerprints = ok["system_fingerprint"].fillna(NO_FINGERPRINT).value_counts()
    slots = tracked_slots(frames)
    status = logprobs_status(samples, logprobs_requested)
    text_only = status != REQUESTED
    labels = [s["label"] for s in slots] if text_only else None
    if text_only:
        slots = []
    tokens = [_token_result(tracked[tracked["slot"] == slot], t, threshold_pct)
              for slot, t in enumerate(slots)]
    multi_token = bool(len(ok)) and int(ok["tokens"].map(len).max()) > 1
    completions = not text_only and (multi_token or (probe_kind in COMPLETION_KINDS and len(ok) > 0))
    return Analysis(
        n=len(samples), ok=len(ok), errors=len(errors),
        errors_by_kind={str(k): int(v) for k, v in
                        errors["error_kind"].fillna("unknown").value_counts().items()},
        threshold_pct=threshold_pct, probe_kind=probe_kind, tokens=tokens,
        outcomes=_outcomes(outputs, len(ok), tokens, labels) if probe_kind in OUTCOME_KINDS else [],
        outputs_distinct=len(outputs),
        outputs_top=[(None if _isnull(k) else str(k), int(v))
                     for k, v in outputs.head(OUTPUTS_CAP).items()],
        fingerprints={str(k): int(v) for k, v in fingerprints.items()},
        groups=_groups(samples, tracked, slots, threshold_pct, completions),
        divergence=reference_divergence(ok) if completions else None,
        bad_logprobs=_bad_logprobs(ok), frames=frames, logprobs=status,
        agreement=agreement(samples, answer_regex, tokenize, tokenizer, divergence=text_only))


def _bad_logprobs(ok: pd.DataFrame) -> dict[str, int]:
    counts = ok["bad_logprobs"].to_numpy(np.int64) if "bad_logprobs" in ok else np.zeros(0, np.int64)
    return {"samples": int((counts > 0).sum()), "values": int(counts.sum())}


def _split(rows: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    finite = np.isfinite(rows["logprob"].to_numpy(np.float64))
    received = rows["logprob_text"].notna().to_numpy()
    return rows[finite], int((~received & ~finite).sum()), int((received & ~finite).sum())


def _token_result(rows: pd.DataFrame, slot: dict[str, Any], threshold_pct: float) -> TokenResult:
    present, missing, bad = _split(rows)
    logprob = present["logprob"].to_numpy(dtype=np.float64)
    distinct = reference_distinct_values(logprob, present["logprob_text"].to_numpy())
    values = pd.DataFrame({"logprob_text": distinct.text, "logprob": distinct.logprob,
                           "prob": np.exp(distinct.logprob), "count": distinct.count})
    values = values.sort_values(["count", "logprob"], ascending=[False, False], kind="stable")
    return TokenResult(
        label=slot["label"], token=slot["token"], position=int(slot["position"]),
        n=len(rows), missing=missing, bad=bad, distinct_logprobs=len(distinct.count),
        logprob=spread(logprob), prob=spread(np.exp(logprob)),
        clusters=reference_cluster_table(distinct, threshold_pct,
                                         present["system_fingerprint"].to_numpy()),
        values=values, by_fingerprint=_by_fingerprint(present))


def _by_fingerprint(present: pd.DataFrame) -> dict[str, dict[str, Any]]:
    if present.empty:
        return {}
    frame = pd.DataFrame({"fp": present["system_fingerprint"].fillna(NO_FINGERPRINT),
                          "bits": present["logprob"].to_numpy(np.float64).view(np.int64),
                          "prob": np.exp(present["logprob"].to_numpy(np.float64))})
    table = frame.groupby("fp").agg(n=("prob", "size"), distinct=("bits", "nunique"),
                                    mean_prob=("prob", lambda p: p.to_numpy().mean()))
    table = table.sort_values("n", ascending=False)
    return {str(fp): {"n": int(r.n), "distinct_logprobs": int(r.distinct),
                      "mean_prob": float(r.mean_prob)} for fp, r in table.iterrows()}


def _outcomes(outputs: pd.Series, n: int, tokens: list[TokenResult],
              labels: list[str] | None = None) -> list[Outcome]:
    texts = ["" if _isnull(t) else str(t).lstrip() for t in outputs.index]
    counts = outputs.to_numpy()
    result, seen = [], set()
    pairs = [(t.label, t.prob.mean) for t in tokens] if labels is None else \
        [(label, math.nan) for label in labels]
    for label, reported in pairs:
        if label in seen or not label:
            continue
        seen.add(label)
        count = int(sum(c for text, c in zip(texts, counts) if text.startswith(label)))
        low, high = wilson_interval(count, n)
        result.append(Outcome(label=label, count=count, n=n, share=count / n if n else math.nan,
                              ci_low=low, ci_high=high, mean_reported_prob=reported))
    return result


def _groups(samples: pd.DataFrame, tracked: pd.DataFrame, slots: list[dict[str, Any]],
            threshold_pct: float, completions: bool = False) -> list[dict[str, Any]]:
    if samples["group"].isna().all():
        return []
    result = []
    for key in sorted(samples["group"].dropna().unique(), key=natural_key):
        rows = samples[samples["group"] == key]
        ok = rows[rows["status"] == "ok"]
        entry: dict[str, Any] = {"group": str(key), "n": len(rows),
                                 "errors": int((rows["status"] != "ok").sum()),
                                 "distinct_outputs": int(ok["output"].nunique(dropna=False)),
                                 "bad_logprobs": _bad_logprobs(ok)["samples"], "tokens": []}
        if completions:
            d = reference_divergence(ok)
            entry.update(distinct_token_sequences=d.distinct_token_sequences,
                         distinct_logprob_vectors=d.distinct_logprob_vectors,
                         first_difference=d.first_difference)
        for slot, t in enumerate(slots):
            sub = tracked[(tracked["slot"] == slot) & (tracked["group"] == key)]
            present, missing, bad = _split(sub)
            logprob = present["logprob"].to_numpy(np.float64)
            distinct = reference_distinct_values(logprob, present["logprob_text"].to_numpy())
            entry["tokens"].append({
                "label": t["label"], "missing": missing, "bad_values": bad,
                "distinct_logprobs": len(distinct.count),
                "clusters": len(reference_cluster_table(distinct, threshold_pct)),
                "mean_prob": float(np.exp(logprob).mean()) if logprob.size else math.nan})
        result.append(entry)
    return result


def _isnull(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def reference_summary(store: Any, threshold_pct: float = 0.01) -> dict[str, Any]:
    """``session.summary(store)`` the way it was made: ``store.samples()``, the loop."""
    from detaudit import session, tokenization
    from detaudit.analysis.agreement import NO_LOGPROBS_KIND
    from detaudit.probes import Probe

    m = store.manifest
    samples = store.samples()
    frames = reference_frames(samples, m.get("tracked") or [])
    probe = Probe.from_dict(m["probe"], source=f"{store.path}/manifest.json")
    split = None
    if not probe.asks_logprobs or any(s.error_kind == NO_LOGPROBS_KIND for s in samples):
        config = m.get("backend_config") or {}
        split = tokenization.text_splitter(str(config.get("model", "")),
                                           local=config.get("backend") == "local")
    analysis = reference_analyze(frames, threshold_pct=threshold_pct, probe_kind=probe.kind,
                                 logprobs_requested=probe.asks_logprobs,
                                 answer_regex=probe.answer_regex,
                                 tokenize=split[1] if split else None,
                                 tokenizer=split[0] if split else None)
    if not analysis.text_only:
        analysis.insight = reference_insight(frames, samples)
    return {"run": {**session.run_info(store), "notes": session.data_notes(store)},
            **analysis.to_dict()}
