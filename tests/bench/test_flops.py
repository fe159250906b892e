"""FLOP counts of encoders and accelerator peaks."""

from __future__ import annotations

import pytest

from virtualst.bench.flops import flops_per_tile, measured_matmul_tflops, vendor_bf16_peak_tflops
from virtualst.embed.encoders import load_encoder


def vit_flops(tokens: int, patches: int, dim: int, depth: int, patch: int, mlp_ratio: float = 4.0) -> float:
    """Hand count for a standard ViT: patch embedding, then per block qkv, scores, attention x V, projection, MLP."""
    embed = 2 * patches * (3 * patch * patch) * dim
    block = (
        2 * tokens * dim * 3 * dim  # qkv
        + 2 * 2 * tokens * tokens * dim  # QK^T and attention x V
        + 2 * tokens * dim * dim  # output projection
        + 2 * 2 * tokens * dim * int(mlp_ratio * dim)  # two MLP layers
    )
    return embed + depth * block


def test_vit_count_matches_hand_count():
    encoder = load_encoder("uni_v1", pretrained=False, arch_overrides={"depth": 2})  # ViT-L/16 width, 2 blocks
    assert flops_per_tile(encoder) == pytest.approx(vit_flops(197, 196, 1024, 2, 16), rel=1e-6)


def test_convolutional_count_is_plausible():
    """EfficientNet-Lite0 is ~0.39 G multiply-adds at 224 px (its paper)."""
    assert flops_per_tile(load_encoder("efficientnet_lite0")) == pytest.approx(2 * 0.385e9, rel=0.02)


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
     ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0), ("Tesla T4", None)],
)
def test_vendor_peak_lookup(name, peak):
    assert vendor_bf16_peak_tflops(name) == peak


def test_measured_matmul_rate_is_positive_on_cpu():
    assert measured_matmul_tflops("cpu", n=128, repeats=2) > 0
