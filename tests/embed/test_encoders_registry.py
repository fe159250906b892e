"""Registry and config: no torch needed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from virtualst.embed.encoders import (
    EncoderConfig,
    get_encoder_config,
    list_encoders,
    register_encoder,
    unregister_encoder,
)
from virtualst.errors import EncoderError

EXPECTED = {
    "efficientnet_lite0": 1280, "resnet50": 1024, "uni_v1": 1024, "uni_v2": 1536,
    "virchow": 2560, "virchow2": 2560, "hoptimus0": 1536, "hoptimus1": 1536, "h0-mini": 768,
    "gigapath": 1536, "phikon": 768, "phikon_v2": 1024, "hibou_l": 1024, "midnight12k": 3072,
}


def test_every_expected_encoder_is_registered_with_its_dim():
    dims = {c.name: c.dim for c in list_encoders()}
    assert {k: dims.get(k) for k in EXPECTED} == EXPECTED


def test_list_encoders_rows_for_the_cli():
    row = get_encoder_config("uni_v1").summary()
    assert row == {"name": "uni_v1", "dim": 1024, "weights": "hf-hub:MahmoodLab/UNI",
                   "gated": True, "license": "CC-BY-NC-ND-4.0", "precision": "fp16"}


def test_listing_does_not_import_torch():
    code = ("import sys; import virtualst.embed.encoders as E; E.list_encoders(); "
            "print(any(m in sys.modules for m in ('torch', 'timm', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(EncoderError, match=r"unknown encoder 'uni_v3': did you mean uni_v2, uni_v1\?"):
        get_encoder_config("uni_v3")


def test_register_as_decorator_and_duplicate_guard():
    @register_encoder
    def tiny() -> EncoderConfig:
        return EncoderConfig(name="_tiny", builder="timm", architecture="resnet18", weights="timm:resnet18", dim=512)

    try:
        assert get_encoder_config("_tiny").architecture == "resnet18"
        with pytest.raises(ValueError, match="already registered"):
            register_encoder(get_encoder_config("_tiny").replace(dim=1))
    finally:
        unregister_encoder("_tiny")


def test_config_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="pooling"):
        EncoderConfig(name="x", builder="timm", architecture="a", weights="w", dim=1, pooling="max")
