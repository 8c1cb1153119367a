"""GPU check of the cascade's serving paths: `forward`, `forward_stream` and `optimize_for_inference` on CUDA.

Needs only torch and transformers on the GPU machine: it imports the cascade's flat remote-code files as a package
(as `trust_remote_code` would), so hf_tinysaver, datasets and the assets need not be there. It builds a CIFAR
ResNet-20 -> ResNet-56 cascade with random weights (batch-norm statistics randomised so folding is really tested,
classifier scaled to realistic logits), sets the threshold for a ~92.5 % exit rate, then checks that the optimised
cascade and the streamed one make the plain cascade's decisions, and times the base alone, `forward` and
`forward_stream` at batch 64 and 256 (synchronised, medians of 7).

Usage (on a machine with a GPU, from the repository root):
    python benchmarks/gpu_serving_check.py            # TF32 off: exact comparisons
    python benchmarks/gpu_serving_check.py --tf32     # PyTorch's default cuDNN TF32
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REMOTE_CODE_FILES = [
    "configuration_tinysaver.py",
    "modeling_tinysaver.py",
    "image_processing_tinysaver.py",
    "confidence.py",
    "configuration_cifar_resnet.py",
    "modeling_cifar_resnet.py",
]
SPEC = {"input_size": [3, 32, 32], "resize": "fixed", "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}


def import_remote_code():
    package = Path(tempfile.mkdtemp()) / "tinysaver_remote_code"
    package.mkdir()
    source = Path(__file__).resolve().parents[1] / "src" / "hf_tinysaver"
    for name in REMOTE_CODE_FILES:
        shutil.copy(source / name, package / name)
    (package / "__init__.py").write_text("")
    sys.path.insert(0, str(package.parent))
    from tinysaver_remote_code.configuration_cifar_resnet import CifarResNetConfig
    from tinysaver_remote_code.modeling_cifar_resnet import CifarResNetForImageClassification
    from tinysaver_remote_code.modeling_tinysaver import TinySaverForImageClassification

    return CifarResNetConfig, CifarResNetForImageClassification, TinySaverForImageClassification


def provenance(**kwargs) -> dict:
    """`hf_tinysaver.provenance.provenance`, loaded from the source file (hf_tinysaver need not be installed)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "src" / "hf_tinysaver" / "provenance.py"
    spec = importlib.util.spec_from_file_location("tinysaver_provenance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.provenance(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tf32", action="store_true", help="Leave cuDNN/matmul TF32 on (PyTorch's conv default).")
    parser.add_argument("--num-images", type=int, default=2048)
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    config_class, resnet_class, cascade_class = import_remote_code()
    torch.manual_seed(0)
    labels = {i: f"class_{i}" for i in range(10)}

    def resnet(depth: int):
        model = resnet_class(config_class(depth=depth, id2label=labels, label2id={v: k for k, v in labels.items()}))
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 2.0)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
            model.linear.weight.mul_(1e-3)  # random CIFAR ResNets give logits of ~1e4, trained ones ~10
        return model.eval()

    cascade = cascade_class.from_saver_and_base(
        resnet(20), resnet(56), saver_preprocessing=SPEC, base_preprocessing=SPEC
    ).cuda()
    images = torch.randn(args.num_images, 3, 32, 32, device="cuda")
    check = images[:512]
    with torch.inference_mode():
        threshold = float(cascade(pixel_values=check, threshold=0.0).saver_confidence.quantile(0.075))
        plain = cascade(pixel_values=check, threshold=threshold)
    cascade.optimize_for_inference()
    with torch.inference_mode():
        optimized = cascade(pixel_values=check, threshold=threshold)
        streamed = list(cascade.forward_stream(list(check.split(64)), threshold=threshold))
    streamed_exited = torch.cat([output.exited for output in streamed])
    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "tf32": args.tf32,
        "folded_convs": sum(type(m).__name__ == "BatchNormFoldedConv2d" for m in cascade.modules()),
        "exit_rate": float(plain.exited.float().mean()),
        "optimized_exit_flips": int((plain.exited != optimized.exited).sum()),
        "optimized_max_abs_diff_same_exit": float(
            (plain.logits - optimized.logits)[plain.exited == optimized.exited].abs().max()
        ),
        "streamed_exit_flips": int((streamed_exited != optimized.exited).sum()),
        "streamed_max_abs_diff": float((torch.cat([o.logits for o in streamed]) - optimized.logits).abs().max()),
        "provenance": provenance(device="cuda", argv=["python", *sys.argv]),
    }
    print(json.dumps(report), flush=True)

    def timed(function) -> float:
        times = []
        for _ in range(7):
            torch.cuda.synchronize()
            start = time.perf_counter()
            function()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.inference_mode():
        for batch_size in (64, 256):
            batches = list(images.split(batch_size))
            variants = {
                "base": lambda batches=batches: [cascade.base(pixel_values=batch) for batch in batches],
                "forward": lambda batches=batches: [cascade(pixel_values=b, threshold=threshold) for b in batches],
                "streamed": lambda batches=batches: list(cascade.forward_stream(batches, threshold=threshold)),
            }
            for function in variants.values():
                function()
            seconds = {name: timed(function) for name, function in variants.items()}
            print(
                f"batch {batch_size}: base {len(images) / seconds['base']:.0f} img/s, forward "
                f"{len(images) / seconds['forward']:.0f} img/s ({seconds['base'] / seconds['forward']:.2f}x), "
                f"streamed {len(images) / seconds['streamed']:.0f} img/s ({seconds['base'] / seconds['streamed']:.2f}x)",
                flush=True,
            )


if __name__ == "__main__":
    main()
