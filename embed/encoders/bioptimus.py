"""Bioptimus encoders (H-optimus-0, H-optimus-1, H0-mini): DINOv2-style timm ViTs with 4 registers.

Normalisation is Bioptimus' own (from the model cards). H0-mini, a distilled
ViT-B/14, uses SwiGLU MLPs per its card. No commit pinned (``revision=None``).
"""

from virtualst.embed.encoders.config import EncoderConfig
from virtualst.embed.encoders.registry import register_encoder

MEAN = (0.707223, 0.578729, 0.703617)
STD = (0.211883, 0.230117, 0.177517)
_GIANT = {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False}

register_encoder(
    EncoderConfig(
        name="hoptimus0",
        builder="timm",
        architecture="vit_giant_patch14_reg4_dinov2",
        weights="hf-hub:bioptimus/H-optimus-0",
        dim=1536,
        model_kwargs=dict(_GIANT),
        mean=MEAN,
        std=STD,
        pooling="cls",
        precision="fp16",
        license="Apache-2.0",
        gated=False,
        url="https://huggingface.co/bioptimus/H-optimus-0",
        citation="Saillard et al., H-optimus-0, Bioptimus 2024",
    )
)

register_encoder(
    EncoderConfig(
        name="hoptimus1",
        builder="timm",
        architecture="vit_giant_patch14_reg4_dinov2",
        weights="hf-hub:bioptimus/H-optimus-1",
        dim=1536,
        model_kwargs=dict(_GIANT),
        mean=MEAN,
        std=STD,
        pooling="cls",
        precision="fp16",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        url="https://huggingface.co/bioptimus/H-optimus-1",
        citation="Bioptimus, H-optimus-1, 2025",
    )
)

register_encoder(
    EncoderConfig(
        name="h0-mini",
        builder="timm",
        architecture="vit_base_patch14_reg4_dinov2",
        weights="hf-hub:bioptimus/H0-mini",
        dim=768,
        model_kwargs={"img_size": 224, "mlp_layer": "SwiGLUPacked", "act_layer": "silu"},
        mean=MEAN,
        std=STD,
        pooling="cls",
        precision="fp16",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        url="https://huggingface.co/bioptimus/H0-mini",
        citation="Filiot et al., Distilling foundation models for robust and efficient models in digital pathology, 2025",
    )
)
