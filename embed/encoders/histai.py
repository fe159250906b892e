"""HistAI Hibou-L: DINOv2 ViT-L/14 with 4 registers.

The Hub repo ships remote code (never executed here); the same network is
built with transformers' ``Dinov2WithRegistersModel``. Whether the real
checkpoint's key names load strictly into it is unverified offline — a
mismatch fails loudly. Mean/std from the repo's preprocessor config.
"""

from virtualst.embed.encoders.config import EncoderConfig
from virtualst.embed.encoders.registry import register_encoder

register_encoder(
    EncoderConfig(
        name="hibou_l",
        builder="transformers",
        architecture="Dinov2WithRegistersModel",
        weights="hf-hub:histai/hibou-L",
        dim=1024,
        model_kwargs={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "mlp_ratio": 4,
            "image_size": 224,
            "patch_size": 14,
            "num_register_tokens": 4,
            "layer_norm_eps": 1e-6,
        },
        mean=(0.7068, 0.5755, 0.722),
        std=(0.195, 0.2316, 0.1816),
        pooling="cls",
        precision="fp32",
        license="Apache-2.0",
        gated=True,
        url="https://huggingface.co/histai/hibou-L",
        citation="Nechaev et al., Hibou: a family of foundational vision transformers for pathology, 2024",
    )
)
