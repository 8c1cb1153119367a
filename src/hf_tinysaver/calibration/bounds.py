"""Exact one-sided bounds on a binomial rate, and their inverses over counts.

The calibration guarantees (`CascadeSimulation.calibrate(..., confidence_level=...)`), the certificates of
`calibration.certification` and the reference bands of `DriftGuard` all rest on these. scipy is imported on use:
`scipy.stats` adds about half a second to `import hf_tinysaver`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def clopper_pearson_upper(successes: Any, trials: int, confidence_level: float) -> np.ndarray:
    """
    One-sided Clopper-Pearson upper bound on a binomial rate.

    For `successes ~ Binomial(trials, p)`, `P(p <= bound) >= confidence_level` for every `p`.

    Args:
        successes (`int` or `array-like` of `int`):
            Observed count(s), in `[0, trials]`.
        trials (`int`):
            Number of trials.
        confidence_level (`float`):
            Probability in (0, 1) that the bound holds.

    Returns:
        `np.ndarray`: The bound(s), float64 in [0, 1]; 1.0 where `successes == trials`.

    Example:

    ```python
    >>> from hf_tinysaver.calibration import clopper_pearson_upper

    >>> round(float(clopper_pearson_upper(0, 100, 0.95)), 4)  # no error in 100 trials: the rate is below 3 %
    0.0295
    ```
    """
    from scipy import stats

    successes = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = stats.beta.ppf(confidence_level, successes + 1, trials - successes)
    return np.where(successes >= trials, 1.0, bound)


def clopper_pearson_lower(successes: Any, trials: int, confidence_level: float) -> np.ndarray:
    """
    One-sided Clopper-Pearson lower bound on a binomial rate: `P(p >= bound) >= confidence_level`.

    Args:
        successes (`int` or `array-like` of `int`):
            Observed count(s), in `[0, trials]`.
        trials (`int`):
            Number of trials.
        confidence_level (`float`):
            Probability in (0, 1) that the bound holds.

    Returns:
        `np.ndarray`: The bound(s), float64 in [0, 1]; 0.0 where `successes == 0`.

    Example:

    ```python
    >>> from hf_tinysaver.calibration import clopper_pearson_lower

    >>> round(float(clopper_pearson_lower(100, 100, 0.95)), 4)  # 100 successes in 100: the rate is above 97 %
    0.9705
    ```
    """
    from scipy import stats

    successes = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = stats.beta.ppf(1.0 - confidence_level, successes, trials - successes + 1)
    return np.where(successes <= 0, 0.0, bound)


def largest_count_with_upper_at_most(bounds: Any, trials: int, confidence_level: float) -> np.ndarray:
    """For each bound `q`, the largest count `k` with `clopper_pearson_upper(k) <= q` (-1 if none).

    Args:
        bounds: The bound(s) `q` on the rate.
        trials: Number of trials.
        confidence_level: Level of the Clopper-Pearson bound.

    Returns:
        int64 counts, one per bound.
    """
    bounds = np.atleast_1d(np.asarray(bounds, dtype=np.float64))
    above = _first_count_where(lambda k: clopper_pearson_upper(k, trials, confidence_level) > bounds, bounds, trials)
    return above - 1


def smallest_count_with_lower_at_least(bounds: Any, trials: int, confidence_level: float) -> np.ndarray:
    """For each bound `c`, the smallest count `k` with `clopper_pearson_lower(k) >= c` (`trials + 1` if none).

    Args:
        bounds: The bound(s) `c` on the rate.
        trials: Number of trials.
        confidence_level: Level of the Clopper-Pearson bound.

    Returns:
        int64 counts, one per bound.
    """
    bounds = np.atleast_1d(np.asarray(bounds, dtype=np.float64))
    return _first_count_where(lambda k: clopper_pearson_lower(k, trials, confidence_level) >= bounds, bounds, trials)


def _first_count_where(condition: Callable[[np.ndarray], np.ndarray], bounds: np.ndarray, trials: int) -> np.ndarray:
    """Per bound, the smallest count in `[0, trials]` where `condition` holds (`trials + 1` if none).

    `condition` maps counts (one per bound) to booleans and must be monotone in the count (false, then true), as the
    Clopper-Pearson bounds are: an integer bisection then needs ~log2(trials) evaluations instead of one per count.
    """
    low, high = np.full(bounds.shape, -1, dtype=np.int64), np.full(bounds.shape, trials + 1, dtype=np.int64)
    while np.any(high - low > 1):
        middle = (low + high) // 2
        active = high - low > 1
        holds = condition(np.clip(middle, 0, trials))
        low, high = np.where(active & ~holds, middle, low), np.where(active & holds, middle, high)
    return high


__all__ = [
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "largest_count_with_upper_at_most",
    "smallest_count_with_lower_at_least",
]
