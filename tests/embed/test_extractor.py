"""The forward pass around an encoder: out-of-memory back-off and torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from virtualst.embed.extractor import FeatureExtractor
from virtualst.embed.runner import EmbedSettings, make_extractor
from virtualst.errors import EncoderError


@pytest.fixture(scope="module")
def encoder():
    from virtualst.embed.encoders import load_encoder

    return load_encoder("efficientnet_lite0")


@pytest.fixture
def tiles():
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 255, size=(10, 64, 64, 3), dtype=np.uint8))


def _fails_above(extractor: FeatureExtractor, limit: int) -> list[int]:
    """Make the extractor's forward pass run out of memory above ``limit`` tiles; returns the batch sizes tried."""
    tried: list[int] = []
    forward = extractor.forward

    def limited(x):
        tried.append(len(x))
        if len(x) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(x)

    extractor.forward = limited
    return tried


def test_out_of_memory_halves_the_batch_and_keeps_every_feature(encoder, tiles, caplog):
    expected = FeatureExtractor(encoder, torch.device("cpu"))(tiles)
    extractor = FeatureExtractor(encoder, torch.device("cpu"))
    tried = _fails_above(extractor, limit=3)
    features = extractor(tiles)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)
    assert tried[:3] == [10, 5, 2] and extractor.max_batch == 2
    assert sum(n for n in tried if n <= 3) == 10  # every tile encoded exactly once
    assert "out of memory" in caplog.text and "continuing with 2" in caplog.text
    tried.clear()
    extractor(tiles)
    assert max(tried) == 2  # later batches start at the size that fitted


def test_out_of_memory_on_one_tile_is_a_clear_error(encoder, tiles):
    extractor = FeatureExtractor(encoder, torch.device("cpu"))
    _fails_above(extractor, limit=0)
    with pytest.raises(EncoderError, match="out of memory on cpu with a single tile"):
        extractor(tiles)


def test_max_batch_splits_large_batches(encoder, tiles):
    extractor = FeatureExtractor(encoder, torch.device("cpu"), max_batch=4)
    tried = _fails_above(extractor, limit=10)
    extractor(tiles)
    assert tried == [4, 4, 2]


def test_compile_setting_reaches_torch_compile(monkeypatch):
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    extractor = make_extractor(EmbedSettings(device="cpu", compile_encoder=True))
    assert compiled == [extractor.encoder]
    make_extractor(EmbedSettings(device="cpu"))
    assert len(compiled) == 1  # not compiled unless asked


@pytest.mark.slow
def test_compiled_encoder_gives_the_same_features(encoder, tiles):
    plain = FeatureExtractor(encoder, torch.device("cpu"))(tiles)
    compiled = FeatureExtractor(encoder, torch.device("cpu"), compile_encoder=True)(tiles)
    np.testing.assert_allclose(compiled, plain, rtol=1e-3, atol=1e-3)
