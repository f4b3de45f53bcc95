"""Plain CSV files of clusters and samples, for pandas and spreadsheets.

Floats are written as Python's shortest round-trip repr, so a logprob read back is
the same float64; ``logprob_text`` keeps the number exactly as it was received.
Cluster bounds and centres are probabilities in percent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from detaudit.analysis import Analysis, Frames

CLUSTER_COLUMNS = ["token", "label", "position", "cluster", "centre", "min", "max", "width",
                   "count", "share", "distinct_values", "fingerprints"]
SAMPLE_COLUMNS = ["index", "status", "error_kind", "output", "finish_reason",
                  "system_fingerprint", "model", "group", "attempts", "latency_s"]


def clusters_frame(result: Analysis) -> pd.DataFrame:
    """One row per cluster of every tracked token; fingerprints as a JSON object."""
    parts = []
    for t in result.tokens:
        table = t.clusters.copy()
        table.insert(0, "token", t.token)
        table.insert(1, "label", t.label)
        table.insert(2, "position", t.position)
        table["fingerprints"] = [json.dumps(fp) for fp in table.get("fingerprints", [{}] * len(table))]
        parts.append(table)
    if not parts:
        return pd.DataFrame(columns=CLUSTER_COLUMNS)
    return pd.concat(parts, ignore_index=True)[CLUSTER_COLUMNS]


def samples_frame(source: Analysis | Frames) -> pd.DataFrame:
    """One row per sample; per tracked token ``<name>.logprob`` and ``<name>.logprob_text``
    (name = the label, with ``@position`` added when two slots share a label); the
    chosen tokens and their logprobs as JSON lists."""
    frames = source.frames if isinstance(source, Analysis) else source
    if frames is None:
        raise ValueError("this Analysis was built without its frames; pass the Frames")
    samples = frames.samples
    out = samples[SAMPLE_COLUMNS].copy()
    out["tokens"] = [json.dumps(list(t), ensure_ascii=False) for t in samples["tokens"]]
    out["logprobs"] = [json.dumps(list(v)) for v in samples["logprobs"]]
    tracked = frames.tracked
    names = _column_names(frames)
    for slot, name in enumerate(names):
        rows = tracked[tracked["slot"] == slot].set_index("index")
        out[f"{name}.logprob"] = out["index"].map(rows["logprob"])
        out[f"{name}.logprob_text"] = out["index"].map(rows["logprob_text"])
    return out


def write_clusters_csv(result: Analysis, path: str | Path) -> Path:
    path = Path(path)
    clusters_frame(result).to_csv(path, index=False)
    return path


def write_samples_csv(source: Analysis | Frames, path: str | Path) -> Path:
    path = Path(path)
    samples_frame(source).to_csv(path, index=False)
    return path


def _column_names(frames: Frames) -> list[str]:
    slots = frames.tracked_tokens or [
        {"label": r.label, "position": r.position}
        for r in frames.tracked.drop_duplicates("slot").sort_values("slot").itertuples()]
    labels = [str(s["label"]) for s in slots]
    return [label if labels.count(label) == 1 else f"{label}@{s['position']}"
            for label, s in zip(labels, slots)]
