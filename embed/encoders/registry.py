"""Name → :class:`EncoderConfig` registry; vendor modules fill it on first use.

Importing this module does not import torch: configs are plain data.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import TypeVar

from virtualst.embed.encoders.config import EncoderConfig
from virtualst.errors import EncoderError

#: One module per weight vendor, each registering its configs at import.
VENDOR_MODULES = ("imagenet", "mahmood", "paige", "bioptimus", "providence", "owkin", "histai", "kaiko")

_REGISTRY: dict[str, EncoderConfig] = {}
_vendors_loaded = False

T = TypeVar("T", EncoderConfig, Callable[[], EncoderConfig])


def register_encoder(entry: T, *, overwrite: bool = False) -> T:
    """Add an encoder to the registry.

    Usable on a config (``register_encoder(EncoderConfig(...))``) or as a
    decorator on a zero-argument function that returns one.

    Parameters
    ----------
    entry
        The config, or a function returning it.
    overwrite
        Replace an existing entry of the same name instead of raising.

    Returns
    -------
    The argument, unchanged.
    """
    config = entry() if callable(entry) else entry
    if not isinstance(config, EncoderConfig):
        raise TypeError(f"register_encoder needs an EncoderConfig, got {type(config).__name__}")
    if config.name in _REGISTRY and not overwrite and _REGISTRY[config.name] != config:
        raise ValueError(f"encoder {config.name!r} is already registered")
    _REGISTRY[config.name] = config
    return entry


def unregister_encoder(name: str) -> None:
    """Remove an entry (tests register temporary encoders)."""
    _REGISTRY.pop(name, None)


def _load_vendors() -> None:
    global _vendors_loaded
    if not _vendors_loaded:
        _vendors_loaded = True
        for module in VENDOR_MODULES:
            importlib.import_module(f"virtualst.embed.encoders.{module}")


def get_encoder_config(name: str) -> EncoderConfig:
    """Look up a registered encoder.

    Raises
    ------
    EncoderError
        Unknown name; the message lists the closest registered names.
    """
    _load_vendors()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(_REGISTRY))}"
        raise EncoderError(f"unknown encoder {name!r}: {hint}") from None


def list_encoders() -> list[EncoderConfig]:
    """All registered encoder configs, sorted by name."""
    _load_vendors()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
