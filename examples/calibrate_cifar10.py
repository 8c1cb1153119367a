"""Calibrate a CIFAR-10 cascade on one half of the test set and check it, for real, on the other half.

Prints the calibrated operating point (in-sample) and what the real cascade does on held-out images, optionally
with a certified threshold: the drop on fresh data stays within target with the given probability.

    python examples/calibrate_cifar10.py --saver cifar10-resnet20 --base cifar10-resnet56 --max-drop 0.5 \
        [--confidence-level 0.95] [--limit 1000]
"""

import argparse

from hf_tinysaver.workflows.cascade import build_cascade, calibrate_cascade, evaluate_cascade

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--saver", default="cifar10-resnet20")
parser.add_argument("--base", default="cifar10-resnet56")
parser.add_argument("--max-drop", type=float, default=0.5)
parser.add_argument("--confidence-level", type=float, default=None)
parser.add_argument("--limit", type=int, default=None, help="Use only this many images per half (quick runs).")
parser.add_argument("--out", default=None, help="Save the calibrated cascade here.")
args = parser.parse_args()

calibration_split, evaluation_split = "test[:50%]", "test[50%:]"
if args.limit:
    calibration_split, evaluation_split = f"test[:{args.limit}]", f"test[5000:{5000 + args.limit}]"

cascade = build_cascade(args.saver, args.base)
result, simulation = calibrate_cascade(
    cascade, "cifar10", calibration_split, max_drop=args.max_drop, confidence_level=args.confidence_level
)
held_out = evaluate_cascade(cascade, "cifar10", evaluation_split)

print(f"{'':>22} {'calibration':>12} {'held-out':>10}")
print(f"{'images':>22} {result.n:>12} {held_out['n']:>10}")
print(f"{'exit rate':>22} {result.exit_rate:>12.4f} {held_out['exit_rate']:>10.4f}")
print(f"{'cascade accuracy (%)':>22} {100 * result.accuracy:>12.2f} {100 * held_out['accuracy']:>10.2f}")
print(f"{'base accuracy (%)':>22} {100 * result.base_accuracy:>12.2f} {100 * held_out['base_accuracy']:>10.2f}")
print(f"{'drop (points)':>22} {result.accuracy_drop:>12.2f} {held_out['accuracy_drop_points']:>10.2f}")
print(f"{'relative MACs':>22} {result.relative_macs:>12.4f} {held_out['relative_macs']:>10.4f}")
print(f"oracle bound (relative MACs, calibration half): {simulation.oracle_relative_macs():.4f}")
if args.out:
    cascade.save_pretrained(args.out)
