"""Model cards: structure of the rendered card (regex), front matter, omitted sections, licenses and the sample."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from transformers import ViTConfig

from hf_tinysaver import CifarResNetConfig, TinySaverConfig
from hf_tinysaver.hub.model_card import (
    TEMPLATE_PATH,
    TinySaverModelCardData,
    generate_model_card,
    hub_dataset_id,
    hub_model_id,
    save_model_card,
    stricter_license,
)
from hub_server import validate_model_card_metadata

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "model_cards" / "examples"
SAMPLE_RECORD = EXAMPLES / "cifar10_resnet20_resnet56.calibration.json"
SAMPLE_EVALUATION = EXAMPLES / "cifar10_resnet20_resnet56.evaluation.json"
SAMPLE_CARD = EXAMPLES / "cifar10_resnet20_resnet56.md"

NUMBER = r"[\d.]+"
CARD_PATTERN = re.compile(
    r"""---
license: bsd-2-clause
library_name: transformers
pipeline_tag: image-classification
tags:
- tinysaver
- custom_code
- image-classification
- early-exit
metrics:
- accuracy
model-index:
- name: 'TinySaver: cifar10-resnet20 -> cifar10-resnet56 on CIFAR-10 \(JPEG copy\)'
  results:
  - task:
      type: image-classification
      name: Image Classification
    dataset:
      name: CIFAR-10 \(JPEG copy\)
      type: cifar10-jpeg
      split: test\[50%:\]
    metrics:
    - type: accuracy
      value: NUMBER
      name: Accuracy of the cascade \(held-out\)
    - type: accuracy
      value: NUMBER
      name: Accuracy of the base model alone \(held-out\)
    - type: accuracy_drop
      value: NUMBER
      name: Accuracy drop vs. the base model \(points\)
    - type: exit_rate
      value: NUMBER
      name: Exit rate \(images answered by the saver\)
    - type: relative_macs
      value: NUMBER
      name: Relative MACs \(cascade / base model\)
    - type: throughput
      value: NUMBER
      name: Images per second of the cascade
      args:
        hardware: .+, \d+ threads
---

# TinySaver: cifar10-resnet20 -> cifar10-resnet56 on CIFAR-10 \(JPEG copy\)

This is a \[TinySaver\]\(https://arxiv\.org/abs/2403\.17726\) cascade for image classification, calibrated on a local copy of CIFAR-10 \(JPEG copy\) \(folder `cifar10-jpeg`\)\. .+ \(\[`cifar10-resnet20`\]\(https://github\.com/akamaster/pytorch_resnet_cifar10\)\) .+ \(\[`cifar10-resnet56`\]\(https://github\.com/akamaster/pytorch_resnet_cifar10\)\), .+

## Model Details

- \*\*Model type:\*\* TinySaver cascade .+
- \*\*Saver:\*\* \[`cifar10-resnet20`\]\(https://github\.com/akamaster/pytorch_resnet_cifar10\), NUMBER MMACs per image, license `bsd-2-clause`
- \*\*Base model:\*\* \[`cifar10-resnet56`\]\(https://github\.com/akamaster/pytorch_resnet_cifar10\), NUMBER MMACs per image, license `bsd-2-clause`
- \*\*Exit rule:\*\* the saver answers when its `max_prob` confidence is greater than NUMBER
- \*\*Saver cost relative to the base model:\*\* NUMBER .+
- \*\*Number of classes:\*\* 10
- \*\*License:\*\* `bsd-2-clause` \(the stricter of the two models' licenses\)

## Usage

.+

```python
from PIL import Image
from transformers import pipeline

classifier = pipeline\("image-classification", model="hf-tinysaver/cifar10-resnet20-resnet56", trust_remote_code=True\)
(.+\n)+```

.+

```python
(.*\n)+?```

## Calibration

.+

\| Calibration \| Value \|
\|:--\|--:\|
\| Objective \| `max-drop` \(allowed accuracy drop: 0\.5 points\) \|
\| Threshold \(exit when confidence > threshold\) \| NUMBER \|
\| Exit rate \(images answered by the saver\) \| NUMBER % \|
\| Accuracy of the cascade \| NUMBER % \|
\| Accuracy of the base model alone \| NUMBER % \|
\| Accuracy change vs\. the base model \| [-+]NUMBER points \|
\| Accuracy of the saver alone \| NUMBER % \|
\| Agreement with the base model's predictions \| NUMBER % \|
\| Relative MACs \(cascade / base model\) \| NUMBER \([-+]NUMBER %\) \|
\| Calibration images \| 5,000 \|
\| Dataset \| a local copy of CIFAR-10 \(JPEG copy\) \(folder `cifar10-jpeg`\) \|
\| Split \| `test\[:50%\]` \|

## Evaluation

The real cascade \(not a simulation\) was run with `tinysaver evaluate` on the images below, which were not used to choose the threshold; .+

\| Held-out evaluation \| Value \|
\|:--\|--:\|
\| Accuracy of the cascade \| NUMBER % \|
\| Accuracy of the base model alone \| NUMBER % \|
\| Accuracy drop vs\. the base model \| -?NUMBER points \|
\| Accuracy of the saver alone \| NUMBER % \|
\| Exit rate \(images answered by the saver\) \| NUMBER % \|
\| Relative MACs \(cascade / base model\) \| NUMBER \([-+]NUMBER %\) \|
\| Throughput of the cascade \| NUMBER images/s on .+, \d+ threads, batch size \d+ \|
\| Threshold evaluated \| NUMBER \|
\| Evaluation images \| 5,000 \|
\| Dataset \| a local copy of CIFAR-10 \(JPEG copy\) \(folder `cifar10-jpeg`\) \|
\| Split \| `test\[50%:\]` \|
\| Command \| `tinysaver evaluate .+ --save-to-folder.*` \|

## Limitations

- The cascade predicts only the 10 classes its two models share; .+
- The threshold was calibrated on the split `test\[:50%\]` of a local copy of CIFAR-10 .+ Recalibrate on your own data \(`tinysaver calibrate`\)\.
- No statistical guarantee was asked for: .+
- Speed was measured on .+, \d+ threads; .+

## Licenses and Notices

The cascade is distributed under `bsd-2-clause`, the stricter of its sub-models' licenses\.

- \*\*Saver\*\* \(`cifar10-resnet20`\), license `bsd-2-clause`, source: https://github\.com/akamaster/pytorch_resnet_cifar10

  > Copyright \(c\) 2018, Yerlan Idelbayev\. Redistribution and use in source and binary forms, .+

- \*\*Base model\*\* \(`cifar10-resnet56`\), license `bsd-2-clause`, source: https://github\.com/akamaster/pytorch_resnet_cifar10

  > Copyright \(c\) 2018, Yerlan Idelbayev\. Redistribution and use in source and binary forms, .+

## Framework Versions

- Python: NUMBER
- hf_tinysaver: NUMBER
- Transformers: \S+
- PyTorch: \S+
- huggingface_hub: \S+
(- \S+: \S+\n)*
## Citation

```bibtex
@article\{wang2024tinysaver,
  title   = \{Tiny Models are the Computational Saver for Large Models\},
(.+\n)+\}
```""".replace("NUMBER", NUMBER)
)


def load_example_script():
    spec = importlib.util.spec_from_file_location("make_example_card", EXAMPLES / "make_example_card.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sample_card(tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(REPO_ROOT)  # the record names its dataset relative to the repository root
    output = load_example_script().main([str(SAMPLE_RECORD), "--output", str(tmp_path / "card.md")])
    return output.read_text(encoding="utf-8")


def strip_versions(card: str) -> str:
    return re.sub(r"## Framework Versions\n(.|\n)*?\n## ", "## ", card)


def test_rendered_sample_card_structure(sample_card):
    assert CARD_PATTERN.fullmatch(sample_card), sample_card


def test_committed_sample_is_what_the_script_renders(sample_card):
    # Library versions depend on the machine that rendered the card; everything else must match exactly.
    committed = SAMPLE_CARD.read_text(encoding="utf-8")
    assert CARD_PATTERN.fullmatch(committed)
    assert strip_versions(committed) == strip_versions(sample_card), "regenerate with make_example_card.py"


def test_card_numbers_come_from_the_record(sample_card):
    record = json.loads(SAMPLE_RECORD.read_text())
    evaluation = json.loads(SAMPLE_EVALUATION.read_text())
    metadata = ModelCard(sample_card).data
    # The model-index holds the held-out evaluation, not the in-sample calibration accuracy.
    assert metadata.eval_results[0].metric_value == evaluation["accuracy"]
    assert metadata.eval_results[0].dataset_split == evaluation["split"] != record["split"]
    assert f"| Accuracy of the cascade | {100 * evaluation['accuracy']:.2f} % |" in sample_card
    assert f"| Exit rate (images answered by the saver) | {100 * evaluation['exit_rate']:.1f} % |" in sample_card
    assert evaluation["provenance"]["hardware"] in sample_card
    assert f"| Accuracy of the cascade | {100 * record['accuracy']:.2f} % |" in sample_card
    assert f"| Exit rate (images answered by the saver) | {100 * record['exit_rate']:.1f} % |" in sample_card
    assert f"| Relative MACs (cascade / base model) | {record['relative_macs']:.3f} " in sample_card
    drop = 100 * (record["accuracy"] - record["base_accuracy"])
    assert f"| Accuracy change vs. the base model | {drop:+.2f} points |" in sample_card


def test_front_matter_passes_the_hubs_checks(sample_card):
    metadata = yaml.safe_load(re.match(r"---\n(.*?)\n---\n", sample_card, flags=re.S).group(1))
    assert validate_model_card_metadata(metadata) == []
    assert set(metadata) == {"license", "library_name", "pipeline_tag", "tags", "metrics", "model-index"}


def full_config(**calibration) -> TinySaverConfig:
    saver, base = ViTConfig(num_labels=10), ViTConfig(num_labels=10)
    saver._name_or_path, base._name_or_path = "someone/tiny-vit", "google/vit-base-patch16-224"
    record = {"objective": "max-drop", "threshold": 0.9, "accuracy": 0.8, "base_accuracy": 0.81, **calibration}
    return TinySaverConfig(saver_config=saver, base_config=base, threshold=0.9, calibration=record)


def test_hub_ids_become_base_model_and_datasets():
    card = generate_model_card(
        full_config(dataset="uoft-cs/cifar10", split="test"), model_id="me/cascade", lookup_licenses=False
    )
    assert card.data.base_model == ["someone/tiny-vit", "google/vit-base-patch16-224"]
    assert card.data.datasets == ["uoft-cs/cifar10"]
    assert card.data.eval_results[0].dataset_type == "uoft-cs/cifar10"
    assert "[uoft-cs/cifar10](https://huggingface.co/datasets/uoft-cs/cifar10)" in card.text


def test_sections_without_data_are_left_out():
    config = TinySaverConfig(saver_config=ViTConfig(num_labels=3), base_config=ViTConfig(num_labels=3))
    card = str(generate_model_card(config))
    assert "## Model Details" in card and "## Citation" in card and "## Framework Versions" in card
    for absent in ("## Usage", "## Calibration", "Accuracy", "MACs", "License", "None", "{{", "{%", "![", "()"):
        assert absent not in card, absent
    metadata = ModelCard(card).data.to_dict()
    assert set(metadata) == {"library_name", "pipeline_tag", "tags"}


def test_calibration_rows_only_for_recorded_values():
    card = str(generate_model_card(full_config(), model_id="me/cascade", lookup_licenses=False))
    assert "| Accuracy change vs. the base model | -1.00 points |" in card
    for absent in ("| Exit rate", "| Relative MACs", "| Calibration images", "| Split", "allowed accuracy drop"):
        assert absent not in card, absent


def test_deployed_threshold_that_differs_from_the_calibrated_one_is_flagged():
    config = full_config()
    config.threshold = 0.95
    card = str(generate_model_card(config, lookup_licenses=False))
    assert "the deployed threshold (0.95) differs from the calibrated one (0.9)" in card


@pytest.mark.parametrize(
    ("licenses", "expected"),
    [
        (("mit", "apache-2.0"), "apache-2.0"),
        (("apache-2.0", "cc-by-nc-4.0"), "cc-by-nc-4.0"),
        (("gpl-3.0", "bsd-3-clause"), "gpl-3.0"),
        (("MIT", None), "mit"),
        (("mit", "some-custom-license"), "some-custom-license"),
        ((None, None), None),
    ],
)
def test_stricter_license(licenses, expected):
    assert stricter_license(*licenses) == expected


def test_card_license_is_the_stricter_one_unless_given():
    config = full_config()
    data = TinySaverModelCardData.from_config(config, saver_license="mit", base_license="cc-by-nc-4.0")
    assert data.license == "cc-by-nc-4.0"
    data = TinySaverModelCardData.from_config(config, saver_license="mit", license="apache-2.0")
    assert data.license == "apache-2.0"


def test_hub_ids_are_told_from_local_paths(tmp_path):
    assert hub_model_id("google/vit-base-patch16-224") == "google/vit-base-patch16-224"
    assert hub_model_id("resnet20") is None and hub_model_id("./out/model") is None
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_model_id(str(tmp_path / "org" / "name")) is None
    assert hub_dataset_id("cifar10") == "cifar10" and hub_dataset_id("../shared/datasets/cifar10-jpeg") is None


def test_card_data_rejects_unknown_fields_and_bad_repo_ids():
    with pytest.raises(TypeError, match="Unknown model card fields"):
        TinySaverModelCardData.from_config(full_config(), colour="blue")
    with pytest.raises(ValueError, match="namespace/name"):
        TinySaverModelCardData(model_id="no-namespace")


def test_save_model_card_writes_the_card(tmp_path):
    card = generate_model_card(TinySaverConfig(saver_config=CifarResNetConfig(), base_config=CifarResNetConfig()))
    path = save_model_card(card, tmp_path / "cards" / "README.md")
    assert path.read_text(encoding="utf-8") == str(card)
    assert [p.name for p in path.parent.iterdir()] == ["README.md"]


def test_template_ships_inside_the_package():
    import hf_tinysaver

    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    package_root = Path(hf_tinysaver.__file__).parent
    assert TEMPLATE_PATH.is_file() and TEMPLATE_PATH.is_relative_to(package_root)
    # The wheel carries it only when a package-data pattern of pyproject.toml matches its path in the package.
    patterns = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    relative = TEMPLATE_PATH.relative_to(package_root).as_posix()
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns["hf_tinysaver"]), (relative, patterns)


def test_local_and_zoo_data_are_named_as_local_copies_never_as_hub_ids(tmp_path):
    folder = tmp_path / "my-cifar"
    folder.mkdir()
    for dataset, name in ((str(folder), "my-cifar"), ("cifar10", "CIFAR-10 (JPEG copy)")):
        card = generate_model_card(full_config(dataset=dataset, split="test"), lookup_licenses=False)
        assert card.data.datasets is None and "datasets:" not in str(card)
        assert f"a local copy of {name}" in card.text
        assert card.data.eval_results[0].dataset_type in ("my-cifar", "cifar10-jpeg")
    hub = generate_model_card(full_config(dataset="uoft-cs/cifar10", split="test"), lookup_licenses=False)
    assert hub.data.datasets == ["uoft-cs/cifar10"] and "local copy" not in hub.text


def test_repeated_tags_are_listed_once():
    data = TinySaverModelCardData(tags=["tinysaver", "early-exit", "tinysaver", "cifar10", "early-exit"])
    assert data.tags == ["tinysaver", "early-exit", "cifar10"]
    assert ModelCard(str(generate_model_card(full_config(), card_data=data))).data.tags == data.tags


def test_different_licenses_are_both_named_and_the_stricter_one_is_the_cards():
    card = generate_model_card(full_config(), saver_license="mit", base_license="apache-2.0", lookup_licenses=False)
    assert card.data.license == "apache-2.0"
    assert "(`mit` and `apache-2.0`: each model's own terms still apply to its weights)" in card.text
    assert "[someone/tiny-vit](https://huggingface.co/someone/tiny-vit)" in card.text


def test_limitations_say_what_the_certificate_covers():
    certificate = {"method": "discordant-binomial", "target": 0.5, "level": 0.95, "n": 5000, "bound": 0.41}
    card = str(generate_model_card(full_config(certificate=certificate, split="test"), lookup_licenses=False))
    limitations = card.split("## Limitations", 1)[1].split("\n## ", 1)[0]
    assert "The certificate bounds the accuracy drop against the base model at 0.410 points" in limitations
    assert "exchangeable" in limitations and "No held-out evaluation is recorded" in limitations


def test_evaluation_on_the_calibration_split_is_not_called_held_out():
    config = full_config(dataset="uoft-cs/cifar10", split="test[:50%]")
    evaluation = {"accuracy": 0.8, "base_accuracy": 0.81, "dataset": "uoft-cs/cifar10", "split": "test[:50%]"}
    card = generate_model_card(config, evaluation=evaluation, lookup_licenses=False)
    assert "not used to choose the threshold" not in card.text
    assert "ran on the calibration split itself, so it is not held out" in card.text
    assert card.data.eval_results[0].metric_name == "Accuracy of the cascade (on the calibration images)"


def test_recorded_origin_keeps_a_missing_local_path_from_becoming_a_hub_id():
    # `data/my-cifar` reads like a Hub id, but the calibration recorded it as a local folder (not on this machine).
    card = generate_model_card(
        full_config(dataset="data/my-cifar", dataset_origin="local", split="test"), lookup_licenses=False
    )
    assert card.data.datasets is None and "a local copy of my-cifar" in card.text
    evaluation = {"accuracy": 0.8, "dataset": "data/my-cifar", "dataset_origin": "local", "split": "test[1:]"}
    card = generate_model_card(full_config(), evaluation=evaluation, lookup_licenses=False)
    assert card.data.datasets is None and card.data.eval_results[0].dataset_type == "my-cifar"
