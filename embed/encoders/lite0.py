"""Map the packaged lukemelas-style EfficientNet-Lite0 state dict onto timm's network.

Both networks list the same tensors in the same order (stem, blocks with
expand → depthwise → project, head), only the names differ, so keys are
paired by position and every pair must agree in shape and tensor kind.
"""

from __future__ import annotations

from typing import Any

from virtualst.errors import EncoderError

#: The ImageNet classifier is not part of the feature trunk.
CLASSIFIER_PREFIX = "_fc."


def map_lite0_state_dict(source: dict[str, Any], target: dict[str, Any], *, name: str) -> dict[str, Any]:
    """Rename ``source`` tensors to ``target``'s keys, pairing them in order.

    Parameters
    ----------
    source
        The package's state dict (``_conv_stem.weight``, ``_blocks.N...``, ``_fc.*``).
    target
        ``state_dict()`` of the timm model built with ``num_classes=0``.
    name
        Encoder name for error messages.

    Raises
    ------
    EncoderError
        Different tensor counts, or any pair differing in shape or kind
        (``weight``/``bias``/``running_mean``/...).
    """
    src = [(k, v) for k, v in source.items() if not k.startswith(CLASSIFIER_PREFIX)]
    dst = list(target.items())
    if len(src) != len(dst):
        raise EncoderError(f"{name}: packaged weights have {len(src)} tensors, timm model expects {len(dst)}")
    mapped = {}
    for (ks, vs), (kd, vd) in zip(src, dst):
        kind_s, kind_d = ks.rsplit(".", 1)[-1], kd.rsplit(".", 1)[-1]
        if tuple(vs.shape) != tuple(vd.shape) or kind_s != kind_d:
            raise EncoderError(
                f"{name}: weight mismatch {ks} {tuple(vs.shape)} -> {kd} {tuple(vd.shape)}; "
                "the packaged checkpoint does not fit timm's architecture"
            )
        mapped[kd] = vs
    return mapped
