"""Mahmood Lab encoders (UNI, UNI2-h): timm ViTs, gated on the Hub.

Architectures follow the model cards' ``timm.create_model`` calls.
No commit is pinned (``revision=None``): the resolved commit is recorded in
each cache's provenance instead.
"""

from virtualst.embed.encoders.config import EncoderConfig
from virtualst.embed.encoders.registry import register_encoder

_CITATION = "Chen et al., Towards a general-purpose foundation model for computational pathology, Nat Med 2024"

register_encoder(
    EncoderConfig(
        name="uni_v1",
        builder="timm",
        architecture="vit_large_patch16_224",
        weights="hf-hub:MahmoodLab/UNI",
        dim=1024,
        model_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        pooling="cls",
        precision="fp16",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        url="https://huggingface.co/MahmoodLab/UNI",
        citation=_CITATION,
    )
)

register_encoder(
    EncoderConfig(
        name="uni_v2",
        builder="timm",
        architecture="vit_giant_patch14_224",
        weights="hf-hub:MahmoodLab/UNI2-h",
        dim=1536,
        model_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "mlp_layer": "SwiGLUPacked",
            "act_layer": "silu",
            "reg_tokens": 8,
            "no_embed_class": True,
            "dynamic_img_size": True,
        },
        pooling="cls",
        precision="bf16",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        url="https://huggingface.co/MahmoodLab/UNI2-h",
        citation=_CITATION,
    )
)
