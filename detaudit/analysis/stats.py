"""Small statistics: spread of a set of values and the Wilson score interval."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Spread:
    """min, max, range, mean and standard deviation (sample, ddof=1; 0 for one value).

    All NaN when there are no values.
    """

    mean: float
    std: float
    min: float
    max: float
    range: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def spread(values: np.ndarray) -> Spread:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return Spread(*(math.nan,) * 5)
    lo, hi = float(values.min()), float(values.max())
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return Spread(mean=float(values.mean()), std=std, min=lo, max=hi, range=hi - lo)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion; it stays inside [0, 1] and
    behaves at 0 and n successes, where the normal approximation does not."""
    if n <= 0:
        return (math.nan, math.nan)
    z = normal_quantile(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


# scipy.stats.norm.ppf(0.975): the level every report and summary uses, so a run's
# analysis does not import scipy (about a second) to compute one constant
_Z_975 = 1.959963984540054


def normal_quantile(q: float) -> float:
    """The standard normal quantile, as scipy computes it (scipy imported only for a
    level other than the 95 % one)."""
    if q == 0.975:
        return _Z_975
    from scipy.stats import norm

    return float(norm.ppf(q))
