"""Shared fixtures: offline Hub, tiny random classifiers, real-asset locations."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYSAVER_ASSETS", REPO_ROOT.parent / "shared"))


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
