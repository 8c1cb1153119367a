"""Renders the sample model card of a CIFAR-10 cascade (ResNet-20 saver -> ResNet-56 base) from a calibration record.

The record is the `calibration.json` a calibration writes (the dict in `TinySaverConfig.calibration`: `objective`,
`threshold`, `exit_rate`, `accuracy`, `base_accuracy`, `relative_macs`, `n`, `dataset`, `split`, `saver`, `base`,
`provenance`, ...), here with the sub-models' `saver_macs` and `base_macs` from the cascade's `config.json` added.
The held-out results are the `evaluation.json` of `tinysaver evaluate --save-to-folder`, found beside the record
(`<name>.evaluation.json`) or in the folder. Pass either the record as JSON or a calibrated cascade folder:

    python model_cards/examples/make_example_card.py model_cards/examples/cifar10_resnet20_resnet56.calibration.json
    python model_cards/examples/make_example_card.py path/to/calibrated-cascade/

The sample files come from these commands (2 CPU threads of a machine shared with other jobs, so its throughput is
far below what the hardware gives alone; the assets in `../shared`):

    tinysaver calibrate --saver cifar10-resnet20 --base cifar10-resnet56 --dataset cifar10 --split 'test[:50%]' \
        --objective max-drop --max-drop 0.5 --out cascade
    tinysaver evaluate --model cascade --dataset cifar10 --split 'test[50%:]' --save-to-folder

The sub-models are zoo models, so the card takes their licenses, notices and sources from the zoo.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_tinysaver import CifarResNetConfig, TinySaverConfig
from hf_tinysaver.hub.model_card import generate_model_card, save_model_card
from hf_tinysaver.storage import EVALUATION_FILE

EXAMPLES = Path(__file__).resolve().parent


def cascade_config(source: Path, saver_depth: int, base_depth: int) -> TinySaverConfig:
    """The config of a calibrated cascade folder, or a CIFAR ResNet cascade config built around a record."""
    if source.is_dir() or source.name == "config.json":
        return TinySaverConfig.from_pretrained(source if source.is_dir() else source.parent)
    record = json.loads(source.read_text())
    return TinySaverConfig(
        saver_config=CifarResNetConfig(depth=saver_depth),
        base_config=CifarResNetConfig(depth=base_depth),
        threshold=record["threshold"],
        saver_macs=record.get("saver_macs"),
        base_macs=record.get("base_macs"),
        calibration=record,
    )


def evaluation_for(source: Path) -> dict:
    """The held-out results beside the record (`<name>.evaluation.json`) or in the folder, `{}` when there are none."""
    if source.is_dir() or source.name == "config.json":
        path = (source if source.is_dir() else source.parent) / EVALUATION_FILE
    else:
        path = source.with_name(source.name.replace(".calibration.json", ".evaluation.json"))
    return json.loads(path.read_text()) if path != source and path.is_file() else {}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="calibration record (JSON) or calibrated cascade folder")
    parser.add_argument("--output", type=Path, default=EXAMPLES / "cifar10_resnet20_resnet56.md")
    parser.add_argument("--repo-id", default="hf-tinysaver/cifar10-resnet20-resnet56", help="repo named in the card")
    parser.add_argument("--saver-depth", type=int, default=20)
    parser.add_argument("--base-depth", type=int, default=56)
    # Zoo sub-models bring their licenses (BSD-2-Clause for the CIFAR ResNets); these override them.
    parser.add_argument("--saver-license", default=None)
    parser.add_argument("--base-license", default=None)
    args = parser.parse_args(argv)

    config = cascade_config(args.source, args.saver_depth, args.base_depth)
    card = generate_model_card(
        config,
        model_id=args.repo_id,
        saver_license=args.saver_license,
        base_license=args.base_license,
        evaluation=evaluation_for(args.source),
        lookup_licenses=False,
    )
    return save_model_card(card, args.output)


if __name__ == "__main__":
    print(main())
