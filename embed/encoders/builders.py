"""Builders: turn an :class:`EncoderConfig` into a feature trunk and load weights into it.

A trunk returns either a (B, C, H, W) map or (B, N, D) tokens and carries
``num_prefix_tokens`` (CLS + registers) so pooling can skip them. Builders are
looked up by ``config.builder`` in :data:`BUILDERS`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from virtualst.embed.encoders.config import EncoderConfig
from virtualst.embed.encoders.lite0 import map_lite0_state_dict
from virtualst.embed.encoders.weights import ResolvedWeights, read_state_dict
from virtualst.errors import EncoderError, MissingDependencyError

#: Keyword arguments that name layer classes (strings in configs and Hub config.json).
_LAYER_ARGS = ("mlp_layer", "act_layer", "norm_layer", "embed_layer", "block_fn")


class Trunk(nn.Module):
    """A network reduced to its feature forward pass."""

    def __init__(self, model: nn.Module, num_prefix_tokens: int, forward_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self.num_prefix_tokens = num_prefix_tokens
        self._forward_fn = forward_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_fn(self.model, x)


def _resolve_layer(value: Any) -> Any:
    """``"SwiGLUPacked"``, ``"timm.layers.SwiGLUPacked"``, ``"torch.nn.SiLU"`` → class; others unchanged."""
    if not isinstance(value, str):
        return value
    import timm.layers

    attr = value.rsplit(".", 1)[-1]
    if "." not in value and attr[:1].islower():
        return value  # a short name such as "silu": timm resolves it itself
    for module in (timm.layers, nn):
        if hasattr(module, attr):
            return getattr(module, attr)
    raise EncoderError(f"cannot resolve layer {value!r} (not in timm.layers or torch.nn)")


def _check_load(result: Any, name: str, ignore: tuple[str, ...] = ()) -> None:
    missing = [k for k in result.missing_keys if not k.startswith(ignore)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(ignore)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise EncoderError(f"{name}: weights do not fit the architecture: {'; '.join(parts)}")


def _load_strict(module: nn.Module, state: dict[str, Any], name: str) -> None:
    expected = module.state_dict()
    for key, value in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            raise EncoderError(
                f"{name}: weight {key} has shape {tuple(value.shape)}, architecture expects {tuple(expected[key].shape)}"
            )
    _check_load(module.load_state_dict(state, strict=False), name)


# --------------------------------------------------------------------------- timm


def _timm_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)


def build_timm(config: EncoderConfig, overrides: dict[str, Any]) -> Trunk:
    """A timm model with no classifier; ``config.drop`` children become identity."""
    import timm

    kwargs = {k: _resolve_layer(v) if k in _LAYER_ARGS else v for k, v in {**config.model_kwargs, **overrides}.items()}
    kwargs["num_classes"] = 0
    try:
        model = timm.create_model(config.architecture, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        raise EncoderError(f"{config.name}: cannot build timm {config.architecture}: {exc}") from None
    for child in config.drop:
        setattr(model, child, nn.Identity())
    return Trunk(model, int(getattr(model, "num_prefix_tokens", 0)), _timm_forward)


def load_timm(trunk: Trunk, weights: ResolvedWeights, config: EncoderConfig) -> None:
    """Strictly load a timm checkpoint, ignoring classifier and dropped children."""
    state = read_state_dict(weights, name=config.name)
    model = trunk.model
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    skip = tuple(f"{p}." for p in (*config.drop, *([classifier] if isinstance(classifier, str) else classifier)))
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(skip)}
    _load_strict(model, state, config.name)


# --------------------------------------------------------------------------- transformers

_HF_ALIASES = {"depth": "num_hidden_layers", "num_heads": "num_attention_heads", "embed_dim": "hidden_size"}


def _hf_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).last_hidden_state


def _hf_class(config: EncoderConfig):
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("transformers", purpose=f"the {config.name} encoder") from None
    cls = getattr(transformers, config.architecture, None)
    if cls is None:
        raise EncoderError(f"{config.name}: transformers has no model class {config.architecture}")
    return cls


def build_transformers(config: EncoderConfig, overrides: dict[str, Any], source: dict[str, Any] | None = None) -> Trunk:
    """A transformers vision backbone from ``source`` (the repo's config.json) or ``config.model_kwargs``."""
    cls = _hf_class(config)
    attrs = dict(source) if source else dict(config.model_kwargs)
    attrs.update({_HF_ALIASES.get(k, k): v for k, v in overrides.items()})
    hf_config = cls.config_class.from_dict({k: v for k, v in attrs.items() if k != "auto_map"})
    kwargs = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls.__init__).parameters else {}
    model = cls(hf_config, **kwargs)
    return Trunk(model, 1 + int(getattr(hf_config, "num_register_tokens", 0) or 0), _hf_forward)


def load_transformers(trunk: Trunk, weights: ResolvedWeights, config: EncoderConfig) -> Trunk:
    """Load through ``from_pretrained`` on the local folder (offline, no remote code).

    transformers renames legacy checkpoint keys on load (its v5 attention
    layout differs from older checkpoints), so a raw ``load_state_dict``
    would reject real Hub weights.
    """
    cls = type(trunk.model)
    kwargs = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls.__init__).parameters else {}
    try:
        model, info = cls.from_pretrained(
            str(weights.directory), config=trunk.model.config, local_files_only=True,
            trust_remote_code=False, output_loading_info=True, **kwargs,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EncoderError(f"{config.name}: cannot load weights from {weights.directory}: {first}") from None
    bad = [k for k in info.get("missing_keys", []) if "mask_token" not in k]
    bad += [k for k in info.get("unexpected_keys", []) if not k.startswith(("pooler.", "mask_token"))]
    bad += [str(k) for k in info.get("mismatched_keys", [])]
    if bad:
        raise EncoderError(f"{config.name}: weights do not fit {config.architecture}: {len(bad)} keys (e.g. {', '.join(bad[:3])})")
    return Trunk(model, trunk.num_prefix_tokens, _hf_forward)


# --------------------------------------------------------------------------- packaged lite0


def load_lite0(trunk: Trunk, weights: ResolvedWeights, config: EncoderConfig) -> None:
    """Rename the package's lukemelas keys to timm's, in order, shapes checked."""
    state = read_state_dict(weights, name=config.name)
    mapped = map_lite0_state_dict(state, trunk.model.state_dict(), name=config.name)
    _load_strict(trunk.model, mapped, config.name)


#: builder name → (build, load). ``build(config, overrides, source_config)``
#: returns a random-weight trunk; ``load(trunk, weights, config)`` fills it and
#: returns the trunk (or ``None`` when it loaded in place).
BUILDERS: dict[str, tuple[Callable[..., Trunk], Callable[..., Trunk | None]]] = {
    "timm": (lambda config, overrides, source=None: build_timm(config, overrides), load_timm),
    "transformers": (build_transformers, load_transformers),
    "lite0_package": (lambda config, overrides, source=None: build_timm(config, overrides), load_lite0),
}


def get_builder(config: EncoderConfig):
    try:
        return BUILDERS[config.builder]
    except KeyError:
        raise EncoderError(f"{config.name}: unknown builder {config.builder!r} (known: {', '.join(BUILDERS)})") from None
