"""Shared fixtures: offline Hub, tiny random classifiers, real-asset locations."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYSAVER_ASSETS", REPO_ROOT.parent / "shared"))


# Wrapped around every script `run_without_hf_tinysaver` runs. A finder placed first on `sys.meta_path` answers every
# `hf_tinysaver` import with ModuleNotFoundError, as on a machine where only transformers is installed, whichever way
# the library is installed (a path in a .pth or PYTHONPATH, an editable finder, site-packages).
FRESH_PROCESS_PRELUDE = """import importlib.abc
import sys


class BlockHfTinySaver(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_tinysaver" or name.startswith("hf_tinysaver."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden in this process)", name=name)


sys.meta_path.insert(0, BlockHfTinySaver())
OUTPUT_PATH = sys.argv.pop()
"""
FRESH_PROCESS_EPILOGUE = """
import torch

leaked = sorted(name for name in sys.modules if name == "hf_tinysaver" or name.startswith("hf_tinysaver."))
if leaked:
    raise SystemExit(f"hf_tinysaver modules were imported in the fresh process: {leaked}")
torch.save(result, OUTPUT_PATH)
"""


def fresh_process_environment(hf_home: Path, **overrides: str) -> dict[str, str]:
    """This process's environment without PYTHONPATH or any Hugging Face setting, offline, with its own `HF_HOME`."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key != "PYTHONPATH" and not key.startswith(("HF_", "HUGGING"))
    }
    environment.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    environment.update(overrides)
    return environment


@pytest.fixture(scope="session")
def run_without_hf_tinysaver():
    """Runs a script in a new Python process where `hf_tinysaver` cannot be imported and returns its `result`.

    The script gets its arguments in `sys.argv[1:]` and must end with a dict named `result` that holds, under
    `"module"`, the `__module__` of the model class it loaded; the call checks that this class came from remote code
    (`transformers_modules...`) and that no `hf_tinysaver` module was imported. `HF_HOME` is `cwd / "hf_home"`, so two
    runs in one `cwd` share the Hub cache; `env` overrides the offline environment of `fresh_process_environment`.
    """

    def run(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> dict:
        script_path = cwd / "fresh_process.py"
        script_path.write_text(FRESH_PROCESS_PRELUDE + textwrap.dedent(script) + FRESH_PROCESS_EPILOGUE)
        output_path = cwd / "fresh_process_result.pt"
        output_path.unlink(missing_ok=True)
        completed = subprocess.run(
            [sys.executable, str(script_path), *map(str, args), str(output_path)],
            env=fresh_process_environment(cwd / "hf_home", **(env or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        result = torch.load(output_path, weights_only=False)
        assert result["module"].startswith("transformers_modules."), result["module"]
        return result

    return run


def requires_shared(*relative_paths: str):
    """Skips a test (with the reason) when the real assets in ../shared are absent."""
    missing = [p for p in relative_paths if not (SHARED / p).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"real assets missing under {SHARED}: {missing}")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


def random_images(count: int, sizes=((40, 50), (64, 48), (33, 33)), seed: int = 0) -> list[Image.Image]:
    """RGB PIL images of varied sizes and content, deterministic for a seed."""
    rng = np.random.RandomState(seed)
    images = []
    for index in range(count):
        height, width = sizes[index % len(sizes)]
        images.append(Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8)))
    return images


@pytest.fixture
def images() -> list[Image.Image]:
    return random_images(8)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A 40-image labelled image dataset saved as a local Hub-style parquet folder."""
    folder = tmp_path_factory.mktemp("tiny_dataset")
    images = random_images(40, sizes=((36, 36), (48, 40)), seed=3)
    labels = [i % 10 for i in range(40)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    dataset = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    (folder / "data").mkdir()
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def tiny_vit_cascade(threshold: float = 0.6, **config_kwargs):
    """A random cascade of a tiny timm EfficientNet saver and a tiny ViT base (32 px), ready in well under a second."""
    from hf_tinysaver import TinySaverForImageClassification
    from tiny_models import timm_classifier, tiny_vit, tiny_vit_preprocessing

    return TinySaverForImageClassification.from_saver_and_base(
        timm_classifier("test_efficientnet"),
        tiny_vit(32),
        threshold=threshold,
        base_preprocessing=tiny_vit_preprocessing(32),
        **config_kwargs,
    )


@pytest.fixture(scope="session")
def tiny_cascade_dir(tmp_path_factory, tiny_dataset):
    from hf_tinysaver import TinySaverForImageClassification
    from tiny_models import timm_classifier

    folder = tmp_path_factory.mktemp("tiny_cascade")
    cascade = TinySaverForImageClassification.from_saver_and_base(
        timm_classifier("test_efficientnet", seed=0),
        timm_classifier("test_resnet", seed=1),
        saver_preprocessing={"input_size": [3, 32, 32], "resize": "fixed"},
        base_preprocessing={"input_size": [3, 48, 48], "resize": "shortest_edge", "mean": [0.5] * 3, "std": [0.5] * 3},
    )
    images = datasets.load_dataset(str(tiny_dataset), split="train")["image"]
    with torch.no_grad():
        confidence = cascade(**cascade.get_image_processor()(images=images), threshold=0.0).saver_confidence
    cascade.config.threshold = float(confidence.median())  # about half of the images exit
    cascade.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """A local server speaking the Hub's HTTP API on 127.0.0.1, one per test module."""
    from hub_server import FakeHub

    with FakeHub(tmp_path_factory.mktemp("fake_hub")) as hub:
        yield hub


@pytest.fixture(scope="module")
def hub_env(fake_hub, tmp_path_factory):
    """The real huggingface_hub client pointed at `fake_hub`, logged in with its token."""
    from hub_server import DEFAULT_TOKEN

    with fake_hub.client_environment(tmp_path_factory.mktemp("hf_home"), token=DEFAULT_TOKEN) as environment:
        yield environment


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): tiny models
    gain nothing from threads, and on a loaded CI machine OpenMP's spinning makes a 2-thread forward pass up to ~50x
    slower than a 1-thread one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
