"""Quickstart: build a TinySaver cascade from two real pretrained models, calibrate it, save it, serve it.

ResNet-20 (41 M MACs) saves ResNet-56 (125 M MACs) on CIFAR-10: the threshold is calibrated on part of the test set
so the cascade loses at most 0.5 accuracy points, then the saved cascade runs in a plain transformers pipeline.

    python examples/quickstart.py [--calibration-split 'test[:2000]'] [--out cifar10-cascade]
"""

import argparse

from transformers import pipeline

from hf_tinysaver.workflows.cascade import build_cascade, calibrate_cascade, load_dataset_split

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--calibration-split", default="test[:2000]")
parser.add_argument("--max-drop", type=float, default=0.5, help="Allowed top-1 drop in points.")
parser.add_argument("--out", default="cifar10-cascade")
args = parser.parse_args()

# 1. Build: zoo names, local folders and Hub ids all work (e.g. "timm/mobilenetv3_small_100.lamb_in1k").
cascade = build_cascade("cifar10-resnet20", "cifar10-resnet56")

# 2. Calibrate: record both models on the split (cached) and pick the threshold for the allowed drop.
result, _ = calibrate_cascade(cascade, "cifar10", args.calibration_split, objective="max-drop", max_drop=args.max_drop)
print(f"calibrated: {result.describe()}")

# 3. Save: config (threshold + calibration record), one safetensors file, processor and remote code.
cascade.save_pretrained(args.out)

# 4. Serve: any transformers user loads it with trust_remote_code, no hf_tinysaver needed.
classifier = pipeline("image-classification", model=args.out, trust_remote_code=True)
held_out = load_dataset_split("cifar10", "test[-4:]")
for image, label in zip(held_out["image"], held_out["label"], strict=True):
    best = classifier(image, top_k=1)[0]
    print(f"true {held_out.features['label'].names[label]:>10}  predicted {best['label']:>10} ({best['score']:.2f})")
