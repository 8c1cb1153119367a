"""A drift guard for deployed cascades: notices when the calibration's facts stop holding on the live stream.

A calibrated threshold is only as good as the calibration split is like the images the cascade now sees. When the
camera, the season or the JPEG settings change, the saver keeps exiting confidently and nothing says so.
[`DriftGuard`] watches every batch the cascade answers and raises an alarm when the stream has certainly left the
calibration's regime:

- **label-free**: the exit rate at the calibrated threshold, and the saver-confidence distribution (the fraction of
  images at or below each calibration decile), against the calibration record's values;
- **shadow audits**: a random fraction (default 2 %) of the exited images also go to the base; their disagreement
  rate (saver vs base) is compared with the calibration's disagreement among exited images.

Every statistic is the mean of a Bernoulli stream, and each is tested with an anytime-valid sequential test: a
one-sided Robbins mixture martingale (the beta-binomial mixture, here with a uniform prior on the alternative side)

    M_t(p0) = int_A prod_i (theta / p0)^x_i ((1 - theta) / (1 - p0))^(1 - x_i) d theta / |A|,

with `A = (p0, 1)` to test `p <= p0` and `A = (0, p0)` to test `p >= p0`. Under the null `M_t` is a nonnegative
supermartingale with `M_0 = 1`, so by Ville's inequality `P(sup_t M_t >= 1 / a) <= a`: the test may be looked at
after every image, batch or request, forever, and still raises a false alarm with probability at most `a`
(Robbins 1970, "Statistical methods related to the law of the iterated logarithm"; Howard, Ramdas, McAuliffe and
Sekhon 2021, "Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Statist. 49(2), section 3; the
set of `p0` not rejected is a confidence sequence, whose bound the alarms report). The closed form uses the
regularised incomplete beta function, so decisions are exact and do not depend on how the stream is batched.

False alarms. The guard's level `alpha` is split by Bonferroni: one third each for the exit rate, the confidence
distribution and the audited disagreement (one half each for the first two when audits are off); within a family,
equally over its one-sided tests (the exit rate and each confidence fraction are tested on both sides, the
disagreement only for a rise). The calibration values are estimates from `n` calibration images: each test's null
band is the reference's two-sided Clopper-Pearson interval at the test's own level, widened by `tolerance` (the
change you consider harmless). So a stream from the calibration's distribution alarms with probability at most
`alpha` whenever the calibration sample's values lie in their intervals, and at most `2 * alpha` overall.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .calibration.bounds import clopper_pearson_lower, clopper_pearson_upper

logger = logging.getLogger(__name__)

FALLBACKS = (None, "base", "threshold")


@dataclass(frozen=True)
class DriftAlarm:
    """One alarm of a [`DriftGuard`]: a monitored rate certainly left its calibration band.

    Attributes:
        statistic: `"exit_rate"`, `"confidence"` or `"disagreement"`.
        detail: Which rate exactly, e.g. `"fraction of saver confidences <= 0.9983 (calibration decile 0.3)"`.
        direction: `"above"` or `"below"`: the side of the band the rate certainly lies on.
        estimate: The rate observed on the stream so far.
        bound: The confidence sequence's bound on the rate on that side (lower bound when `"above"`, upper when
            `"below"`), beyond `band_edge`.
        reference: The calibration's value of the rate.
        band_edge: The edge of the null band crossed (the reference's Clopper-Pearson bound plus or minus the
            tolerance).
        observations: Observations of this rate so far (images, or audited images for `"disagreement"`).
        images_seen: Images the guard had seen when the alarm was raised.
        alpha: The level of this one test.
    """

    statistic: str
    detail: str
    direction: str
    estimate: float
    bound: float
    reference: float
    band_edge: float
    observations: int
    images_seen: int
    alpha: float

    def describe(self) -> str:
        """One line for logs."""
        return (
            f"drift alarm ({self.statistic}): {self.detail} is {self.estimate:.4f} over {self.observations} "
            f"observations, certainly {self.direction} the calibration's {self.reference:.4f} (band edge "
            f"{self.band_edge:.4f}, confidence-sequence bound {self.bound:.4f}, level {self.alpha:.2g}) after "
            f"{self.images_seen} images"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mixture_log_evidence(successes: Any, failures: Any, null_rate: float, side: str) -> np.ndarray:
    """Log of the one-sided uniform-mixture martingale `M_t(p0)` for Bernoulli observations.

    Args:
        successes: Number of ones so far (array-like).
        failures: Number of zeros so far, same shape.
        null_rate: `p0`, in (0, 1).
        side: `"above"` tests `p <= p0` (the prior on the alternative is uniform on `(p0, 1)`), `"below"` tests
            `p >= p0` (uniform on `(0, p0)`).

    Returns:
        `log M_t`, float64, `-inf` where the data favour the null overwhelmingly.
    """
    from scipy import special

    s = np.asarray(successes, dtype=np.float64)
    f = np.asarray(failures, dtype=np.float64)
    p0 = float(null_rate)
    with np.errstate(divide="ignore"):
        if side == "above":
            tail = np.log(special.betaincc(s + 1.0, f + 1.0, p0)) - math.log1p(-p0)
        elif side == "below":
            tail = np.log(special.betainc(s + 1.0, f + 1.0, p0)) - math.log(p0)
        else:
            raise ValueError(f"side must be 'above' or 'below', got {side!r}.")
        return special.betaln(s + 1.0, f + 1.0) + tail - s * math.log(p0) - f * math.log1p(-p0)


def mixture_confidence_bound(successes: int, failures: int, alpha: float, side: str) -> float:
    """The bound of the mixture confidence sequence: the smallest (`"above"`) or largest (`"below"`) rate `p0` that
    the one-sided test at level `alpha` does not reject."""
    log_level = math.log(1.0 / alpha)
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        middle = min(max(middle, 1e-12), 1.0 - 1e-12)
        rejected = float(mixture_log_evidence(successes, failures, middle, side)) >= log_level
        # "above": rejected p0 lie below the bound; "below": above it.
        if (side == "above") == rejected:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


class BernoulliSequentialTest:
    """An anytime-valid one-sided test that a Bernoulli stream's rate stays on one side of `null_rate`.

    `side="above"` alarms once the rate is certainly above `null_rate` (tests `p <= null_rate`), `side="below"`
    once it is certainly below. The false-alarm probability over the whole, unbounded stream is at most `alpha`,
    however often it is checked (see the module docstring).

    Args:
        null_rate: The band edge `p0`. A `p0 >= 1` (for "above") or `<= 0` (for "below") can never be crossed.
        side: `"above"` or `"below"`.
        alpha: Level in (0, 1).
    """

    def __init__(self, null_rate: float, side: str, alpha: float):
        if side not in ("above", "below"):
            raise ValueError(f"side must be 'above' or 'below', got {side!r}.")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}.")
        self.null_rate = float(null_rate)
        self.side = side
        self.alpha = float(alpha)
        self.log_level = math.log(1.0 / alpha)
        # The band edge lies beyond what a rate can reach: the test can never reject.
        self.possible = (self.null_rate < 1) if side == "above" else (self.null_rate > 0)
        self.successes = 0
        self.failures = 0
        self.rejected = False

    @property
    def observations(self) -> int:
        return self.successes + self.failures

    def update(self, values: np.ndarray) -> int | None:
        """Adds boolean observations; returns the index in `values` at which the test first rejects, else `None`.

        After rejecting, the test keeps counting but never rejects again.
        """
        values = np.asarray(values, dtype=bool).reshape(-1)
        if values.size == 0:
            return None
        successes = self.successes + np.cumsum(values)
        failures = self.failures + np.arange(1, values.size + 1) - (successes - self.successes)
        self.successes, self.failures = int(successes[-1]), int(failures[-1])
        if self.rejected or not self.possible:
            return None
        if self.null_rate <= 0 or self.null_rate >= 1:
            # "above" with p0 <= 0: any one is evidence against p <= 0; "below" with p0 >= 1: any zero is.
            crossing = np.flatnonzero(values if self.side == "above" else ~values)
        else:
            # Where the running estimate lies on the null side, every alternative fits worse than p0, so M_t <= 1:
            # the evidence is computed only at the other positions.
            beyond = successes > self.null_rate * (successes + failures)
            if self.side == "below":
                beyond = successes < self.null_rate * (successes + failures)
            candidates = np.flatnonzero(beyond)
            if candidates.size == 0:
                return None
            evidence = mixture_log_evidence(successes[candidates], failures[candidates], self.null_rate, self.side)
            crossing = candidates[evidence >= self.log_level]
        if crossing.size == 0:
            return None
        self.rejected = True
        return int(crossing[0])

    def bound(self) -> float:
        """The confidence sequence's bound on the rate on this test's side, from the counts so far."""
        return mixture_confidence_bound(self.successes, self.failures, self.alpha, self.side)

    def reset(self) -> None:
        self.successes = self.failures = 0
        self.rejected = False


@dataclass
class _Monitored:
    """One monitored rate: its tests (one per side) and what the alarm says about it."""

    statistic: str
    detail: str
    reference: float
    tests: list[BernoulliSequentialTest]


class DriftGuard:
    r"""
    Watches a deployed cascade and raises an alarm when its stream certainly departs from the calibration.

    Attach it to a cascade (`guard.attach(cascade)`): it then sees every batch of `cascade(...)` (including through
    the `image-classification` pipeline) and of `cascade.forward_stream(...)`, through the cascade's
    `register_decision_hook`. It can also be fed per-image outputs directly with [`~DriftGuard.update`] (what
    `attach` does for each batch), for example from logs or a serving app's own loop.

    Three families of anytime-valid tests (see the module docstring for the test and the split of `alpha`):
    the exit rate at the calibrated threshold, the fraction of saver confidences at or below each calibration decile
    (both label-free, two-sided), and the saver-vs-base disagreement rate on a random `audit_fraction` of exited
    images, which the guard sends to the base (alarm on a rise only).

    On an alarm: `on_alarm(alarm)` is called with a [`DriftAlarm`], a warning is logged (once per statistic), and
    with `fallback="base"` the attached cascade's `config.threshold` is raised to 1.0 (no confidence is above it, so
    every image goes to the base), with `fallback="threshold"` to `fallback_threshold` (by default the certified
    point above the calibrated threshold whose exit rate is nearest half the calibrated one, when the calibration
    record has `certified_points`). A `threshold=` passed to a call still overrides `config.threshold`. `reset()`
    restores the threshold and starts over; `counters` can be read at any time.

    Args:
        calibration (`Mapping`):
            The cascade's calibration record (`cascade.config.calibration`, written by
            [`~hf_tinysaver.workflows.cascade.calibrate_cascade`] and `tinysaver calibrate`): it needs `threshold`, `n`,
            `exit_rate`, `confidence_quantiles` and, for audits, `exited` and `exited_disagreement`.
        alpha (`float`, *optional*, defaults to 0.05):
            Probability of any false alarm over the whole stream, all statistics together.
        tolerance (`float`, *optional*, defaults to 0.02):
            Change of each rate (exit rate, confidence fractions, disagreement) that should not alarm, on top of the
            calibration's own sampling uncertainty.
        audit_fraction (`float`, *optional*, defaults to 0.02):
            Fraction of exited images also sent to the base; 0 turns audits off.
        seed (`int`, *optional*, defaults to 0):
            Seeds the audit draws.
        on_alarm (`Callable[[DriftAlarm], None]`, *optional*):
            Called once per alarm.
        fallback (`str`, *optional*):
            `None` (only report), `"base"` or `"threshold"`.
        fallback_threshold (`float`, *optional*):
            The stricter threshold for `fallback="threshold"`.
        base_macs (`int`, *optional*):
            Base MACs per image, to count the audits' cost; `attach` takes it from the cascade's config.

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_tinysaver.monitor import DriftGuard

    >>> calibration = {"threshold": 0.9, "n": 5000, "exit_rate": 0.8, "exited": 4000, "exited_disagreement": 0.02,
    ...                "confidence_quantiles": {"values": [0.5, 0.9], "fractions_at_or_below": [0.1, 0.2]}}
    >>> alarms = []
    >>> guard = DriftGuard(calibration, audit_fraction=0.0, on_alarm=alarms.append)  # label-free tests only
    >>> rng = np.random.default_rng(0)
    >>> confidence = np.where(rng.random(2000) < 0.5, 0.95, 0.3)  # half the images now fall below the threshold
    >>> _ = guard.update(confidence, confidence > 0.9, np.zeros(2000, dtype=int))
    >>> [(alarm.statistic, alarm.direction, alarm.images_seen) for alarm in alarms]
    [('confidence', 'above', 9), ('exit_rate', 'below', 11)]
    >>> guard.counters["images"]
    2000
    ```
    """

    def __init__(
        self,
        calibration: Mapping[str, Any],
        alpha: float = 0.05,
        tolerance: float = 0.02,
        audit_fraction: float = 0.02,
        seed: int = 0,
        on_alarm: Callable[[DriftAlarm], None] | None = None,
        fallback: str | None = None,
        fallback_threshold: float | None = None,
        base_macs: int | None = None,
    ):
        if not isinstance(calibration, Mapping):
            raise TypeError(f"calibration must be the cascade's calibration record (a dict), got {type(calibration)}.")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}.")
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance}.")
        if not 0 <= audit_fraction <= 1:
            raise ValueError(f"audit_fraction must be in [0, 1], got {audit_fraction}.")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}.")
        missing = [
            key for key in ("threshold", "n", "exit_rate", "confidence_quantiles") if calibration.get(key) is None
        ]
        if audit_fraction > 0:
            if calibration.get("exited") == 0:
                raise ValueError(
                    "No calibration image exits at the calibrated threshold, so there is no disagreement rate to "
                    "audit against: pass audit_fraction=0 (the label-free statistics still run)."
                )
            missing += [key for key in ("exited", "exited_disagreement") if calibration.get(key) is None]
        if missing:
            raise ValueError(
                f"The calibration record lacks {missing}, which the drift guard compares the stream against. "
                "Recalibrate with this version of hf_tinysaver (`tinysaver calibrate` or `calibrate_cascade`), "
                "which records them"
                + (", or pass audit_fraction=0 to monitor without audits." if "exited" in " ".join(missing) else ".")
            )
        self.calibration = dict(calibration)
        self.threshold = float(calibration["threshold"])
        self.alpha = float(alpha)
        self.tolerance = float(tolerance)
        self.audit_fraction = float(audit_fraction)
        self.seed = seed
        self.on_alarm = on_alarm
        self.fallback = fallback
        self.fallback_threshold = self._resolve_fallback_threshold(fallback, fallback_threshold)
        self.base_macs = base_macs
        self.cascade = None
        self._handle = None
        self._original_threshold = None

        quantiles = calibration["confidence_quantiles"]
        values = [float(v) for v in quantiles.get("values", [])]
        fractions = [float(v) for v in quantiles.get("fractions_at_or_below", [])]
        if not values or len(values) != len(fractions):
            raise ValueError(
                "calibration['confidence_quantiles'] needs equally long, non-empty 'values' and "
                "'fractions_at_or_below'; recalibrate with this version of hf_tinysaver."
            )
        self.quantile_values = np.asarray(values)
        levels = quantiles.get("levels") or [None] * len(values)
        n = int(calibration["n"])
        families = 3 if audit_fraction > 0 else 2
        family_alpha = self.alpha / families
        self._exit = self._two_sided(
            "exit_rate",
            f"exit rate at the calibrated threshold {self.threshold:.6g}",
            float(calibration["exit_rate"]),
            n,
            family_alpha / 2,
        )
        self._confidence = [
            self._two_sided(
                "confidence",
                f"fraction of saver confidences <= {value:.6g}"
                + (f" (calibration quantile {level:g})" if level is not None else ""),
                fraction,
                n,
                family_alpha / (2 * len(values)),
            )
            for value, fraction, level in zip(values, fractions, levels, strict=True)
        ]
        self._disagreement = None
        if audit_fraction > 0:
            exited = int(calibration["exited"])
            reference = float(calibration["exited_disagreement"])
            upper = clopper_pearson_upper(round(reference * exited), exited, 1 - family_alpha)
            self._disagreement = _Monitored(
                "disagreement",
                "saver-vs-base disagreement rate on audited exited images",
                reference,
                [BernoulliSequentialTest(float(upper) + self.tolerance, "above", family_alpha)],
            )
        self.reset()

    def _two_sided(self, statistic: str, detail: str, reference: float, n: int, alpha: float) -> _Monitored:
        count = round(reference * n)
        # Each side's band edge is the reference's one-sided Clopper-Pearson bound at that side's level.
        lower = float(clopper_pearson_lower(count, n, 1 - alpha)) - self.tolerance
        upper = float(clopper_pearson_upper(count, n, 1 - alpha)) + self.tolerance
        tests = [BernoulliSequentialTest(upper, "above", alpha), BernoulliSequentialTest(lower, "below", alpha)]
        return _Monitored(statistic, detail, reference, tests)

    def _resolve_fallback_threshold(self, fallback: str | None, fallback_threshold: float | None) -> float | None:
        if fallback != "threshold":
            if fallback_threshold is not None:
                raise ValueError("fallback_threshold is only used with fallback='threshold'; pass both or neither.")
            return None
        if fallback_threshold is None:
            points = [
                point
                for point in self.calibration.get("certified_points") or []
                if isinstance(point, Mapping) and "threshold" in point and float(point["threshold"]) > self.threshold
            ]
            if not points:
                raise ValueError(
                    "fallback='threshold' needs a stricter threshold: pass fallback_threshold=..., or calibrate with "
                    "certified points (the record's 'certified_points'), or use fallback='base'."
                )
            # The table always holds 1.0 (nothing exits, the same as fallback="base"): take the stricter certified
            # point that lets about half as many images exit as the calibrated one, where exit rates are recorded.
            with_rates = [point for point in points if point.get("exit_rate") is not None]
            if with_rates:
                half = float(self.calibration["exit_rate"]) / 2.0
                chosen = min(with_rates, key=lambda point: abs(float(point["exit_rate"]) - half))
                fallback_threshold = float(chosen["threshold"])
            else:
                fallback_threshold = max(float(point["threshold"]) for point in points)
        fallback_threshold = float(fallback_threshold)
        if not fallback_threshold > self.threshold:
            raise ValueError(
                f"fallback_threshold {fallback_threshold} is not stricter than the calibrated threshold "
                f"{self.threshold}; pass a higher one (images exit when their confidence is above it)."
            )
        return fallback_threshold

    @classmethod
    def for_cascade(cls, cascade, **kwargs) -> DriftGuard:
        """A guard built from `cascade.config.calibration` and attached to `cascade`; `kwargs` as for `__init__`."""
        kwargs.setdefault("base_macs", cascade.config.base_macs)
        return cls(cascade.config.calibration, **kwargs).attach(cascade)

    def attach(self, cascade) -> DriftGuard:
        """Watches every batch `cascade` answers (`forward`, `forward_stream`, pipelines); returns the guard."""
        if not hasattr(cascade, "register_decision_hook"):
            raise TypeError(
                f"{type(cascade).__name__} has no register_decision_hook; attach the guard to a "
                "TinySaverForImageClassification, or feed it per-image outputs with DriftGuard.update."
            )
        if self.cascade is not None:
            raise ValueError("This guard is already attached; call detach() first or build another guard.")
        self.cascade = cascade
        self._original_threshold = cascade.config.threshold
        if self.base_macs is None:
            self.base_macs = cascade.config.base_macs
        self._handle = cascade.register_decision_hook(self._on_batch)
        return self

    def detach(self) -> None:
        """Stops watching (and restores the cascade's threshold if a fallback changed it)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._restore_threshold()
        self.cascade = None

    def _restore_threshold(self) -> None:
        if self.cascade is not None and self._original_threshold is not None:
            self.cascade.config.threshold = self._original_threshold

    def reset(self, seed: int | None = None) -> None:
        """Forgets everything seen (counts, tests, alarms) and restores the threshold.

        Args:
            seed: Reseeds the audit draws; by default they continue where they were, so that successive streams
                get independent audits.
        """
        for monitored in self._all_monitored():
            for test in monitored.tests:
                test.reset()
        if seed is not None or not hasattr(self, "_rng"):
            self._rng = np.random.default_rng(self.seed if seed is None else seed)
        self.images = 0
        self.exited = 0
        self.audited = 0
        self.audited_disagreements = 0
        self.alarms: list[DriftAlarm] = []
        self._logged: set[str] = set()
        self.fallback_active = False
        self._restore_threshold()

    def _all_monitored(self) -> list[_Monitored]:
        return [self._exit, *self._confidence] + ([self._disagreement] if self._disagreement else [])

    def _on_batch(self, cascade, pixel_values, base_pixel_values, output) -> None:
        base_inputs = base_pixel_values if base_pixel_values is not None else pixel_values

        def audit(rows: np.ndarray) -> np.ndarray:
            index = torch.as_tensor(rows, dtype=torch.long, device=base_inputs.device)
            with torch.no_grad():
                logits = cascade.base(pixel_values=base_inputs.index_select(0, index)).logits
            return logits.argmax(dim=-1).cpu().numpy()

        self.update(
            output.saver_confidence.detach().cpu().numpy(),
            output.exited.cpu().numpy(),
            output.saver_logits.detach().argmax(dim=-1).cpu().numpy(),
            audit,
        )

    def update(
        self,
        saver_confidence: Any,
        exited: Any,
        saver_predictions: Any,
        audit: Callable[[np.ndarray], Any] | None = None,
    ) -> list[DriftAlarm]:
        """Adds one batch of per-image cascade outputs, in stream order; returns the alarms it raised.

        Args:
            saver_confidence: `(batch,)` saver confidences (`output.saver_confidence`).
            exited: `(batch,)` booleans, whether each image exited (`output.exited`).
            saver_predictions: `(batch,)` the saver's predicted class in the base's label space.
            audit: Called with the row indices (into this batch) drawn for a shadow audit, returns the base's
                predicted class for those rows. Required while audits are on and an image exits.

        Returns:
            The new alarms (also appended to `alarms`).
        """
        confidence = np.asarray(saver_confidence, dtype=np.float64).reshape(-1)
        exited = np.asarray(exited, dtype=bool).reshape(-1)
        saver_predictions = np.asarray(saver_predictions).reshape(-1)
        if not (len(confidence) == len(exited) == len(saver_predictions)):
            raise ValueError(
                f"saver_confidence, exited and saver_predictions need one entry per image, got lengths "
                f"{len(confidence)}, {len(exited)} and {len(saver_predictions)}."
            )
        if not np.isfinite(confidence).all():
            raise ValueError("saver_confidence contains NaN or infinite values; check the saver's outputs.")
        start = self.images
        crossings: list[DriftAlarm] = []
        self._run(self._exit, confidence > self.threshold, start, crossings)
        for value, monitored in zip(self.quantile_values, self._confidence, strict=True):
            self._run(monitored, confidence <= value, start, crossings)
        self.images += len(confidence)
        self.exited += int(np.count_nonzero(exited))

        if self._disagreement is not None:
            candidates = np.flatnonzero(exited)
            if candidates.size:
                rows = candidates[self._rng.random(candidates.size) < self.audit_fraction]
                if rows.size:
                    if audit is None:
                        raise ValueError(
                            "Shadow audits are on (audit_fraction > 0), so update() needs audit=, a callable giving "
                            "the base's predictions for the drawn rows; or build the guard with audit_fraction=0."
                        )
                    base_predictions = np.asarray(audit(rows)).reshape(-1)
                    if base_predictions.shape != rows.shape:
                        raise ValueError(
                            f"audit returned {base_predictions.size} predictions for {rows.size} rows; return one "
                            "base prediction per row."
                        )
                    disagree = saver_predictions[rows] != base_predictions
                    self.audited += int(rows.size)
                    self.audited_disagreements += int(np.count_nonzero(disagree))
                    self._run(self._disagreement, disagree, start, crossings, positions=rows)
        # Raised in stream order, the first per statistic only, so that batching never changes what is reported.
        new: list[DriftAlarm] = []
        for alarm in sorted(crossings, key=lambda alarm: alarm.images_seen):
            if not self._family_alarmed(alarm.statistic):
                self._raise(alarm)
                new.append(alarm)
        return new

    def _family_alarmed(self, statistic: str) -> bool:
        return any(alarm.statistic == statistic for alarm in self.alarms)

    def _run(
        self,
        monitored: _Monitored,
        values: np.ndarray,
        start: int,
        new: list[DriftAlarm],
        positions: np.ndarray | None = None,
    ) -> None:
        for test in monitored.tests:
            index = test.update(values)
            if index is None or self._family_alarmed(monitored.statistic):
                continue  # a test that crossed after its statistic alarmed stays quiet
            # The counts at the crossing (the test has already counted the whole batch).
            successes = test.successes - int(np.count_nonzero(values[index + 1 :]))
            observations = test.observations - (len(values) - index - 1)
            at = BernoulliSequentialTest(test.null_rate, test.side, test.alpha)
            at.successes, at.failures = successes, observations - successes
            image = int(positions[index]) if positions is not None else index
            alarm = DriftAlarm(
                statistic=monitored.statistic,
                detail=monitored.detail,
                direction=test.side,
                estimate=successes / observations,
                bound=at.bound(),
                reference=monitored.reference,
                band_edge=test.null_rate,
                observations=observations,
                images_seen=start + image + 1,
                alpha=test.alpha,
            )
            new.append(alarm)

    def _raise(self, alarm: DriftAlarm) -> None:
        self.alarms.append(alarm)
        if alarm.statistic not in self._logged:
            self._logged.add(alarm.statistic)
            logger.warning(alarm.describe())
        if self.fallback is not None and not self.fallback_active and self.cascade is not None:
            self.cascade.config.threshold = 1.0 if self.fallback == "base" else self.fallback_threshold
            self.fallback_active = True
            logger.warning(
                f"drift guard fallback: the cascade's threshold is now {self.cascade.config.threshold:.6g} "
                f"(was {self._original_threshold:.6g}); call guard.reset() to restore it."
            )
        if self.on_alarm is not None:
            self.on_alarm(alarm)

    @property
    def alarmed(self) -> bool:
        """Whether any alarm was raised since the last `reset()`."""
        return bool(self.alarms)

    @property
    def counters(self) -> dict[str, Any]:
        """What the guard has seen: images, exits, audits, their disagreement, alarms and the audits' cost."""
        monitored_exits = self._exit.tests[0].successes
        return {
            "images": self.images,
            "exit_rate": self.exited / self.images if self.images else None,
            "exit_rate_at_calibrated_threshold": monitored_exits / self.images if self.images else None,
            "calibration_exit_rate": self._exit.reference,
            "audited": self.audited,
            "audited_disagreements": self.audited_disagreements,
            "audited_disagreement_rate": self.audited_disagreements / self.audited if self.audited else None,
            "calibration_exited_disagreement": self._disagreement.reference if self._disagreement else None,
            "alarms": len(self.alarms),
            "alarm_statistics": sorted({alarm.statistic for alarm in self.alarms}),
            "fallback_active": self.fallback_active,
            "audit_macs": self.audited * self.base_macs if self.base_macs else None,
            # The audits' cost as a fraction of running the base on every image seen.
            "audit_relative_macs": self.audited / self.images if self.images else None,
        }


__all__ = ["DriftGuard", "DriftAlarm", "BernoulliSequentialTest", "mixture_log_evidence", "FALLBACKS"]
