"""Providence / Microsoft Prov-GigaPath tile encoder: timm ViT-g/14 (DINOv2 layout), gated.

No commit pinned (``revision=None``).
"""

from virtualst.embed.encoders.config import EncoderConfig
from virtualst.embed.encoders.registry import register_encoder

register_encoder(
    EncoderConfig(
        name="gigapath",
        builder="timm",
        architecture="vit_giant_patch14_dinov2",
        weights="hf-hub:prov-gigapath/prov-gigapath",
        dim=1536,
        model_kwargs={"img_size": 224, "in_chans": 3},
        pooling="cls",
        precision="fp16",
        license="Apache-2.0",
        gated=True,
        url="https://huggingface.co/prov-gigapath/prov-gigapath",
        citation="Xu et al., A whole-slide foundation model for digital pathology from real-world data, Nature 2024",
    )
)
