"""The frozen description of one encoder: architecture, weights, preprocessing, pooling."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

Pooling = Literal["avg", "cls", "cls+mean"]
Precision = Literal["fp32", "fp16", "bf16"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderConfig:
    """Everything needed to build, load and feed one frozen tile encoder.

    Parameters
    ----------
    name
        Registry key, e.g. ``"uni_v1"``.
    builder
        Key of the builder that constructs the network: ``"timm"``,
        ``"transformers"`` or ``"lite0_package"``.
    architecture
        timm model name, or transformers model class name (``"Dinov2Model"``).
    weights
        Where pretrained weights come from: ``hf-hub:org/name``,
        ``timm:model.tag`` (the timm tag's Hub repo), ``package:module``.
    revision
        Pinned Hub commit. ``None`` means "the branch ``main`` at download
        time"; the commit actually used is recorded in the provenance.
    model_kwargs
        Keyword arguments for the builder (timm ``create_model`` kwargs or
        transformers config attributes). Layer names such as
        ``"SwiGLUPacked"`` or ``"silu"`` are resolved at build time.
    input_size
        Square tile side in pixels the encoder expects.
    mean, std
        Per-channel normalisation applied to [0, 1] RGB.
    pooling
        ``"avg"`` (mean over the spatial map or the patch tokens), ``"cls"``,
        or ``"cls+mean"`` (CLS concatenated with the mean of patch tokens,
        registers excluded).
    dim
        Length of the pooled feature vector.
    precision
        Recommended inference dtype on an accelerator.
    license, gated, url, citation
        Shown in ``virtualst encoders`` and written into caches and cards.
    drop
        Child modules replaced by identity to truncate a trunk
        (``("layer4",)`` turns ResNet-50 into its layer3 trunk).
    """

    name: str
    builder: str
    architecture: str
    weights: str
    dim: int
    revision: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pooling: Pooling = "cls"
    precision: Precision = "fp32"
    license: str = "unknown"
    gated: bool = False
    url: str = ""
    citation: str = ""
    drop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.pooling not in ("avg", "cls", "cls+mean"):
            raise ValueError(f"{self.name}: unknown pooling {self.pooling!r}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"{self.name}: unknown precision {self.precision!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"{self.name}: mean and std need three channels")

    @property
    def hub_repo(self) -> str | None:
        """``org/name`` when the weights live on the Hugging Face Hub, else ``None``."""
        if self.weights.startswith("hf-hub:"):
            return self.weights.removeprefix("hf-hub:")
        return None

    def replace(self, **changes: Any) -> EncoderConfig:
        """A copy with some fields changed (the config itself is frozen)."""
        return replace(self, **changes)

    def summary(self) -> dict[str, Any]:
        """The row shown by ``virtualst encoders``."""
        return {
            "name": self.name,
            "dim": self.dim,
            "weights": self.weights,
            "gated": self.gated,
            "license": self.license,
            "precision": self.precision,
        }
