"""Every registered architecture builds with random weights and pools to ``config.dim``."""

from __future__ import annotations

import pytest
import torch

from virtualst.embed.encoders import list_encoders, load_encoder

NAMES = [c.name for c in list_encoders()]
#: Shallow copies of the big ViTs keep the default run fast (same width/heads/registers/MLP).
SHALLOW = {"depth": 1}


CNNS = ("efficientnet_lite0", "resnet50")


def _overrides(name: str) -> dict:
    return {} if name in CNNS else SHALLOW


@pytest.mark.parametrize("name", NAMES)
def test_random_build_shape_finite_deterministic(name):
    enc = load_encoder(name, pretrained=False, arch_overrides=_overrides(name))
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert enc.provenance["weights"] == "random" and enc.provenance["sha256"] is None
    torch.manual_seed(0)
    size = 64 if name in CNNS else enc.input_size  # CNNs take any size: keep them cheap
    x = enc.preprocess(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8))
    with torch.no_grad():
        a, b = enc(x), enc(x)
    assert a.shape == (2, enc.config.dim) == (2, enc.dim)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_train_call_keeps_encoder_frozen_in_eval():
    enc = load_encoder("resnet50", pretrained=False)
    enc.train()
    assert not enc.training and not enc.trunk.training


def test_preprocess_normalises_uint8_with_config_stats():
    enc = load_encoder("hoptimus0", pretrained=False, arch_overrides=SHALLOW)
    img = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    out = enc.preprocess(img)
    expected = (1 - torch.tensor(enc.mean)) / torch.tensor(enc.std)
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_cls_plus_mean_excludes_registers():
    enc = load_encoder("virchow2", pretrained=False, arch_overrides=SHALLOW)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = enc.trunk(x)
        out = enc(x)
    assert enc.trunk.num_prefix_tokens == 5  # CLS + 4 registers
    torch.testing.assert_close(out[:, :1280], tokens[:, 0])
    torch.testing.assert_close(out[:, 1280:], tokens[:, 5:].mean(1))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_full_size_architecture_dim(name):
    enc = load_encoder(name, pretrained=False)
    with torch.no_grad():
        out = enc(torch.zeros(1, 3, enc.input_size, enc.input_size))
    assert out.shape == (1, enc.config.dim)


@pytest.mark.gpu
def test_autocast_precision_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    enc = load_encoder("uni_v1", pretrained=False, arch_overrides=SHALLOW).cuda()
    x = enc.preprocess(torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8).cuda())
    with torch.no_grad():
        half = enc(x)
        enc.precision = "fp32"
        full = enc(x)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, full, atol=5e-2, rtol=5e-2)
