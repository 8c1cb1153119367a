"""Renders the sample model card of a CIFAR-10 cascade (ResNet-20 saver -> ResNet-56 base) from a calibration record.

The record is the dict a calibration writes into `TinySaverConfig.calibration` (`objective`, `threshold`,
`exit_rate`, `accuracy`, `base_accuracy`, `saver_accuracy`, `relative_macs`, `n`, `dataset`, `split`, ...). Pass
either that record as JSON or a calibrated cascade folder (its `config.json` carries the record):

    python model_cards/examples/make_example_card.py model_cards/examples/cifar10_resnet20_resnet56.calibration.json
    python model_cards/examples/make_example_card.py path/to/calibrated-cascade/

Run it from the repository root, so that the record's `dataset` path (`../shared/datasets/cifar10-jpeg`) resolves
and the card can name the dataset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_tinysaver import CifarResNetConfig, TinySaverConfig
from hf_tinysaver.hub.model_card import generate_model_card, save_model_card

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


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="calibration record (JSON) or calibrated cascade folder")
    parser.add_argument("--output", type=Path, default=EXAMPLES / "cifar10_resnet20_resnet56.md")
    parser.add_argument("--repo-id", default="hf-tinysaver/cifar10-resnet20-resnet56", help="repo named in the card")
    parser.add_argument("--saver-depth", type=int, default=20)
    parser.add_argument("--base-depth", type=int, default=56)
    # The pretrained CIFAR ResNet weights (../shared/models/cifar10-resnet) are BSD-2-Clause licensed.
    parser.add_argument("--saver-license", default="bsd-2-clause")
    parser.add_argument("--base-license", default="bsd-2-clause")
    args = parser.parse_args(argv)

    config = cascade_config(args.source, args.saver_depth, args.base_depth)
    card = generate_model_card(
        config, model_id=args.repo_id, saver_license=args.saver_license, base_license=args.base_license
    )
    return save_model_card(card, args.output)


if __name__ == "__main__":
    print(main())
