"""The logit grid: where the clusters come from.

A logprob is ``logit - logsumexp(logits)``. If a server computes logits in a low
precision (bf16 has 8 significant bits), every logit sits on a grid, and so does the
difference of two logits: the gap between the top-1 and top-2 logprobs, and, for a
two-way outcome whose other tokens are negligible, the log-odds of the outcome. When
a kernel's reduction order changes, a logit moves by whole grid steps, so the distinct
gaps of many repeats are multiples of one step. This module measures, per response,
that gap and the outcome log-odds, and finds the step when distinct values sit on a
regular grid.

Grid detection: the step is the approximate greatest common divisor of the gaps
between neighbouring distinct values (Euclid's algorithm with a tolerance), refined
by least squares. Any set of numbers fits a fine enough grid, so a grid is reported
only when it is unlikely by chance: ``n`` values each land within ``tol`` of a grid
point of step ``s`` with probability about ``(2 tol / s) ** (n - 2)`` (two values
fix the grid); that must be below ``MAX_CHANCE``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

MAX_CHANCE = 1e-3
MIN_DISTINCT = 3  # two values always sit on a grid of their own difference
DEFAULT_ABS_TOL = 1e-6  # logprobs arrive as float32 printed to ~8 significant digits
DEFAULT_REL_TOL = 1e-6


@dataclass
class Grid:
    """A regular grid the distinct values sit on: ``origin + k * step``."""

    step: float
    origin: float
    points: int  # grid points spanned from the lowest to the highest value
    occupied: int  # distinct values (within tol) on it
    max_residual: float  # largest distance of a value from its grid point
    tol: float
    chance: float  # probability the values fit a grid this coarse by chance
    step_log2: int | None  # k when the step is 2**k (within tol): the mark of binary floats

    def to_dict(self) -> dict:
        return asdict(self)


def log_odds(logprob: np.ndarray) -> np.ndarray:
    """ln(p / (1 - p)) from ln p, accurate near p = 0 and p = 1 (+inf at p = 1)."""
    logprob = np.asarray(logprob, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return logprob - np.log(-np.expm1(logprob))


def log_odds_of_pct(pct: np.ndarray | float) -> np.ndarray:
    """Log-odds of probabilities given in percent (cluster centres and bounds)."""
    p = np.asarray(pct, dtype=np.float64) / 100.0
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def top_gap(top_logprobs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logprob of each row (rows: responses; NaN-padded columns).

    The normaliser cancels, so this is the logit gap the server computed. NaN for a
    row with fewer than two candidates."""
    top = np.asarray(top_logprobs, dtype=np.float64)
    if top.ndim != 2 or top.shape[1] < 2:
        return np.full(top.shape[0] if top.ndim else 0, np.nan)
    ranked = -np.sort(-np.where(np.isnan(top), -np.inf, top), axis=1)
    with np.errstate(invalid="ignore"):  # -inf - -inf in a row without two candidates
        gap = ranked[:, 0] - ranked[:, 1]
    gap[~np.isfinite(ranked[:, 1])] = np.nan
    return gap


def default_tol(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    scale = float(np.abs(finite).max()) if finite.size else 0.0
    return max(DEFAULT_ABS_TOL, DEFAULT_REL_TOL * scale)


def detect_grid(values: np.ndarray, tol: float | None = None) -> Grid | None:
    """The regular grid the distinct finite ``values`` sit on, or None when there is
    none (too few values, or only a grid so fine that chance explains the fit)."""
    values = np.asarray(values, dtype=np.float64)
    values = np.unique(values[np.isfinite(values)])
    if tol is None:
        tol = default_tol(values)
    points = _merge_within(values, tol)
    if points.size < MIN_DISTINCT:
        return None
    step = 0.0
    for diff in np.diff(points):
        step = diff if step == 0.0 else _approx_gcd(step, diff, tol)
    if step <= 2 * tol:
        return None
    step, origin, k = _refine(points, step)
    residual = float(np.abs(points - (origin + k * step)).max())
    if residual > tol:  # the refined step drifted: no single grid fits
        return None
    chance = min(1.0, 2 * tol / step) ** (points.size - 2)
    if chance > MAX_CHANCE:
        return None
    exponent = round(math.log2(step))
    step_log2 = exponent if abs(step - 2.0 ** exponent) * (k.max() - k.min()) <= tol else None
    return Grid(step=step, origin=origin, points=int(k.max() - k.min()) + 1,
                occupied=int(points.size), max_residual=residual, tol=tol,
                chance=chance, step_log2=step_log2)


def _merge_within(sorted_values: np.ndarray, tol: float) -> np.ndarray:
    """Values closer than ``tol`` are one grid point (rounding noise, not a step)."""
    if sorted_values.size == 0:
        return sorted_values
    keep = np.concatenate(([True], np.diff(sorted_values) > tol))
    return sorted_values[keep]


def _approx_gcd(a: float, b: float, tol: float) -> float:
    """Euclid on reals: remainders within ``tol`` of zero count as zero."""
    a, b = max(a, b), min(a, b)
    while b > tol:
        a, b = b, abs(a - round(a / b) * b)
    return a


def _refine(points: np.ndarray, step: float) -> tuple[float, float, np.ndarray]:
    """Least-squares step and origin for the grid indices the rough step assigns."""
    k = np.round((points - points[0]) / step)
    if k.max() == k.min():
        return step, float(points[0]), k
    slope, intercept = np.polyfit(k, points, 1)
    return float(slope), float(intercept), k
