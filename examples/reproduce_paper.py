"""Reproduce the paper's ImageNet experiment: pick each base's saver from a pool of timm models by ΔC.

For users with a GPU and Hub access. For every base, every pool model with fewer MACs is a candidate; all are
recorded on ImageNet validation through `datasets` (under `accelerate launch` the processes share the work), the
saver is chosen by the paper's ΔC (`s - r` at its no-loss point) and the cascade's trade-off is reported at allowed
drops of 0.01, 0.5 and 1.0 points, beside our own ranking (relative MACs at 0.5 points).

    accelerate launch examples/reproduce_paper.py --dataset ILSVRC/imagenet-1k --split validation \
        --bases timm/swin_large_patch4_window7_224.ms_in22k_ft_in1k --results-file paper.json

Unlike the paper's official code this calibrates on validation images (not the models' training set) and gives every
model its own preprocessing. `--dry-run` runs the same code path offline on tiny random timm models and a tiny
synthetic dataset (used in CI).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

# The paper's candidate families (arXiv 2403.17726, sec. 4), as timm Hub ids.
PAPER_POOL = [
    "timm/mobilenetv3_small_100.lamb_in1k",
    "timm/efficientvit_m0.r224_in1k",
    "timm/efficientformerv2_s0.snap_dist_in1k",
    "timm/convnextv2_atto.fcmae_ft_in1k",
    "timm/mobilenetv3_large_100.ra4_e3600_r224_in1k",
    "timm/efficientnet_b0.ra_in1k",
    "timm/resnet18.a1_in1k",
    "timm/efficientvit_b1.r224_in1k",
    "timm/resnet50.a1_in1k",
    "timm/efficientnet_b3.ra2_in1k",
    "timm/davit_tiny.msft_in1k",
    "timm/swin_tiny_patch4_window7_224.ms_in1k",
    "timm/maxvit_tiny_tf_224.in1k",
    "timm/efficientformerv2_l.snap_dist_in1k",
    "timm/convnextv2_base.fcmae_ft_in22k_in1k",
    "timm/davit_base.msft_in1k",
    "timm/maxvit_base_tf_224.in1k",
    "timm/swin_large_patch4_window7_224.ms_in22k_ft_in1k",
]
PAPER_BASES = [
    "timm/swin_large_patch4_window7_224.ms_in22k_ft_in1k",
    "timm/convnextv2_base.fcmae_ft_in22k_in1k",
    "timm/efficientnet_b3.ra2_in1k",
]
PAPER_DROPS = (0.01, 0.5, 1.0)
DRY_RUN_POOL = ["test_efficientnet", "test_resnet", "test_convnext", "test_vit"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", "-d", default="ILSVRC/imagenet-1k", help="Hub id or local folder (labelled).")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--bases", nargs="+", default=PAPER_BASES)
    parser.add_argument(
        "--pool", nargs="+", default=PAPER_POOL, help="Candidate savers (Hub ids, folders, zoo names)."
    )
    parser.add_argument("--batch-size", "-b", type=int, default=128)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--results-file", default="reproduce_paper.json")
    parser.add_argument("--dry-run", action="store_true", help="Tiny random timm models and data, offline.")
    return parser.parse_args(argv)


def tiny_pool_and_dataset(folder: Path) -> tuple[list[str], str]:
    """Saves tiny random timm classifiers and a small labelled image dataset, for an offline run of the code path."""
    import datasets
    import numpy as np
    import torch
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    names = []
    for index, architecture in enumerate(DRY_RUN_POOL):
        torch.manual_seed(index)
        model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=architecture, num_labels=10))
        with torch.no_grad():  # spread the random classifier so confidences differ between images
            model.timm_model.get_classifier().weight.normal_(0, 0.5)
        model.save_pretrained(folder / architecture)
        names.append(str(folder / architecture))
    rng = np.random.default_rng(0)
    images = [datasets.Image().encode_example(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(48)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    data = datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(48)]}, features=features)
    (folder / "data" / "data").mkdir(parents=True)
    data.to_parquet(str(folder / "data" / "data" / "validation-00000-of-00001.parquet"))
    return names, str(folder / "data")


def main(argv=None) -> dict:
    from hf_tinysaver.models.mac_counting import count_macs
    from hf_tinysaver.records import distributed_state
    from hf_tinysaver.workflows.cascade import load_model, write_json_atomic
    from hf_tinysaver.workflows.search import search_savers

    args = parse_args(argv)
    if args.dry_run:
        workdir = Path(tempfile.mkdtemp(prefix="reproduce-paper-"))
        args.pool, args.dataset = tiny_pool_and_dataset(workdir)
        args.split, args.batch_size = "validation", 16
        args.bases = [max(args.pool, key=lambda name: count_macs(load_model(name)))]
        args.cache_dir = args.cache_dir or str(workdir / "cache")

    state = distributed_state()
    macs = {name: count_macs(load_model(name)) for name in dict.fromkeys([*args.pool, *args.bases])}
    report = {"dataset": args.dataset, "split": args.split, "drops": list(PAPER_DROPS), "bases": {}}
    for base in args.bases:
        candidates = [name for name in args.pool if name != base and macs[name] < macs[base]]
        result = search_savers(
            base,
            candidates,
            args.dataset,
            args.split,
            max_drops=PAPER_DROPS,
            primary_max_drop=0.5,
            batch_size=args.batch_size,
            cache_dir=args.cache_dir,
        )
        paper_choice = result.paper_winner
        report["bases"][base] = {
            "paper_choice_by_delta_c": paper_choice.name if paper_choice else None,
            "our_choice": result.winner.name if result.winner else None,
            "search": result.to_dict(),
        }
        if state.is_main_process:
            print(f"\n== base {base} ({macs[base] / 1e9:.2f} GMACs, top-1 {100 * result.base_accuracy:.2f} %)")
            print(result.table())
            if paper_choice is not None:
                row = paper_choice.to_dict()
                trade_off = ", ".join(
                    f"{drop} pts: rel. MACs {row['relative_macs'][key]:.3f}"
                    for drop, key in zip(PAPER_DROPS, row["relative_macs"], strict=False)
                    if row["relative_macs"][key] is not None
                )
                print(f"paper's choice (lowest ΔC = {paper_choice.delta_c:+.3f}): {paper_choice.name}; {trade_off}")
    if state.is_main_process:
        write_json_atomic(args.results_file, report)
    return report


if __name__ == "__main__":
    main()
