"""Owkin encoders (Phikon, Phikon-v2): transformers ViT-B/16 and DINOv2 ViT-L/16, CLS token.

``model_kwargs`` hold the transformers config used for random-weight builds;
pretrained loads read the repo's own ``config.json``. No commit pinned.
"""

from virtualst.embed.encoders.config import EncoderConfig
from virtualst.embed.encoders.registry import register_encoder

register_encoder(
    EncoderConfig(
        name="phikon",
        builder="transformers",
        architecture="ViTModel",
        weights="hf-hub:owkin/phikon",
        dim=768,
        model_kwargs={
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "image_size": 224,
            "patch_size": 16,
            "qkv_bias": True,
            "layer_norm_eps": 1e-12,
        },
        pooling="cls",
        precision="fp32",
        license="Owkin non-commercial",
        gated=False,
        url="https://huggingface.co/owkin/phikon",
        citation="Filiot et al., Scaling self-supervised learning for histopathology with masked image modeling, 2023",
    )
)

register_encoder(
    EncoderConfig(
        name="phikon_v2",
        builder="transformers",
        architecture="Dinov2Model",
        weights="hf-hub:owkin/phikon-v2",
        dim=1024,
        model_kwargs={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "mlp_ratio": 4,
            "image_size": 224,
            "patch_size": 16,
            "layer_norm_eps": 1e-6,
        },
        pooling="cls",
        precision="fp32",
        license="Owkin non-commercial",
        gated=False,
        url="https://huggingface.co/owkin/phikon-v2",
        citation="Filiot et al., Phikon-v2, a large and public feature extractor for biomarker prediction, 2024",
    )
)
