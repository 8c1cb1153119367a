"""The drift guard: anytime-valid false-alarm control, detection of planted shifts, and attachment to real cascades."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import random_images
from hf_tinysaver import TinySaverForImageClassification
from hf_tinysaver.calibration.simulation import CascadeSimulation
from hf_tinysaver.monitor import BernoulliSequentialTest, DriftAlarm, DriftGuard, mixture_log_evidence
from hf_tinysaver.workflows.cascade import drift_reference
from tiny_models import timm_classifier, tiny_vit, tiny_vit_preprocessing

THRESHOLD = 0.7


def synthetic_outputs(n: int, rng: np.random.Generator, confidence_shift: float = 0.0, disagreement: float = 0.03):
    """Per-image cascade outputs: confidences in (0, 1), saver and base predictions that disagree at a set rate."""
    confidence = np.clip(rng.beta(4, 1.5, size=n) - confidence_shift, 0.0, 1.0)
    base = rng.integers(0, 10, size=n)
    saver = np.where(rng.random(n) < disagreement, (base + 1) % 10, base)
    return confidence, saver, base


def calibration_record(n: int = 5000, seed: int = 100) -> dict:
    confidence, saver, base = synthetic_outputs(n, np.random.default_rng(seed))
    simulation = CascadeSimulation(confidence, saver, base)
    return {**simulation.evaluate(THRESHOLD).to_dict(), **drift_reference(simulation, THRESHOLD)}


def feed(guard: DriftGuard, confidence, saver, base, batch_size: int = 50) -> list[DriftAlarm]:
    alarms = []
    for start in range(0, len(confidence), batch_size):
        rows = slice(start, start + batch_size)
        alarms += guard.update(
            confidence[rows],
            confidence[rows] > guard.threshold,
            saver[rows],
            audit=lambda drawn, b=base[rows]: b[drawn],
        )
    return alarms


def test_mixture_is_a_martingale_with_mean_one_at_the_null():
    # E[M_t] = 1 exactly under p = p0 (Ville's inequality then bounds the false alarms), checked by summing over
    # the binomial distribution of the counts.
    for null_rate in (0.02, 0.5, 0.93):
        for side in ("above", "below"):
            for t in (1, 7, 60):
                successes = np.arange(t + 1)
                evidence = np.exp(mixture_log_evidence(successes, t - successes, null_rate, side))
                assert np.sum(stats.binom.pmf(successes, t, null_rate) * evidence) == pytest.approx(1.0, rel=1e-9)


def test_sequential_test_false_alarms_stay_below_alpha_when_checked_after_every_observation():
    rng = np.random.default_rng(0)
    alpha, streams = 0.1, 300
    rejections = 0
    for _ in range(streams):
        test = BernoulliSequentialTest(0.2, "above", alpha)
        # One observation per update: the test is looked at after every single image.
        rejections += any(test.update(np.array([x])) is not None for x in rng.random(200) < 0.2)
    # Binomial(400, <= 0.1): above 0.1 + 3 standard errors would reject the anytime-valid claim.
    assert rejections / streams <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / streams)
    # A fixed-sample 90 % test applied after every observation would alarm in far more streams; and a real shift
    # is caught.
    test = BernoulliSequentialTest(0.2, "above", alpha)
    assert test.update(rng.random(300) < 0.4) is not None


def test_clean_synthetic_streams_rarely_alarm():
    calibration = calibration_record()
    rng = np.random.default_rng(1)
    alpha, streams = 0.1, 200
    guard = DriftGuard(calibration, alpha=alpha, tolerance=0.0, audit_fraction=0.2, seed=2)
    alarmed = 0
    for _ in range(streams):
        guard.reset()
        alarmed += bool(feed(guard, *synthetic_outputs(1000, rng)))
    assert guard.counters["audited"] > 0
    assert alarmed / streams <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / streams)


@pytest.mark.parametrize(
    "shift, statistic",
    [
        ({"confidence_shift": 0.25}, "exit_rate"),  # confidences drop: fewer exits
        ({"disagreement": 0.3}, "disagreement"),  # same confidences, the saver now often contradicts the base
    ],
)
def test_planted_shift_is_detected(shift, statistic):
    guard = DriftGuard(calibration_record(), audit_fraction=0.2, seed=3)
    rng = np.random.default_rng(4)
    assert not feed(guard, *synthetic_outputs(1000, rng))  # clean prefix
    alarms = feed(guard, *synthetic_outputs(4000, rng, **shift))
    assert statistic in {alarm.statistic for alarm in alarms}
    alarm = next(alarm for alarm in alarms if alarm.statistic == statistic)
    assert alarm.images_seen > 1000
    if statistic == "disagreement":
        # Label-free statistics saw nothing: the confidence distribution did not move.
        assert {a.statistic for a in alarms} == {"disagreement"}
        assert alarm.direction == "above" and alarm.bound > alarm.band_edge > alarm.reference
    else:
        assert alarm.direction == "below" and alarm.bound < alarm.band_edge < alarm.reference


def test_confidence_distribution_shift_with_unchanged_exit_rate_is_detected():
    calibration = calibration_record()
    guard = DriftGuard(calibration, audit_fraction=0.0)
    rng = np.random.default_rng(5)
    confidence, saver, base = synthetic_outputs(4000, rng)
    # The images below the threshold become much less confident; those above it are untouched.
    confidence = np.where(confidence > THRESHOLD, confidence, confidence * 0.3)
    alarms = feed(guard, confidence, saver, base)
    assert [alarm.statistic for alarm in alarms] == ["confidence"]
    assert guard.counters["exit_rate_at_calibrated_threshold"] == pytest.approx(calibration["exit_rate"], abs=0.03)


def test_decisions_do_not_depend_on_batching():
    calibration = calibration_record()
    rng = np.random.default_rng(6)
    stream = tuple(
        np.concatenate(parts)
        for parts in zip(synthetic_outputs(500, rng), synthetic_outputs(2000, rng, 0.1), strict=True)
    )
    results = []
    for batch_size in (1, 37, 500):
        guard = DriftGuard(calibration, audit_fraction=0.5, seed=7)
        alarms = feed(guard, *stream, batch_size=batch_size)
        results.append(([alarm.to_dict() for alarm in alarms], guard.counters))
    assert results[0][0]
    assert results[0] == results[1] == results[2]


def test_reset_continues_the_audit_draws_unless_reseeded():
    calibration = calibration_record()
    confidence, saver, base = synthetic_outputs(2000, np.random.default_rng(9))
    guard = DriftGuard(calibration, audit_fraction=0.1, seed=3)
    audited = []
    for seed in (None, None, 3):
        guard.reset(seed=seed)
        drawn_rows = []

        def audit(drawn, drawn_rows=drawn_rows):
            drawn_rows.append(drawn)
            return base[drawn]

        guard.update(confidence, confidence > THRESHOLD, saver, audit=audit)
        audited.append(drawn_rows[0].tolist())
    assert audited[0] != audited[1]  # a new stream gets new audits
    assert audited[2] == audited[0]  # reseeding repeats them


def test_alarm_callback_log_and_counters(caplog):
    received = []
    guard = DriftGuard(calibration_record(), audit_fraction=0.1, on_alarm=received.append, base_macs=1000)
    rng = np.random.default_rng(8)
    with caplog.at_level(logging.WARNING, logger="hf_tinysaver.monitor"):
        alarms = feed(guard, *synthetic_outputs(3000, rng, confidence_shift=0.3))
    assert received == alarms and alarms
    assert len(caplog.records) == len({alarm.statistic for alarm in alarms})  # one line per alarm kind
    assert "drift alarm" in caplog.records[0].getMessage()
    counters = guard.counters
    assert counters["images"] == 3000
    assert counters["alarms"] == len(alarms)
    assert counters["audit_macs"] == 1000 * counters["audited"]
    assert counters["audit_relative_macs"] == counters["audited"] / 3000
    exits = int(
        np.count_nonzero(synthetic_outputs(3000, np.random.default_rng(8), confidence_shift=0.3)[0] > THRESHOLD)
    )
    assert counters["exit_rate"] == exits / 3000


def test_bad_inputs_say_what_to_do():
    calibration = calibration_record()
    with pytest.raises(ValueError, match="Recalibrate"):
        DriftGuard({key: value for key, value in calibration.items() if key != "confidence_quantiles"})
    with pytest.raises(ValueError, match="audit_fraction=0"):
        DriftGuard({key: value for key, value in calibration.items() if key != "exited_disagreement"})
    DriftGuard({key: value for key, value in calibration.items() if key != "exited_disagreement"}, audit_fraction=0)
    nothing_exited = {**calibration, "exited": 0, "exited_disagreement": None}
    with pytest.raises(ValueError, match="No calibration image exits .* audit_fraction=0"):
        DriftGuard(nothing_exited)
    DriftGuard(nothing_exited, audit_fraction=0)
    with pytest.raises(ValueError, match="not stricter"):
        DriftGuard(calibration, fallback="threshold", fallback_threshold=THRESHOLD - 0.1)
    with pytest.raises(ValueError, match="fallback_threshold"):
        DriftGuard(calibration, fallback="threshold")
    strict = DriftGuard(
        {**calibration, "certified_points": [{"threshold": 0.8}, {"threshold": 0.9}]}, fallback="threshold"
    )
    assert strict.fallback_threshold == 0.9
    # With the certificate's table (exit rates recorded, 1.0 always certified): about half the calibrated exits.
    exit_rate = calibration["exit_rate"]
    table = [
        {"threshold": THRESHOLD, "exit_rate": exit_rate},
        {"threshold": (THRESHOLD + 1) / 2, "exit_rate": exit_rate / 2},
        {"threshold": (THRESHOLD + 3) / 4, "exit_rate": exit_rate / 8},
        {"threshold": 1.0, "exit_rate": 0.0},
    ]
    halved = DriftGuard({**calibration, "certified_points": table}, fallback="threshold")
    assert halved.fallback_threshold == (THRESHOLD + 1) / 2
    guard = DriftGuard(calibration, audit_fraction=1.0)
    with pytest.raises(ValueError, match="audit="):
        guard.update(np.array([0.99]), np.array([True]), np.array([1]))
    with pytest.raises(ValueError, match="one entry per image"):
        guard.update(np.array([0.99, 0.5]), np.array([True]), np.array([1]))


# Tiny real cascades: the guard attached through the cascade's decision hook.


def tiny_cascade(mixed: bool = False) -> TinySaverForImageClassification:
    saver = timm_classifier("test_efficientnet", seed=0)
    base = tiny_vit(image_size=32) if mixed else timm_classifier("test_resnet", seed=1)
    return TinySaverForImageClassification.from_saver_and_base(
        saver,
        base,
        base_preprocessing=tiny_vit_preprocessing(32) if mixed else None,
        saver_macs=10,
        base_macs=1000,
    ).eval()


def calibrate_tiny(cascade, images) -> dict:
    processor = cascade.get_image_processor()
    with torch.no_grad():
        outputs = cascade(**processor(images=images), threshold=1.0)
        inputs = processor(images=images)
        base_logits = cascade.base(pixel_values=inputs.get("base_pixel_values", inputs["pixel_values"])).logits
    simulation = CascadeSimulation(
        outputs.saver_confidence.numpy(), outputs.saver_logits.argmax(-1).numpy(), base_logits.argmax(-1).numpy()
    )
    threshold = float(np.quantile(simulation.confidence, 0.5))
    cascade.config.threshold = threshold
    cascade.config.calibration = {**simulation.evaluate(threshold).to_dict(), **drift_reference(simulation, threshold)}
    return cascade.config.calibration


@pytest.fixture(scope="module")
def calibrated_pair():
    cascade = tiny_cascade(mixed=True)
    calibrate_tiny(cascade, random_images(120, sizes=((32, 32),), seed=11))
    return cascade


def batches_of(cascade, images, size: int = 20):
    processor = cascade.get_image_processor()
    return [processor(images=images[i : i + size]) for i in range(0, len(images), size)]


def test_attached_guard_audits_with_the_base_through_forward_and_forward_stream(calibrated_pair):
    cascade = calibrated_pair
    batches = batches_of(cascade, random_images(60, sizes=((32, 32),), seed=12))
    forward_guard = DriftGuard.for_cascade(cascade, audit_fraction=1.0)
    with torch.no_grad():
        outputs = [cascade(**batch) for batch in batches]
    forward_guard.detach()
    stream_guard = DriftGuard.for_cascade(cascade, audit_fraction=1.0)
    streamed = list(cascade.forward_stream(iter(batches), base_batch_size=16))
    stream_guard.detach()

    # Every exited image was audited (audit_fraction=1) with the base on its own inputs (base_pixel_values).
    expected = 0
    with torch.no_grad():
        for batch, output in zip(batches, outputs, strict=True):
            base_predictions = cascade.base(pixel_values=batch["base_pixel_values"]).logits.argmax(-1)
            exited = output.exited
            expected += int((output.saver_logits.argmax(-1)[exited] != base_predictions[exited]).sum())
    exits = sum(int(output.exited.sum()) for output in outputs)
    assert 0 < exits < 60
    for guard in (forward_guard, stream_guard):
        counters = guard.counters
        assert counters["images"] == 60
        assert counters["audited"] == exits
        assert counters["audited_disagreements"] == expected
        assert counters["audit_macs"] == 1000 * exits
    assert [o.exited.tolist() for o in streamed] == [o.exited.tolist() for o in outputs]
    # Detached: further calls are not counted.
    with torch.no_grad():
        cascade(**batches[0])
    assert forward_guard.counters["images"] == 60


def test_attached_guard_matches_update_and_falls_back_on_a_real_shift(calibrated_pair):
    cascade = calibrated_pair
    calibrated_threshold = cascade.config.threshold
    from PIL import Image

    # The shift: flat single-colour images, whose confidences are nothing like the noise images' of calibration.
    shifted = [Image.new("RGB", (32, 32), (i * 2, 255 - i * 2, 128)) for i in range(100)]
    received = []
    guard = DriftGuard.for_cascade(cascade, audit_fraction=0.0, fallback="base", on_alarm=received.append)
    replay = DriftGuard(cascade.config.calibration, audit_fraction=0.0)
    exited_after = []
    try:
        with torch.no_grad():
            for batch in batches_of(cascade, shifted, size=10):
                output = cascade(**batch)
                replay.update(output.saver_confidence.numpy(), output.exited.numpy(), output.saver_logits.argmax(-1))
                if guard.fallback_active:
                    exited_after.append(bool(output.exited.any()))
        assert received and received == guard.alarms
        assert [a.to_dict() for a in replay.alarms] == [a.to_dict() for a in guard.alarms]
        assert guard.fallback_active and cascade.config.threshold == 1.0
        assert exited_after and not any(exited_after)  # the base answers everything after the alarm
        guard.reset()
        assert cascade.config.threshold == calibrated_threshold and not guard.alarmed
    finally:
        guard.detach()
    assert cascade.config.threshold == calibrated_threshold


def test_calibrate_cascade_records_what_the_guard_needs(tiny_cascade_dir, tiny_dataset, tmp_path):
    from hf_tinysaver.workflows.cascade import calibrate_cascade

    cascade = TinySaverForImageClassification.from_pretrained(tiny_cascade_dir)
    cascade.config.saver_macs, cascade.config.base_macs = 10, 1000
    calibrate_cascade(
        cascade, str(tiny_dataset), "train", objective="exit-rate", exit_rate=0.5, cache_dir=tmp_path, progress=False
    )
    record = cascade.config.calibration
    quantiles = record["confidence_quantiles"]
    assert len(quantiles["values"]) == len(quantiles["fractions_at_or_below"]) == 9
    assert quantiles["values"] == sorted(quantiles["values"])
    assert record["exited"] == round(record["exit_rate"] * record["n"])
    assert 0 <= record["exited_disagreement"] <= 1
    cascade.save_pretrained(tmp_path / "calibrated")
    reloaded = TinySaverForImageClassification.from_pretrained(tmp_path / "calibrated")
    guard = DriftGuard.for_cascade(reloaded, audit_fraction=1.0)
    with torch.no_grad():
        output = reloaded(**reloaded.get_image_processor()(images=random_images(12, seed=20)))
    assert guard.counters["images"] == 12 and guard.counters["audited"] == int(output.exited.sum())
    assert guard.counters["audit_macs"] == 1000 * guard.counters["audited"]


def test_docstring_example_runs():
    import doctest

    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    text = DriftGuard.__doc__.replace("```python", "").replace("```", "")
    runner.run(doctest.DocTestParser().get_doctest(text, {}, "DriftGuard", None, 0))
    assert runner.summarize(verbose=False).failed == 0
