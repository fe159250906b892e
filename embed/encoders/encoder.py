"""The frozen :class:`Encoder` module: trunk + pooling + the config's preprocessing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from virtualst.embed.encoders.builders import Trunk
from virtualst.embed.encoders.config import EncoderConfig

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def pool(features: torch.Tensor, pooling: str, num_prefix_tokens: int) -> torch.Tensor:
    """Reduce a (B, C, H, W) map or (B, N, D) tokens to (B, dim).

    ``"avg"`` averages the map, or the patch tokens (prefix tokens excluded);
    ``"cls"`` takes token 0; ``"cls+mean"`` concatenates both.
    """
    if features.ndim == 4:
        if pooling != "avg":
            raise ValueError(f"pooling {pooling!r} needs tokens, the trunk returns a feature map")
        return features.mean(dim=(2, 3))
    if features.ndim != 3:
        raise ValueError(f"unexpected trunk output shape {tuple(features.shape)}")
    patches = features[:, num_prefix_tokens:]
    if pooling == "avg":
        return patches.mean(dim=1)
    if pooling == "cls":
        return features[:, 0]
    return torch.cat([features[:, 0], patches.mean(dim=1)], dim=-1)


class Encoder(nn.Module):
    """A frozen tile encoder: normalised (B, 3, H, W) float → (B, dim) features.

    Build it with :func:`virtualst.embed.encoders.load_encoder`.

    Attributes
    ----------
    config : EncoderConfig
        The registry entry (or the config derived from a Hub/local repo).
    dim, input_size, mean, std, precision
        Copied from the config; ``mean``/``std`` are tuples (the tensors used by
        :meth:`preprocess` live in buffers that follow ``.to(device)``).
    provenance : dict
        ``weights`` source, ``revision``, ``sha256`` of the file(s) loaded,
        ``builder``, ``architecture``, ``pooling``, ``pretrained``, ``arch_overrides``.
    """

    def __init__(self, trunk: Trunk, config: EncoderConfig, provenance: dict[str, Any]) -> None:
        super().__init__()
        self.trunk = trunk
        self.config = config
        self.dim = config.dim
        self.input_size = config.input_size
        self.mean = tuple(config.mean)
        self.std = tuple(config.std)
        self.precision = config.precision
        self.provenance = dict(provenance)
        # Non-persistent: preprocessing constants are config, not weights.
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Encoder:
        """Always stays in eval mode: the encoder is frozen (BatchNorm/dropout off)."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) RGB → float32 normalised with the config's mean/std.

        Runs on the encoder's device, so callers can ship compact uint8 batches.
        """
        x = images.to(device=self._mean.device, non_blocking=True).float().div_(255.0)
        return (x - self._mean) / self._std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled float32 features (B, dim) of an already-normalised batch.

        On CUDA the trunk runs under autocast at ``precision``; on CPU in fp32.
        """
        dtype = _DTYPES.get(self.precision)
        with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype is not None and x.is_cuda):
            out = self.trunk(x)
        return pool(out, self.config.pooling, self.trunk.num_prefix_tokens).float()

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}, dim={self.dim}, pooling={self.config.pooling!r}, precision={self.precision!r}"
