"""The drift guard on real shifts: CIFAR-10 test images, clean and under CIFAR-10-C corruptions.

The real cascade cifar10-resnet20 -> cifar10-resnet56 is calibrated (`max-drop`, 0.5 points) on `test[:50%]`; the
guard (`hf_tinysaver.monitor.DriftGuard`, defaults: alpha 0.05, tolerance 0.02, 2 % audits) then watches streams
drawn from `test[50%:]`.

Corruptions: Gaussian noise, defocus blur, JPEG, brightness and contrast at severities 1-5, with the parameters of
Hendrycks & Dietterich's CIFAR-10-C (ICLR 2019, `make_cifar_c.py`), reimplemented here with numpy, scipy and PIL
(the `imagecorruptions` package does not run with current scikit-image, scipy and setuptools, and uses the
ImageNet-C parameters), plus JPEG at quality 10.

To keep the CPU cost sane, the cascade's per-image outputs (saver confidence and prediction, base prediction) are
computed once per shift (on the first `--pool` = 2,000 `test[50%:]` images; clean: on all 5,000) and cached under `~/.cache/hf_tinysaver/drift`; streams
are then resampled (with replacement) from those rows and fed batch by batch through `DriftGuard.update`, the same
code the attached guard runs on each batch (audits look the base's prediction up instead of recomputing it). The
guard's tests are exact per image, so its alarms (and the image at which each is raised) are the same for any
batching (tests/test_monitor.py checks this); the benchmark feeds 500 images per update for speed. Successive
streams reuse one guard (`reset()` between them), whose audit draws continue, so streams are audited independently.

Streams: `--clean-images` clean images (default 1,000), then `--shifted-images` images under the shift (default
5,000); an alarm within the clean prefix counts as a false alarm, the images from the shift's onset to the alarm as
the detection delay. False alarms are also counted on `--clean-streams` (default 200) clean streams of
`--clean-stream-length` (default 5,000) images.

    python benchmarks/drift.py   # first run: 1-2 CPU-minutes per shift to cache the outputs; then ~15 min (streams)
    python benchmarks/drift.py --streams 5 --clean-streams 20 --shifts gaussian_noise-5 --results-file /tmp/d.json

Writes `benchmarks/results/drift_cifar10.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hf_tinysaver.monitor import DriftGuard
from hf_tinysaver.provenance import PROVENANCE_KEY, provenance
from hf_tinysaver.sources import load_dataset_split
from hf_tinysaver.storage import write_file_atomic, write_json_atomic
from hf_tinysaver.workflows.cascade import build_cascade, calibrate_cascade

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TINYSAVER_DRIFT_CACHE", Path.home() / ".cache" / "hf_tinysaver" / "drift"))
CORRUPTION_VERSION = "cifar10c-v1"

# CIFAR-10-C parameters, severities 1-5 (Hendrycks & Dietterich 2019, make_cifar_c.py).
GAUSSIAN_NOISE = [0.04, 0.06, 0.08, 0.09, 0.10]
DEFOCUS_BLUR = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)]
JPEG_QUALITY = [80, 65, 58, 50, 40]
BRIGHTNESS = [0.05, 0.1, 0.15, 0.2, 0.3]
CONTRAST = [0.75, 0.5, 0.4, 0.3, 0.15]


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    x = x / 255.0
    return np.clip(x + rng.normal(size=x.shape, scale=GAUSSIAN_NOISE[severity - 1]), 0, 1) * 255


def gaussian_kernel_1d(sigma: float, size: int = 3) -> np.ndarray:
    """OpenCV's `getGaussianKernel` for a positive sigma."""
    offsets = np.arange(size) - (size - 1) / 2
    weights = np.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def disk(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c.py's anti-aliased disk kernel (17 x 17 for radii up to 8, blurred by a 3 x 3 Gaussian)."""
    from scipy import ndimage

    grid = np.arange(-8, 8 + 1)
    xs, ys = np.meshgrid(grid, grid)
    aliased = ((xs**2 + ys**2) <= radius**2).astype(np.float64)
    aliased /= aliased.sum()
    weights = gaussian_kernel_1d(alias_blur)
    # cv2.GaussianBlur's default border (reflect-101) is scipy's "mirror".
    blurred = ndimage.correlate1d(aliased, weights, axis=0, mode="mirror")
    return ndimage.correlate1d(blurred, weights, axis=1, mode="mirror")


def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    kernel = disk(*DEFOCUS_BLUR[severity - 1])
    x = x / 255.0
    channels = [ndimage.correlate(x[:, :, d], kernel, mode="mirror") for d in range(3)]  # cv2.filter2D's border
    return np.clip(np.stack(channels, axis=-1), 0, 1) * 255


def jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(x).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB")).astype(np.float64)


def jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return jpeg(x, JPEG_QUALITY[severity - 1])


def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """HSV value + c, clipped, back to RGB: with hue and saturation fixed, RGB scales with the value."""
    x = x / 255.0
    value = x.max(axis=-1, keepdims=True)
    new_value = np.clip(value + BRIGHTNESS[severity - 1], 0, 1)
    scale = np.divide(new_value, value, out=np.zeros_like(value), where=value > 0)
    out = np.where(value > 0, x * scale, new_value)
    return np.clip(out, 0, 1) * 255


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    x = x / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - means) * CONTRAST[severity - 1] + means, 0, 1) * 255


CORRUPTIONS = {
    "gaussian_noise": gaussian_noise,
    "defocus_blur": defocus_blur,
    "jpeg_compression": jpeg_compression,
    "brightness": brightness,
    "contrast": contrast,
}
SHIFTS = [f"{name}-{severity}" for name in CORRUPTIONS for severity in range(1, 6)] + ["jpeg_quality_10"]


def corrupt(image: Image.Image, shift: str, rng: np.random.Generator) -> Image.Image:
    x = np.asarray(image.convert("RGB"))
    if shift == "clean":
        return image.convert("RGB")
    if shift == "jpeg_quality_10":
        out = jpeg(x, 10)
    else:
        name, severity = shift.rsplit("-", 1)
        out = CORRUPTIONS[name](x, int(severity), rng)
    return Image.fromarray(np.uint8(out))  # make_cifar_c.py's np.uint8 (truncation)


def shift_outputs(cascade, dataset, shift: str, batch_size: int = 250) -> dict[str, np.ndarray]:
    """The cascade's per-image outputs on every image of `dataset` under `shift` (cached on disk)."""
    key = hashlib.sha256(
        f"{CORRUPTION_VERSION}|{shift}|{dataset._fingerprint}|{cascade.config.saver_config._name_or_path}|"
        f"{cascade.config.base_config._name_or_path}|{cascade.config.confidence}|"
        f"{cascade.config.confidence_temperature}".encode()
    ).hexdigest()[:16]
    path = CACHE / f"{shift}-{key}.npz"
    if path.exists():
        with np.load(path) as data:
            return dict(data)
    processor = cascade.get_image_processor()
    rng = np.random.default_rng(int(hashlib.sha256(shift.encode()).hexdigest()[:8], 16))
    columns = {"saver_confidence": [], "saver_predictions": [], "base_predictions": [], "labels": []}
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            images = [corrupt(image, shift, rng) for image in rows["image"]]
            inputs = processor(images=images, return_tensors="pt")
            saver_logits, confidence, _ = cascade.run_saver(inputs["pixel_values"])
            base_inputs = inputs.get("base_pixel_values", inputs["pixel_values"])
            base_logits = cascade.base(pixel_values=base_inputs).logits
            columns["saver_confidence"].append(confidence.numpy())
            columns["saver_predictions"].append(saver_logits.argmax(-1).numpy())
            columns["base_predictions"].append(base_logits.argmax(-1).numpy())
            columns["labels"].append(np.asarray(rows["label"]))
    outputs = {name: np.concatenate(parts) for name, parts in columns.items()}
    write_file_atomic(path, lambda file: np.savez(file, **outputs))
    return outputs


def run_stream(guard: DriftGuard, pools: list[tuple[dict, int]], batch_size: int, rng: np.random.Generator):
    """Feeds `guard` consecutive segments (outputs, images) resampled from each pool; stops at the first alarm.

    Returns:
        The first alarm (or None) and the index of the segment it fell in.
    """
    guard.reset()
    threshold = guard.threshold
    for segment, (outputs, length) in enumerate(pools):
        index = rng.integers(0, len(outputs["saver_confidence"]), size=length)
        for start in range(0, length, batch_size):
            rows = index[start : start + batch_size]
            confidence = outputs["saver_confidence"][rows]
            alarms = guard.update(
                confidence,
                confidence > threshold,
                outputs["saver_predictions"][rows],
                audit=lambda drawn, rows=rows, base=outputs["base_predictions"]: base[rows[drawn]],
            )
            if alarms:
                return alarms[0], segment
    return None, None


def summarize(outputs: dict[str, np.ndarray], threshold: float) -> dict[str, float]:
    exited = outputs["saver_confidence"] > threshold
    cascade_predictions = np.where(exited, outputs["saver_predictions"], outputs["base_predictions"])
    disagree = outputs["saver_predictions"] != outputs["base_predictions"]
    return {
        "exit_rate": float(exited.mean()),
        "cascade_accuracy": float((cascade_predictions == outputs["labels"]).mean()),
        "base_accuracy": float((outputs["base_predictions"] == outputs["labels"]).mean()),
        "saver_accuracy": float((outputs["saver_predictions"] == outputs["labels"]).mean()),
        "exited_disagreement": float(disagree[exited].mean()) if exited.any() else None,
        "exited_saver_accuracy": float((outputs["saver_predictions"] == outputs["labels"])[exited].mean())
        if exited.any()
        else None,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saver", default="cifar10-resnet20")
    parser.add_argument("--base", default="cifar10-resnet56")
    parser.add_argument("--max-drop", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--audit-fraction", type=float, default=0.02)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=500,
        help="Images per guard update; the guard's decisions and alarm positions do not depend on it, only speed.",
    )
    parser.add_argument("--streams", type=int, default=100, help="Streams per shift.")
    parser.add_argument("--clean-images", type=int, default=1000, help="Clean prefix of each shifted stream.")
    parser.add_argument("--shifted-images", type=int, default=5000, help="Images after the shift's onset.")
    parser.add_argument("--clean-streams", type=int, default=200)
    parser.add_argument("--clean-stream-length", type=int, default=5000)
    parser.add_argument(
        "--pool", type=int, default=2000, help="Images of test[50%%:] computed under each shift (clean: all 5,000)."
    )
    parser.add_argument("--shifts", nargs="*", default=SHIFTS, choices=SHIFTS, metavar="SHIFT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results-file", default=str(REPO_ROOT / "benchmarks" / "results" / "drift_cifar10.json"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cascade = build_cascade(args.saver, args.base)
    calibrate_cascade(cascade, "cifar10", "test[:50%]", objective="max-drop", max_drop=args.max_drop, progress=False)
    calibration = cascade.config.calibration
    threshold = cascade.config.threshold
    dataset = load_dataset_split("cifar10", "test[50%:]")
    guard = DriftGuard(
        calibration,
        alpha=args.alpha,
        tolerance=args.tolerance,
        audit_fraction=args.audit_fraction,
        seed=args.seed,
        base_macs=cascade.config.base_macs,
    )
    rng = np.random.default_rng(args.seed)

    clean = shift_outputs(cascade, dataset, "clean")
    print(f"clean: {summarize(clean, threshold)}", file=sys.stderr, flush=True)
    false_alarms, false_alarm_statistics, audit_fractions = 0, {}, []
    for _ in range(args.clean_streams):
        alarm, _segment = run_stream(guard, [(clean, args.clean_stream_length)], args.batch_size, rng)
        if alarm is not None:
            false_alarms += 1
            false_alarm_statistics[alarm.statistic] = false_alarm_statistics.get(alarm.statistic, 0) + 1
        audit_fractions.append(guard.counters["audit_relative_macs"])
    clean_results = {
        **summarize(clean, threshold),
        "streams": args.clean_streams,
        "stream_length": args.clean_stream_length,
        "false_alarms": false_alarms,
        "false_alarm_rate": false_alarms / args.clean_streams if args.clean_streams else None,
        "false_alarm_statistics": false_alarm_statistics,
        "audit_relative_macs": float(np.mean(audit_fractions)) if audit_fractions else None,
    }
    print(f"clean streams: {clean_results}", file=sys.stderr, flush=True)

    shifts = {}
    pool = dataset.select(range(min(args.pool, len(dataset))))
    for shift in args.shifts:
        outputs = shift_outputs(cascade, pool, shift)
        delays, statistics, prefix_alarms, audits = [], {}, 0, []
        for _ in range(args.streams):
            alarm, segment = run_stream(
                guard, [(clean, args.clean_images), (outputs, args.shifted_images)], args.batch_size, rng
            )
            audits.append(guard.counters["audit_relative_macs"])
            if alarm is None:
                continue
            if segment == 0:
                prefix_alarms += 1
                continue
            delays.append(alarm.images_seen - args.clean_images)
            statistics[alarm.statistic] = statistics.get(alarm.statistic, 0) + 1
        summary = summarize(outputs, threshold)
        shifts[shift] = {
            **summary,
            "accuracy_drop_points": 100 * (summary["base_accuracy"] - summary["cascade_accuracy"]),
            "streams": args.streams,
            "detected": len(delays),
            "detection_rate": len(delays) / args.streams if args.streams else None,
            "median_images_to_alarm": float(np.median(delays)) if delays else None,
            "p90_images_to_alarm": float(np.percentile(delays, 90)) if delays else None,
            "first_alarm_statistics": statistics,
            "alarms_in_clean_prefix": prefix_alarms,
            "audit_relative_macs": float(np.mean(audits)) if audits else None,
        }
        print(f"{shift}: {shifts[shift]}", file=sys.stderr, flush=True)

    results = {
        "saver": args.saver,
        "base": args.base,
        "dataset": "cifar10",
        "calibration_split": "test[:50%]",
        "stream_split": "test[50%:]",
        "objective": "max-drop",
        "max_drop": args.max_drop,
        "threshold": threshold,
        "calibration": {
            key: calibration[key] for key in ("n", "exit_rate", "accuracy", "base_accuracy", "exited_disagreement")
        },
        "guard": {
            "alpha": args.alpha,
            "tolerance": args.tolerance,
            "audit_fraction": args.audit_fraction,
            "batch_size": args.batch_size,
            "seed": args.seed,
        },
        "streams": {
            "shift_pool": len(pool),
            "clean_pool": len(dataset),
            "per_shift": args.streams,
            "clean_prefix": args.clean_images,
            "shifted_images": args.shifted_images,
        },
        "corruptions": "CIFAR-10-C parameters (Hendrycks & Dietterich 2019), reimplemented in benchmarks/drift.py",
        "clean": clean_results,
        "shifts": shifts,
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
        "seconds": time.perf_counter() - started,
    }
    results[PROVENANCE_KEY] = provenance(argv=["python", *sys.argv])
    write_json_atomic(args.results_file, results)
    print(f"wrote {args.results_file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
