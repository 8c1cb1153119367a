"""MAC counting: published figures for timm models, attention on CPU, every kind of model."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, ViTConfig, ViTForImageClassification

from hf_tinysaver.models.mac_counting import count_macs, infer_input_size, macs_summary


@pytest.mark.parametrize(
    ("architecture", "published_gmacs"),
    [("resnet18", 1.82), ("vit_tiny_patch16_224", 1.26)],
)
def test_timm_models_match_published_macs(architecture, published_gmacs):
    model = timm.create_model(architecture, pretrained=False)
    macs = count_macs(model, input_size=(3, 224, 224))
    assert macs == pytest.approx(published_gmacs * 1e9, rel=0.03)


def test_plain_module_exact_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    conv = 8 * 8 * 8 * (3 * 3 * 3)  # output positions x channels x (kernel area x input channels)
    linear = 8 * 8 * 8 * 10
    assert count_macs(model, input_size=(3, 8, 8)) == conv + linear


def tiny_vit(attn_implementation: str) -> ViTForImageClassification:
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
        attn_implementation=attn_implementation,
    )
    return ViTForImageClassification(config)


def test_fused_cpu_attention_is_counted_like_explicit_matmuls():
    # Eager attention runs two visible matmuls; SDPA on CPU runs one fused kernel that torch alone does not count.
    eager, fused = tiny_vit("eager"), tiny_vit("sdpa")
    assert fused.config._attn_implementation == "sdpa"
    tokens, hidden, layers = (32 // 8) ** 2 + 1, 32, 2
    attention_macs = layers * 2 * tokens * tokens * hidden  # q @ k^T and attn @ v
    assert count_macs(fused) == count_macs(eager)
    fused.config._attn_implementation = "eager"
    without_attention = count_macs(fused) - attention_macs
    assert without_attention > 0
    assert count_macs(eager) - without_attention == attention_macs


def test_timm_wrapper_counts_like_the_timm_model():
    wrapper = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet18", num_labels=1000))
    plain = timm.create_model("resnet18", pretrained=False)
    assert count_macs(wrapper) == count_macs(plain, input_size=(3, 224, 224))


def test_input_size_inference_and_mode_restored():
    vit = tiny_vit("sdpa").train()
    assert infer_input_size(vit) == (3, 32, 32)
    count_macs(vit)
    assert vit.training
    vit.config.preprocessing = {"input_size": [3, 16, 16]}
    assert infer_input_size(vit) == (3, 16, 16)
    assert infer_input_size(timm.create_model("resnet18", pretrained=False)) == (3, 224, 224)
    with pytest.raises(ValueError, match="input_size="):
        count_macs(nn.Linear(3, 3))


def test_counts_in_the_model_dtype():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten()).to(torch.float64)
    assert count_macs(model, input_size=(3, 2, 2)) == 2 * 2 * 4 * 3


def test_macs_summary():
    assert macs_summary(40_551_040) == "40.6 M"
    assert macs_summary(1_814_073_344) == "1.81 G"
