"""Encoder registry, factory and weight loading.

Public API
----------
EncoderConfig
    Frozen description of one encoder (architecture, weights, preprocessing, pooling).
register_encoder, get_encoder_config, list_encoders
    The name → config registry (one module per vendor fills it).
load_encoder
    Build a frozen :class:`Encoder` from a name, ``hf-hub:org/name`` or ``local-dir:/path``.
Encoder
    ``preprocess(uint8)`` → ``forward(x)`` → (B, dim) features, with ``provenance``.

Importing this package does not import torch: ``load_encoder`` and
``Encoder`` are loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from virtualst.embed.encoders.config import EncoderConfig
from virtualst.embed.encoders.registry import (
    get_encoder_config,
    list_encoders,
    register_encoder,
    unregister_encoder,
)

if TYPE_CHECKING:
    from virtualst.embed.encoders.encoder import Encoder
    from virtualst.embed.encoders.factory import EncoderIdentity, describe_encoder, load_encoder

__all__ = [
    "Encoder",
    "EncoderConfig",
    "EncoderIdentity",
    "describe_encoder",
    "get_encoder_config",
    "list_encoders",
    "load_encoder",
    "register_encoder",
    "unregister_encoder",
]

_LAZY = {"load_encoder": "factory", "describe_encoder": "factory", "EncoderIdentity": "factory", "Encoder": "encoder"}


def __getattr__(name: str) -> Any:
    # torch/timm only load when an encoder is actually built.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"virtualst.embed.encoders.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
