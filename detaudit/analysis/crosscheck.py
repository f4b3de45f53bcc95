"""How far a server's logprobs are from a reference's, token by token: the
train-versus-inference gap of reinforcement learning, where the trainer recomputes the
logprob of every sampled token and any difference biases the policy gradient.

Pure: a frame of sampled tokens in (``TOKEN_COLUMNS``), a ``Crosscheck`` out.

Bitwise rule: the reference's logprobs are float32 (a log_softmax in fp32). A token is
bitwise equal when the server's number, read as float64 from its text and rounded to
float32, is that same float32. A server that writes the float32 widened to float64
(``detaudit serve``, vLLM: repr of a Python float) or ``float.hex`` of it (the in-process
engine) is thus compared exactly; one that writes float32's shortest decimal
("-0.31202102") designates the same float32 and is compared exactly too. The
differences (|Δ|, k3, Pearson) use the float64 values as read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from detaudit.defaults import SENTINEL_LOGPROB

# index: the sample; position: the token's place in its completion; token: its text;
# server_logprob: float64 parsed from server_logprob_text; reference_logprob: the
# reference's float32 value as a float64.
TOKEN_COLUMNS = ["index", "position", "token", "server_logprob", "server_logprob_text",
                 "reference_logprob"]
WORST_DEFAULT = 10
BITWISE_RULE = ("float32(server logprob, read from its text as float64) == the reference's "
                "float32 logprob")


@dataclass
class PositionStats:
    position: int
    tokens: int
    bitwise_equal: float
    max_abs_diff: float
    mean_abs_diff: float
    k3_kl: float


@dataclass
class WorstToken:
    index: int
    position: int
    token: str
    server_logprob: float
    server_logprob_text: str
    reference_logprob: float
    abs_diff: float


@dataclass
class Crosscheck:
    """Over the sampled tokens with finite logprobs on both sides (``non_finite``: the
    others, the -9999 sentinel included, left out). ``bitwise_equal`` is a share; ``k3_kl`` estimates
    KL(server || reference) from tokens the server sampled: mean of r - 1 - log r,
    r = p_ref / p_server; ``pearson`` is between the two sides' probabilities (None
    with fewer than 2 tokens or a constant side). ``worst``: the largest |Δ| > 0."""

    tokens: int
    bitwise_equal_tokens: int
    bitwise_equal: float | None
    max_abs_diff: float | None
    mean_abs_diff: float | None
    k3_kl: float | None
    pearson: float | None
    non_finite: int = 0
    by_position: list[PositionStats] = field(default_factory=list)
    worst: list[WorstToken] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """As JSON has it: a figure that overflowed (k3 of a huge ratio) is null."""
        return _json_safe(asdict(self))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def same_float32(server: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The bitwise rule (module docstring): the server's float64 rounded to float32 is
    the reference's float32."""
    with np.errstate(over="ignore"):
        return np.asarray(server, np.float64).astype(np.float32) == \
            np.asarray(reference, np.float64).astype(np.float32)


def k3_terms(server: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """r - 1 - log r per token, r = p_ref / p_server (>= 0; 0 only where r = 1)."""
    d = np.asarray(reference, np.float64) - np.asarray(server, np.float64)  # log r
    with np.errstate(over="ignore"):  # r beyond float64: inf, which to_dict writes as null
        return np.expm1(d) - d


def compare(frame: pd.DataFrame, worst: int = WORST_DEFAULT) -> Crosscheck:
    """The statistics of a frame with ``TOKEN_COLUMNS`` (one row per sampled token)."""
    missing = [c for c in TOKEN_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"the token frame lacks columns {', '.join(missing)}")
    server = frame["server_logprob"].to_numpy(np.float64)
    reference = frame["reference_logprob"].to_numpy(np.float64)
    finite = np.isfinite(server) & np.isfinite(reference) & (server != SENTINEL_LOGPROB)
    rows = frame[finite]
    server, reference = server[finite], reference[finite]
    n = len(rows)
    if n == 0:
        return Crosscheck(0, 0, None, None, None, None, None, non_finite=int((~finite).sum()))
    equal = same_float32(server, reference)
    diff = np.abs(server - reference)
    k3 = k3_terms(server, reference)
    per = pd.DataFrame({"position": rows["position"].to_numpy(np.int64), "equal": equal,
                        "diff": diff, "k3": k3})
    grouped = per.groupby("position", sort=True)
    table = grouped.agg(tokens=("equal", "size"), equal=("equal", "mean"),
                        max_diff=("diff", "max"), mean_diff=("diff", "mean"), k3=("k3", "mean"))
    by_position = [PositionStats(int(p), int(tokens), float(eq), float(top), float(mean), float(k))
                   for p, tokens, eq, top, mean, k in table.itertuples()]
    return Crosscheck(
        tokens=n, bitwise_equal_tokens=int(equal.sum()), bitwise_equal=float(equal.mean()),
        max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()), k3_kl=float(k3.mean()),
        pearson=pearson(np.exp(server), np.exp(reference)), non_finite=int((~finite).sum()),
        by_position=by_position, worst=_worst(rows, diff, worst))


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r; None when it is undefined (fewer than 2 values, or a constant side)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _worst(rows: pd.DataFrame, diff: np.ndarray, k: int) -> list[WorstToken]:
    """The k tokens of largest |Δ| (> 0), ties in sample and position order."""
    order = pd.DataFrame({"diff": diff, "index": rows["index"].to_numpy(),
                          "position": rows["position"].to_numpy()})
    order = order[order["diff"] > 0].sort_values(["diff", "index", "position"],
                                                 ascending=[False, True, True], kind="stable")
    picked = order.index[:k] if k > 0 else []
    out = []
    for i in picked:
        row = rows.iloc[i]
        out.append(WorstToken(int(row["index"]), int(row["position"]), str(row["token"]),
                              float(row["server_logprob"]), str(row["server_logprob_text"]),
                              float(row["reference_logprob"]), float(diff[i])))
    return out
