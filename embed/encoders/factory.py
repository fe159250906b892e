"""``load_encoder``: the one way to get a frozen encoder (registry name, ``hf-hub:``, ``local-dir:``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from virtualst.embed.encoders import weights as W
from virtualst.embed.encoders.builders import get_builder
from virtualst.embed.encoders.config import IMAGENET_MEAN, IMAGENET_STD, EncoderConfig
from virtualst.embed.encoders.encoder import Encoder
from virtualst.embed.encoders.registry import get_encoder_config
from virtualst.errors import EncoderError


def load_encoder(
    spec: str,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    arch_overrides: dict[str, Any] | None = None,
) -> Encoder:
    """Build a frozen encoder and load its weights.

    Parameters
    ----------
    spec
        A registry name (``"uni_v1"``), ``"hf-hub:org/name"`` (any timm model
        on the Hub: its ``config.json`` gives architecture and mean/std), or
        ``"local-dir:/path"`` (a folder with a timm-style ``config.json`` and
        ``model.safetensors`` or ``pytorch_model.bin``).
    pretrained
        ``False`` gives random weights; for registry names no file is touched.
    weights
        A local file or folder that replaces the configured weight source.
    arch_overrides
        Architecture keyword overrides, e.g. ``{"depth": 1}`` for a shallow
        copy of a giant ViT in tests (``depth`` maps to ``num_hidden_layers``
        for transformers models).

    Returns
    -------
    Encoder
        In eval mode with ``requires_grad`` off.

    Raises
    ------
    EncoderError
        Unknown name, weights missing/gated/not fitting — one line each.
    MissingDependencyError
        An optional package needed by this encoder is not installed.
    """
    overrides = dict(arch_overrides or {})
    resolved: W.ResolvedWeights | None = None
    source_cfg: dict[str, Any] | None = None

    if spec.startswith(("hf-hub:", "local-dir:")):
        config, source_cfg, resolved = _repo_spec(spec, pretrained=pretrained, weights=weights)
    else:
        config = get_encoder_config(spec)
        if weights is not None:
            resolved = W.from_path(weights, name=config.name)
        elif pretrained:
            resolved = _resolve_registered(config)
        if config.builder == "transformers" and resolved is not None:
            source_cfg = resolved.read_config()

    build, load = get_builder(config)
    trunk = build(config, overrides, source_cfg)
    if resolved is not None:
        trunk = load(trunk, resolved, config) or trunk
    if config.dim <= 0:  # derived configs: measure the feature size once
        dim, pooling = _probe(trunk, config)
        config = config.replace(dim=dim, pooling=pooling)

    return Encoder(trunk, config, _provenance(config, resolved, overrides))


@dataclass(frozen=True)
class EncoderIdentity:
    """What a cache records about an encoder (config and weight provenance), known without building it.

    Has the attributes of :class:`Encoder` that cache planning reads, so
    complete caches can be recognised without loading a billion-parameter model.
    """

    config: EncoderConfig
    provenance: dict[str, Any]

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def input_size(self) -> int:
        return self.config.input_size

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.config.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.config.std)

    @property
    def precision(self) -> str:
        return self.config.precision


def describe_encoder(spec: str, *, weights: str | Path | None = None) -> EncoderIdentity | None:
    """The identity :func:`load_encoder` would give ``spec`` (pretrained), without building it.

    Resolves (and hashes) the weight files but reads no tensor. ``None`` for
    ``hf-hub:``/``local-dir:`` specs, whose feature size is only known by
    running the model.

    Raises
    ------
    EncoderError
        Unknown name, weights missing or gated.
    """
    if spec.startswith(("hf-hub:", "local-dir:")):
        return None
    config = get_encoder_config(spec)
    resolved = W.from_path(weights, name=config.name) if weights is not None else _resolve_registered(config)
    return EncoderIdentity(config, _provenance(config, resolved, {}))


def _provenance(config: EncoderConfig, resolved: W.ResolvedWeights | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Where an encoder's weights came from and how it was built (recorded in every cache)."""
    return {
        "encoder": config.name,
        "weights": resolved.source if resolved else "random",
        "revision": resolved.revision if resolved else None,
        "sha256": resolved.sha256 if resolved else None,
        "files": [f.name for f in resolved.files] if resolved else [],
        "builder": config.builder,
        "architecture": config.architecture,
        "pooling": config.pooling,
        "pretrained": resolved is not None,
        "arch_overrides": overrides,
    }


def _resolve_registered(config: EncoderConfig) -> W.ResolvedWeights:
    source = config.weights
    if source.startswith("hf-hub:"):
        return W.from_hub(config.hub_repo, name=config.name, revision=config.revision, gated=config.gated)
    if source.startswith("timm:"):
        repo = W.timm_hub_repo(source.removeprefix("timm:"))
        return W.from_hub(repo, name=config.name, revision=config.revision, gated=config.gated)
    if source.startswith("package:"):
        return W.from_package(source.removeprefix("package:"), name=config.name)
    if source.startswith("local-dir:"):
        return W.from_path(source.removeprefix("local-dir:"), name=config.name)
    raise EncoderError(f"{config.name}: unsupported weights source {source!r}")


def _repo_spec(
    spec: str, *, pretrained: bool, weights: str | Path | None
) -> tuple[EncoderConfig, None, W.ResolvedWeights | None]:
    """Config (from the repo's timm config.json) and weights of a ``hf-hub:``/``local-dir:`` spec."""
    resolved = None
    if spec.startswith("hf-hub:"):
        repo = spec.removeprefix("hf-hub:")
        if pretrained and weights is None:
            resolved = W.from_hub(repo, name=spec)
            if resolved.config_path is None:
                raise EncoderError(f"{spec}: the repository has no config.json to build the architecture from")
            config_path = resolved.config_path
        else:
            config_path = W.from_hub(repo, name=spec, need_weights=False)
    else:
        folder = Path(spec.removeprefix("local-dir:")).expanduser()
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise EncoderError(f"{spec}: no config.json in {folder}")
        if pretrained and weights is None:
            resolved = W.from_path(folder, name=spec)
    if weights is not None:
        resolved = W.from_path(weights, name=spec)
    return _config_from_timm_json(spec, W.read_json(config_path)), None, resolved


def _config_from_timm_json(spec: str, cfg: dict[str, Any]) -> EncoderConfig:
    """An :class:`EncoderConfig` for a timm Hub-style ``config.json``."""
    arch = cfg.get("architecture")
    if not arch:
        raise EncoderError(f"{spec}: config.json has no 'architecture' (only timm-style repos are supported)")
    pre = cfg.get("pretrained_cfg", {})
    kwargs = {k: v for k, v in cfg.get("model_args", {}).items() if k not in ("num_classes", "pretrained")}
    global_pool = kwargs.pop("global_pool", cfg.get("global_pool", "token"))
    input_size = pre.get("input_size", [3, 224, 224])
    return EncoderConfig(
        name=spec,
        builder="timm",
        architecture=arch,
        weights=spec,
        dim=0,  # measured after building
        model_kwargs=kwargs,
        input_size=int(input_size[-1]),
        mean=tuple(pre.get("mean", IMAGENET_MEAN)),
        std=tuple(pre.get("std", IMAGENET_STD)),
        pooling="avg" if global_pool in ("avg", "mean") else "cls",
        license=str(pre.get("license", "unknown")),
    )


def _probe(trunk: torch.nn.Module, config: EncoderConfig) -> tuple[int, str]:
    """Feature size and pooling of a derived config, from one forward pass of zeros."""
    from virtualst.embed.encoders.encoder import pool

    trunk.eval()
    with torch.no_grad():
        out = trunk(torch.zeros(1, 3, config.input_size, config.input_size))
    pooling = "avg" if out.ndim == 4 else config.pooling  # CNN repos have no CLS token
    return int(pool(out, pooling, trunk.num_prefix_tokens).shape[-1]), pooling
