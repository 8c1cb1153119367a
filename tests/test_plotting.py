"""The trade-off plots: units on the axes, the chosen point labelled with its threshold, the base alone, the oracle
bound and held-out points beside calibration points (checked on the Figure's artists, not on pixels)."""

from __future__ import annotations

import numpy as np
import pytest

from hf_tinysaver.calibration.record import CalibrationRecord
from hf_tinysaver.calibration.simulation import CascadeSimulation
from hf_tinysaver.plotting import ORACLE_LABEL, X_LABEL, Y_LABEL, oracle_bound, plot_tradeoff, tradeoff_figure


def simulation(seed: int, n: int = 400, relative_saver_macs: float = 0.2) -> CascadeSimulation:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    base = np.where(rng.random(n) < 0.85, labels, (labels + 1) % 10)
    saver = np.where(rng.random(n) < 0.7, labels, (labels + 2) % 10)
    confidence = np.clip(rng.random(n) * 0.5 + 0.5 * (saver == labels), 0, 1)
    return CascadeSimulation(confidence, saver, base, labels, relative_saver_macs=relative_saver_macs)


def texts(figure) -> list[str]:
    axes = figure.axes[0]
    return [text.get_text() for text in axes.texts] + [text.get_text() for text in axes.get_legend().get_texts()]


def test_oracle_bound_is_the_best_any_exit_rule_reaches():
    sim = simulation(0)
    macs, accuracy = oracle_bound(sim.curve)
    assert macs[0] == pytest.approx(0.2) and accuracy[0] == pytest.approx(sim.saver_accuracy)
    # No threshold beats the bound at its own cost.
    bound = np.interp(sim.curve.relative_macs, macs, accuracy)
    assert np.all(sim.curve.accuracy <= bound + 1e-12)
    assert accuracy[-1] == pytest.approx(
        np.mean((sim.saver_predictions == sim.labels) | (sim.base_predictions == sim.labels))
    )


def test_tradeoff_plot_has_units_the_labelled_point_the_base_and_the_oracle(tmp_path):
    calibration, held_out = simulation(1), simulation(2)
    point = calibration.calibrate("max-drop", max_drop=1.0)
    held_out_point = held_out.evaluate(point.threshold)
    arguments = dict(
        curves={"tiny": calibration.curve},
        base_accuracy=calibration.base_accuracy,
        base_name="big",
        operating_points={"tiny": point},
        held_out_curves={"tiny": held_out.curve},
        held_out_points={"tiny": held_out_point},
        curve_label="calibration",
        title="tiny -> big",
    )
    figure = tradeoff_figure(**arguments)
    axes = figure.axes[0]
    assert axes.get_xlabel() == X_LABEL and "% of the base" in X_LABEL
    assert axes.get_ylabel() == Y_LABEL and "%" in Y_LABEL
    found = texts(figure)
    threshold_labels = [t for t in found if t.startswith(f"threshold {point.threshold:.4g}")]
    assert len(threshold_labels) == 2  # the calibration point and the same threshold on held-out data
    assert f"exit {100 * held_out_point.exit_rate:.1f} %" in "\n".join(threshold_labels)
    assert {"tiny (calibration)", "tiny (held-out)", "big alone", f"{ORACLE_LABEL}, calibration"} <= set(found)
    lines = {line.get_label(): line for line in axes.get_lines()}
    # x in percent of the base: the base alone sits at 100, the curve starts at the saver's own 20 %.
    assert lines["tiny (calibration)"].get_xdata().min() == pytest.approx(20.0)
    assert lines["tiny (held-out)"].get_linestyle() == "--"
    # Sized for the ~800 px the Hub shows a card's images at.
    assert figure.get_size_inches()[0] * figure.dpi == 800
    path = plot_tradeoff(tmp_path / "tradeoff.png", **arguments)
    assert path.read_bytes()[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["tradeoff.png"]


def test_calibration_points_are_drawn_beside_held_out_ones():
    held_out = simulation(3)
    record = CalibrationRecord(threshold=0.6, exit_rate=0.8, accuracy=0.84, relative_macs=0.4)
    figure = tradeoff_figure(
        {"tiny": held_out.curve},
        held_out.base_accuracy,
        operating_points={"tiny": held_out.evaluate(0.6)},
        calibration_points={"calibration point (test[:50%])": record},
        curve_label="held-out test[50%:]",
    )
    found = texts(figure)
    assert "calibration point (test[:50%]): threshold 0.6" in found
    assert "tiny (held-out test[50%:])" in found and any(t.startswith("threshold 0.6\n") for t in found)


def test_one_wording_of_drops_everywhere():
    from hf_tinysaver.calibration.simulation import format_drop

    assert format_drop(0.64) == "drop 0.64 points"
    assert format_drop(-1e-12) == "drop 0.00 points"
    assert format_drop(-0.15) == "drop -0.15 points = a 0.15-point gain over the base"
    point = simulation(4).evaluate(0.5)
    assert format_drop(point.accuracy_drop) in point.describe()


def test_evaluation_description_names_a_missed_target_and_a_saver_alone():
    from hf_tinysaver.workflows.cascade import describe_evaluation

    results = {"accuracy": 0.80, "base_accuracy": 0.81, "accuracy_drop_points": 1.0, "exit_rate": 1.0,
               "relative_macs": 0.3, "n": 100, "max_drop": 0.5, "target_missed": True, "saver_alone": True,
               "costs_more_than_base": False, "saver_macs": 3, "base_macs": 10}  # fmt: skip
    text = "\n".join(describe_evaluation(results))
    assert "drop 1.00 points" in text
    assert "missed the calibration's target of 0.5 points" in text
    assert "the saver alone answers" in text
    quiet = describe_evaluation(results | {"target_missed": False, "saver_alone": False, "exit_rate": 0.5})
    assert len(quiet) == 1


def test_time_cascade_speedups_only_reports_its_rounds_and_leaves_the_bounds_out():
    from PIL import Image

    from hf_tinysaver.workflows.timing import time_cascade
    from test_hub import make_cascade

    cascade = make_cascade(saver_macs=10, base_macs=100).eval()
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(8)]
    inputs = cascade.get_image_processor()(images=pictures, return_tensors="pt")
    saver_inputs = inputs["pixel_values"]
    base_inputs = inputs.get("base_pixel_values", saver_inputs)
    lines = []
    timing = time_cascade(cascade, saver_inputs, base_inputs, 4, repeats=2, progress=lines.append, speedups_only=True)
    assert len(lines) == 3 and lines[0].strip().startswith("warm-up done") and "round 2/2" in lines[-1]
    assert timing["realised_speedup"] > 0 and timing["streamed_speedup"] > 0 and timing["n"] == 8
    assert timing["composition_bound_speedup"] is None and timing["overhead_vs_saver_then_base"] is None
    full = time_cascade(cascade, saver_inputs, base_inputs, 4, repeats=1)
    assert full["composition_bound_speedup"] > 0 and full["overhead_vs_saver_then_base"] is not None
