"""Paige encoders (Virchow, Virchow2): ViT-H/14 with SwiGLU, CLS ⊕ mean(patch tokens).

The model cards build them with ``mlp_layer=SwiGLUPacked, act_layer=SiLU``
(the Hub config.json cannot name these classes for timm). The patch mean
excludes the CLS and register tokens. No commit pinned (``revision=None``).
"""

from virtualst.embed.encoders.config import EncoderConfig
from virtualst.embed.encoders.registry import register_encoder

_ARCH = {
    "img_size": 224,
    "init_values": 1e-5,
    "mlp_ratio": 5.3375,
    "mlp_layer": "SwiGLUPacked",
    "act_layer": "silu",
    "dynamic_img_size": True,
}

register_encoder(
    EncoderConfig(
        name="virchow",
        builder="timm",
        architecture="vit_huge_patch14_224",
        weights="hf-hub:paige-ai/Virchow",
        dim=2560,
        model_kwargs=dict(_ARCH),
        pooling="cls+mean",
        precision="fp16",
        license="Apache-2.0",
        gated=True,
        url="https://huggingface.co/paige-ai/Virchow",
        citation="Vorontsov et al., A foundation model for clinical-grade computational pathology, Nat Med 2024",
    )
)

register_encoder(
    EncoderConfig(
        name="virchow2",
        builder="timm",
        architecture="vit_huge_patch14_224",
        weights="hf-hub:paige-ai/Virchow2",
        dim=2560,
        model_kwargs={**_ARCH, "reg_tokens": 4},
        pooling="cls+mean",
        precision="fp16",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        url="https://huggingface.co/paige-ai/Virchow2",
        citation="Zimmermann et al., Virchow2: scaling self-supervised mixed magnification models in pathology, 2024",
    )
)
