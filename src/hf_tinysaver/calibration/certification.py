"""Certified thresholds for the `max-drop` objective: fixed-sequence testing on a label-free grid.

A certificate says: with probability at least `confidence_level` over the draw of the calibration images, the
accuracy drop of the cascade at the chosen threshold, on the distribution those images were drawn from, is at most
`max_drop` points. The drop at threshold `t` is the mean of `d_i = exit_i * (base_correct_i - saver_correct_i)`,
i.e. `p_harm(t) - p_gain(t)`; it is not monotone in `t`, so a bound at one crossing point does not cover a
threshold picked from the data.

The procedure (Learn-then-Test, Angelopoulos et al. 2021, arXiv:2110.01052, with fixed-sequence testing):

1. A grid of thresholds fixed in advance, independent of the calibration data (`certificate_grid()`), ordered from
   fewest exits to most (descending).
2. At each grid threshold, an exact test of `H0: drop(t) > max_drop` at the full level `alpha = 1 -
   confidence_level`. Walking down the grid, every threshold before the first non-rejection is certified. Under
   any configuration of true nulls, the first true null reached is tested at level `alpha`, so the probability of
   certifying any threshold whose drop exceeds the target is at most `alpha`: all certified thresholds are valid
   at once (family-wise), and choosing among them by measurement keeps the guarantee.
3. The cheapest certified threshold (most exits) is returned; every certified point is kept as a table.

Threshold 1.0 (no confidence score exceeds it: nothing exits, drop exactly 0) is always certified.

Tests (`CERTIFICATE_METHODS`), each valid at a fixed threshold for i.i.d. calibration samples:

- `"discordant-binomial"` (default): condition on the discordant exited samples. With `s = p_harm + p_gain` and
  `r = p_harm / s`, the drop is `s * (2r - 1)`. A Clopper-Pearson upper bound `s_u` on `s` (level
  `alpha * DISCORDANCE_SHARE`), and, conditional on the number of discordant samples `N`, an exact binomial upper
  bound `r_u` on `r` from the `H ~ Binomial(N, r)` harms among them (level `alpha * (1 - DISCORDANCE_SHARE)`).
  With probability at least `1 - alpha`, `drop <= s_u * max(2 r_u - 1, 0)` (the event `s <= s_u` is a function of
  `N`, so the conditional binomial bound holds on it; a union bound adds the two error levels). This is the
  Berger-Boos device for a nuisance parameter (Berger & Boos 1994, JASA 89:1012) applied to the paired
  (McNemar-type) comparison; its width scales with the discordance rate, not with the accuracies.
- `"cp-difference"`: a Clopper-Pearson upper bound on `p_harm` minus a lower bound on `p_gain`, each at level
  `alpha / 2` (union bound). Valid, looser: the two widths add.
- `"clopper-pearson"`: the original guarantee (`GUARANTEE_CREDITS` in `simulation.py`): harm and gain bounds at
  a handful of fixed credits with a Bonferroni correction; every point of the curve that passes is certified at
  once because harms and gains only grow as the threshold falls. Kept for comparison.

`benchmarks/guarantee.py` measures the three on random calibration/test splits of real records.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .bounds import clopper_pearson_lower, clopper_pearson_upper
from .checks import check_confidence_level, check_number

CERTIFICATE_METHODS = ("discordant-binomial", "cp-difference", "clopper-pearson")
DEFAULT_CERTIFICATE = "discordant-binomial"

# Share of the error level spent on the upper bound on the discordance rate in `discordant-binomial`. A constant,
# never fitted to a calibration set, so every test stays exact whatever its value; 0.05 was the best of
# {0.05, 0.1, 0.2, 0.35} on random CIFAR-10 splits (benchmarks/guarantee.py), by about 0.001 relative MACs.
DISCORDANCE_SHARE = 0.05

# Sizes of the two parts of the fixed threshold grid (evenly spaced, and `1 - 10**-x` for x in [0, 12]).
GRID_LINEAR = 201
GRID_LOGARITHMIC = 241


def certificate_grid() -> np.ndarray:
    """The fixed, label-free and data-free grid of candidate thresholds, descending (fewest exits first).

    Confidence scores lie in [0, 1] (see `compute_confidence`) and pile up near 1 for good savers, so the grid
    mixes 201 evenly spaced values with 241 values `1 - 10**-x` for `x` in `[0, 12]` (steps of 0.05 decades).
    It starts at 1.0, where nothing exits. Fixing it in advance keeps every test in the sequence exact: a grid
    picked from the calibration confidences would make the exit set itself depend on the sample.

    Returns:
        Float64 thresholds, strictly decreasing, from 1.0 to 0.0.
    """
    linear = np.linspace(0.0, 1.0, GRID_LINEAR)
    logarithmic = 1.0 - 10.0 ** -np.linspace(0.0, 12.0, GRID_LOGARITHMIC)
    return np.unique(np.concatenate([linear, logarithmic, [1.0]]))[::-1]


def drop_upper_bounds(
    harms: Any, gains: Any, n: int, confidence_level: float, method: str = DEFAULT_CERTIFICATE
) -> np.ndarray:
    """Upper confidence bounds on the accuracy drop (a fraction, not points) at fixed thresholds.

    Each bound holds with probability at least `confidence_level` at its own threshold (see the module docstring
    for the methods); fixed-sequence testing ([`certify_fixed_sequence`]) makes them hold together.

    Args:
        harms: Exited samples the base gets right and the saver wrong, per threshold (any shape).
        gains: Exited samples the saver gets right and the base wrong, same shape.
        n: Number of calibration samples.
        confidence_level: In (0, 1).
        method: `"discordant-binomial"` or `"cp-difference"`.

    Returns:
        Bounds of the shape of `harms`, each in [-1, 1].
    """
    harms, gains = np.asarray(harms, dtype=np.int64), np.asarray(gains, dtype=np.int64)
    alpha = 1.0 - confidence_level
    if method == "discordant-binomial":
        discordant = harms + gains
        rate_upper = clopper_pearson_upper(discordant, n, 1.0 - alpha * DISCORDANCE_SHARE)
        share_upper = clopper_pearson_upper(harms, discordant, 1.0 - alpha * (1.0 - DISCORDANCE_SHARE))
        return rate_upper * np.maximum(2.0 * share_upper - 1.0, 0.0)
    if method == "cp-difference":
        level = 1.0 - alpha / 2.0
        return clopper_pearson_upper(harms, n, level) - clopper_pearson_lower(gains, n, level)
    raise ValueError(
        f"Unknown fixed-sequence certificate {method!r}; choose one of {CERTIFICATE_METHODS[:2]} "
        "('clopper-pearson' is computed by CascadeSimulation.calibrate)."
    )


def certify_fixed_sequence(bounds: np.ndarray, max_drop_fraction: float) -> int:
    """Number of leading grid points certified: the sequence stops at the first bound above the target.

    Args:
        bounds: Upper bounds along the grid, fewest exits first; `bounds[0]` is the grid's "nothing exits" point.
        max_drop_fraction: The target drop as a fraction (points / 100).

    Returns:
        `k >= 1`: grid points `0 .. k-1` are certified (point 0, threshold 1.0, always is).
    """
    failing = np.flatnonzero(np.asarray(bounds)[1:] > max_drop_fraction)
    return 1 + (int(failing[0]) if len(failing) else len(bounds) - 1)


def grid_counts(simulation, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exited, harm and gain counts of `simulation` at each grid threshold (`confidence > threshold` exits)."""
    descending, counts = simulation.sorted_counts
    exited = np.searchsorted(-descending, -grid, side="left")
    return exited, counts[1][exited], counts[2][exited]


def certificate_record(
    method: str,
    max_drop: float,
    confidence_level: float,
    n: int,
    threshold: float,
    bound: float,
    **extra: Any,
) -> dict[str, Any]:
    """The certificate stored in `config.calibration["certificate"]` (drops in points, like `max_drop`)."""
    return {
        "method": method,
        "target": float(max_drop),
        "level": float(confidence_level),
        "n": int(n),
        "threshold": float(threshold),
        "bound": float(100.0 * bound),
        **extra,
    }


def certified_table(
    thresholds: np.ndarray, exited: np.ndarray, bounds: np.ndarray, n: int, relative_saver_macs: float
) -> list[dict[str, float]]:
    """One row per distinct calibration exit count among certified points (its lowest threshold), cheapest last.

    Rows: `threshold`, `exit_rate`, `relative_macs` and `bound` (the drop bound in points; None for the
    "nothing exits" point, whose drop is 0 by construction).
    """
    rows = []
    for index in range(len(thresholds)):
        if index + 1 < len(thresholds) and exited[index + 1] == exited[index] and index > 0:
            continue  # a lower threshold of the table exits the same calibration samples; keep that one
        exit_rate = float(exited[index]) / n
        bound = None if index == 0 else float(100.0 * bounds[index])
        rows.append(
            {
                "threshold": float(thresholds[index]),
                "exit_rate": exit_rate,
                "relative_macs": float(relative_saver_macs + 1.0 - exit_rate),
                "bound": bound,
            }
        )
    return rows


def certify_max_drop(simulation, max_drop: float, confidence_level: float, method: str = DEFAULT_CERTIFICATE):
    """Fixed-sequence certificate of `max-drop` on the calibration samples of `simulation`.

    Args:
        simulation: A labelled [`CascadeSimulation`].
        max_drop: Target drop in points.
        confidence_level: Probability that the certificate holds.
        method: `"discordant-binomial"` or `"cp-difference"`.

    Returns:
        `(threshold, certificate, table)`: the cheapest certified threshold, the record of
        [`certificate_record`] and the rows of [`certified_table`].
    """
    grid = certificate_grid()
    exited, harms, gains = grid_counts(simulation, grid)
    bounds = drop_upper_bounds(harms, gains, simulation.n, confidence_level, method)
    bounds[0] = 0.0  # threshold 1.0: nothing exits on any data, the drop is 0 for certain
    certified = certify_fixed_sequence(bounds, max_drop / 100.0)
    chosen = certified - 1
    certificate = certificate_record(
        method,
        max_drop,
        confidence_level,
        simulation.n,
        grid[chosen],
        bounds[chosen],
        procedure="fixed-sequence",
        grid_size=len(grid),
        first_failing_threshold=float(grid[certified]) if certified < len(grid) else None,
    )
    table = certified_table(
        grid[:certified], exited[:certified], bounds[:certified], simulation.n, simulation.relative_saver_macs
    )
    return float(grid[chosen]), certificate, table


def default_target_exit_rate(pilot, max_drop: float) -> float:
    """The exit rate [`plan_calibration_size`] plans for by default: the pilot's in-sample `max-drop` point at half
    the target drop (at the full target the pilot's drop equals it, and no finite size would certify it)."""
    return pilot.calibrate("max-drop", max_drop=max_drop / 2.0).exit_rate


def plan_calibration_size(
    pilot,
    max_drop: float,
    confidence_level: float,
    target_exit_rate: float | None = None,
    method: str = DEFAULT_CERTIFICATE,
    power: float = 0.8,
    draws: int = 4000,
    seed: int = 0,
    max_size: int = 10_000_000,
) -> int:
    r"""
    How many calibration images a certificate needs to let a given share of images exit, planned on a pilot set.

    The pilot's harm and gain rates at the target exit rate are taken as the population's. For a candidate size
    `m`, `draws` calibration sets are simulated as multinomial (harm, gain, other) counts of `m` samples at those
    rates, and the test of the certificate is run on each; the answer is the smallest `m` (found by bisection)
    at which at least `power` of them pass. The earlier, more conservative thresholds of the fixed sequence
    usually pass far more easily and are not simulated.

    At the pilot's own in-sample point the drop equals the target and no finite size would do, so the default
    target is the in-sample point at half the target drop.

    Args:
        pilot ([`CascadeSimulation`]): A labelled pilot set.
        max_drop (`float`): Target drop in points.
        confidence_level (`float`): Level of the certificate, in (0, 1).
        target_exit_rate (`float`, *optional*): The exit rate to certify; defaults to the exit rate of the
            pilot's in-sample `max-drop` point at `max_drop / 2`.
        method (`str`, *optional*, defaults to `"discordant-binomial"`): `"discordant-binomial"` or
            `"cp-difference"`.
        power (`float`, *optional*, defaults to 0.8): Share of calibration sets of the planned size that pass.
        draws (`int`, *optional*, defaults to 4000): Simulated calibration sets per candidate size.
        seed (`int`, *optional*, defaults to 0): Seed of the simulation.
        max_size (`int`, *optional*): Largest size considered.

    Returns:
        The planned number of calibration images.

    Raises:
        ValueError: When the pilot's drop at the target exit rate is not below the target (no size suffices).

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_tinysaver.calibration import CascadeSimulation, plan_calibration_size

    >>> rng = np.random.default_rng(0)
    >>> confidence = rng.uniform(size=4000)
    >>> labels = np.zeros(4000, dtype=int)
    >>> saver = np.where(rng.uniform(size=4000) < 0.3 * (1 - confidence), 1, 0)  # wrong more often when unsure
    >>> pilot = CascadeSimulation(confidence, saver, labels, labels, relative_saver_macs=0.1)
    >>> size = plan_calibration_size(pilot, max_drop=1.0, confidence_level=0.9)
    >>> 1000 < size < 100_000
    True
    ```
    """
    power = check_number("power", power, 0.0, 1.0, low_open=True, high_open=True, meaning="e.g. 0.8")
    confidence_level = check_confidence_level(confidence_level)
    max_drop = check_number("max_drop", max_drop, 0.0, low_open=True, meaning="points, to plan a certificate")
    if target_exit_rate is None:
        target_exit_rate = default_target_exit_rate(pilot, max_drop)
    else:
        target_exit_rate = check_number("target_exit_rate", target_exit_rate, 0.0, 1.0, low_open=True)
    point = pilot.calibrate("exit-rate", exit_rate=target_exit_rate)
    curve = pilot.curve
    index = int(np.searchsorted(curve.exited, round(point.exit_rate * pilot.n)))
    harm_rate, gain_rate = curve.harms[index] / pilot.n, curve.gains[index] / pilot.n
    pilot_drop = harm_rate - gain_rate
    if pilot_drop >= max_drop / 100.0 or point.exit_rate == 0:
        raise ValueError(
            f"The pilot's drop at exit rate {point.exit_rate:.4f} is {100 * pilot_drop:.3f} points, not below the "
            f"target of {max_drop} points: no calibration size certifies it. Choose a lower target exit rate "
            f"(target_exit_rate=, --target-exit-rate; e.g. {default_target_exit_rate(pilot, max_drop):.3f}) or a larger "
            "max_drop."
        )
    rng = np.random.default_rng(seed)
    uniforms = np.clip(
        rng.uniform(size=draws), 1e-12, 1.0 - 1e-12
    )  # common random numbers: the pass rate is monotone in the size

    def pass_rate(size: int) -> float:
        from scipy import stats

        harms = stats.binom.ppf(uniforms, size, harm_rate).astype(np.int64)
        # Gains given harms: binomial among the rest, drawn with the same fixed uniforms reversed.
        gains = stats.binom.ppf(uniforms[::-1], size - harms, gain_rate / max(1.0 - harm_rate, 1e-300))
        bounds = drop_upper_bounds(harms, gains.astype(np.int64), size, confidence_level, method)
        return float(np.mean(bounds <= max_drop / 100.0))

    low, high = 1, 2
    while pass_rate(high) < power:
        low, high = high, high * 2
        if high > max_size:
            raise ValueError(
                f"Even {max_size} calibration images would not pass at exit rate {point.exit_rate:.4f} with power "
                f"{power}; choose a lower target_exit_rate or a larger max_drop."
            )
    while high - low > max(1, low // 200):
        middle = (low + high) // 2
        low, high = (low, middle) if pass_rate(middle) >= power else (middle, high)
    return int(math.ceil(high))


__all__ = [
    "CERTIFICATE_METHODS",
    "DEFAULT_CERTIFICATE",
    "certificate_grid",
    "certify_fixed_sequence",
    "certify_max_drop",
    "drop_upper_bounds",
    "plan_calibration_size",
]
