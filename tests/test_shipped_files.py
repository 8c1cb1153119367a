"""The remote code of saved cascades, read from real saved folders: only torch, transformers, timm, numpy, the
standard library and each other; CIFAR-ResNet files only in cascades that hold a CIFAR ResNet; and a saved CIFAR
cascade that answers the same in a process without hf_tinysaver as with it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageClassification

from conftest import requires_shared
from hf_tinysaver import TinySaverForImageClassification
from hub_server import DEFAULT_TOKEN
from test_package_structure import SHIPPED_THIRD_PARTY
from tiny_models import timm_classifier

CIFAR_WEIGHTS = "models/cifar10-resnet"


def import_violations(folder: Path) -> list[str]:
    """What the `.py` files of a saved folder import beyond the standard library, `SHIPPED_THIRD_PARTY` and flat
    `from .sibling import` of files that lie in the folder; read with `ast`, imports inside functions included."""
    violations = []
    files = sorted(folder.glob("*.py"))
    siblings = {path.stem for path in files}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                written = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                written = [node.module]
            elif isinstance(node, ast.ImportFrom):
                if node.level != 1 or node.module is None or node.module not in siblings:
                    violations.append(
                        f"{path.name} line {node.lineno}: `from {'.' * node.level}{node.module or ''} import` is not "
                        "a sibling file of the folder"
                    )
                continue
            else:
                continue
            for name in written:
                top_level = name.split(".")[0]
                if top_level not in sys.stdlib_module_names and top_level not in SHIPPED_THIRD_PARTY:
                    violations.append(f"{path.name} line {node.lineno}: imports {name!r}")
    return violations


@pytest.fixture(scope="module")
def saved_timm_cascade(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("timm_cascade")
    cascade = TinySaverForImageClassification.from_saver_and_base(
        timm_classifier("test_efficientnet", seed=0),
        timm_classifier("test_resnet", seed=1),
        saver_preprocessing={"input_size": [3, 32, 32], "resize": "fixed"},
        base_preprocessing={"input_size": [3, 32, 32], "resize": "fixed"},
    )
    cascade.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved_cifar_cascade(tmp_path_factory) -> tuple[Path, TinySaverForImageClassification]:
    folder = tmp_path_factory.mktemp("cifar_cascade")
    cascade = TinySaverForImageClassification.from_saver_and_base("cifar10-resnet20", "cifar10-resnet56").eval()
    cascade.config.threshold = 0.95
    cascade.save_pretrained(folder)
    return folder, cascade


def test_a_timm_cascade_ships_only_standalone_files_and_no_cifar_ones(saved_timm_cascade):
    names = {path.name for path in saved_timm_cascade.glob("*.py")}
    assert {"configuration_tinysaver.py", "modeling_tinysaver.py", "mac_counting.py"} <= names
    assert not [name for name in sorted(saved_timm_cascade.iterdir()) if "cifar" in name.name.lower()]
    assert import_violations(saved_timm_cascade) == []


@requires_shared(CIFAR_WEIGHTS)
def test_a_cifar_cascade_ships_the_cifar_files_and_only_standalone_files(saved_cifar_cascade):
    folder, _ = saved_cifar_cascade
    names = {path.name for path in folder.glob("*.py")}
    assert {"configuration_cifar_resnet.py", "modeling_cifar_resnet.py", "modeling_tinysaver.py"} <= names
    assert import_violations(folder) == []


def test_the_check_sees_what_it_looks_for(tmp_path):
    (tmp_path / "modeling_x.py").write_text(
        "import os\nimport torch\nfrom .configuration_x import X\n\n"
        "def push():\n    from hf_tinysaver.hub import push\n    from ..zoo import ZOO\n    from .missing import y\n"
    )
    (tmp_path / "configuration_x.py").write_text("import requests\n")
    assert import_violations(tmp_path) == [
        "configuration_x.py line 1: imports 'requests'",
        "modeling_x.py line 6: imports 'hf_tinysaver.hub'",
        "modeling_x.py line 7: `from ..zoo import` is not a sibling file of the folder",
        "modeling_x.py line 8: `from .missing import` is not a sibling file of the folder",
    ]


# Loads the cascade, then saves it again (from the remote-code classes) and loads that copy too.
FRESH_PROCESS_SCRIPT = """
import os

import torch
from transformers import AutoModelForImageClassification

pixel_values = torch.load(sys.argv[2])
model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
model.save_pretrained("resaved")
resaved = AutoModelForImageClassification.from_pretrained("resaved", trust_remote_code=True).eval()
with torch.no_grad():
    outputs = model(pixel_values=pixel_values)
    resaved_outputs = resaved(pixel_values=pixel_values)
result = {
    "logits": outputs.logits,
    "exited": outputs.exited,
    "resaved_logits": resaved_outputs.logits,
    "resaved_files": sorted(os.listdir("resaved")),
    "module": type(model).__module__,
    "sub_modules": [type(model.saver).__module__, type(model.base).__module__],
    "hooks": [type(model).hub_publisher, type(model).model_resolver],
}
if len(sys.argv) > 3:  # push with the plain upload of transformers, the only one remote code has
    model.push_to_hub(sys.argv[3])
"""


@requires_shared(CIFAR_WEIGHTS)
def test_a_saved_cifar_cascade_answers_the_same_without_hf_tinysaver(
    saved_cifar_cascade, tmp_path, run_without_hf_tinysaver
):
    folder, cascade = saved_cifar_cascade
    pixel_values = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(pixel_values, tmp_path / "pixel_values.pt")
    without_library = run_without_hf_tinysaver(
        FRESH_PROCESS_SCRIPT, folder, tmp_path / "pixel_values.pt", cwd=tmp_path
    )
    assert all(module.startswith("transformers_modules.") for module in without_library["sub_modules"])
    assert without_library["hooks"] == [None, None]

    with_library = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(with_library) is TinySaverForImageClassification
    with torch.no_grad():
        expected = cascade(pixel_values=pixel_values)
        loaded = with_library(pixel_values=pixel_values)
    assert 0 < int(expected.exited.sum()) < len(pixel_values), "the check should cover both exits and base answers"
    for outputs in (loaded, without_library):
        assert torch.equal(outputs["logits"], expected.logits)
        assert torch.equal(outputs["exited"], expected.exited)
    assert torch.equal(without_library["resaved_logits"], expected.logits)
    assert {"configuration_cifar_resnet.py", "modeling_cifar_resnet.py"} <= set(without_library["resaved_files"])


@requires_shared(CIFAR_WEIGHTS)
def test_a_cifar_cascade_pushed_to_the_hub_loads_by_id_without_hf_tinysaver(
    saved_cifar_cascade, fake_hub, hub_env, tmp_path, run_without_hf_tinysaver
):
    folder, cascade = saved_cifar_cascade
    repo_id = "tester/cifar-cascade"
    cascade.push_to_hub(repo_id)
    pixel_values = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(pixel_values, tmp_path / "pixel_values.pt")
    env = {
        "HF_ENDPOINT": fake_hub.endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": DEFAULT_TOKEN,
    }
    plain_repo_id = "tester/cifar-cascade-plain-push"
    result = run_without_hf_tinysaver(
        FRESH_PROCESS_SCRIPT, repo_id, tmp_path / "pixel_values.pt", plain_repo_id, cwd=tmp_path, env=env
    )
    assert all(module.startswith("transformers_modules.") for module in result["sub_modules"])
    with torch.no_grad():
        expected = cascade(pixel_values=pixel_values)
    assert torch.equal(result["logits"], expected.logits) and torch.equal(result["exited"], expected.exited)
    plain_push = fake_hub.commits(plain_repo_id)[0]
    assert {"config.json", "model.safetensors", "configuration_cifar_resnet.py", "modeling_cifar_resnet.py"} <= set(
        plain_push.files
    )
    assert not any(name.endswith(".png") for name in plain_push.files), "no trade-off plot without hf_tinysaver"
