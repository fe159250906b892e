"""kaiko.ai Midnight-12k: transformers DINOv2 ViT-g/14, CLS ⊕ mean(patch tokens) = 3072.

Normalisation (0.5, 0.5, 0.5) / (0.5, 0.5, 0.5) as on the model card.
No commit pinned (``revision=None``).
"""

from virtualst.embed.encoders.config import HALF, EncoderConfig
from virtualst.embed.encoders.registry import register_encoder

register_encoder(
    EncoderConfig(
        name="midnight12k",
        builder="transformers",
        architecture="Dinov2Model",
        weights="hf-hub:kaiko-ai/midnight",
        dim=3072,
        model_kwargs={
            "hidden_size": 1536,
            "num_hidden_layers": 40,
            "num_attention_heads": 24,
            "mlp_ratio": 4,
            "use_swiglu_ffn": True,
            "image_size": 224,
            "patch_size": 14,
            "layer_norm_eps": 1e-6,
        },
        mean=HALF,
        std=HALF,
        pooling="cls+mean",
        precision="fp16",
        license="MIT",
        gated=False,
        url="https://huggingface.co/kaiko-ai/midnight",
        citation="Karasikov et al., Training state-of-the-art pathology foundation models with orders of magnitude less data, 2025",
    )
)
