"""Tissue detection on a slide thumbnail, without a deep model.

H&E tissue is coloured (pink stroma, purple nuclei) while glass is white or
grey, so the HSV *saturation* of a thumbnail separates them: Otsu's
threshold on its histogram (with a floor, and a check that the lower class
really is glass rather than pale tissue), then a brightness test
that drops black pen marks and scanner edges, then a little morphology
(closing, opening, hole filling, small components dropped).

The result, a :class:`TissueMask`, answers "is this level-0 point on
tissue?" for the spot grid (:mod:`virtualst.predict.grid`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from virtualst.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from virtualst.embed.images import SlideImage


@dataclass(frozen=True)
class TissueSettings:
    """How :func:`detect_tissue` thresholds and cleans the thumbnail.

    Parameters
    ----------
    max_px
        Longest side of the thumbnail analysed.
    min_saturation
        Floor of the saturation threshold (0-1): keeps faint scanner noise
        on an almost empty slide out of the mask.
    glass_saturation
        Otsu's lower class is taken for glass only when its median
        saturation is below this (0-1). Above it the lower class is pale
        tissue (tissue fills the image, and Otsu split pale from dark
        tissue), so the floor is used instead.
    smooth_px
        Gaussian blur (thumbnail pixels) of the saturation before
        thresholding, so single pale pixels inside tissue do not flicker.
    min_value
        Pixels darker than this HSV value (0-1) are pen marks, slide edges
        or black padding, never tissue.
    closing_px, opening_px
        Radii (thumbnail pixels) of the closing that bridges gaps between
        nuclei and of the opening that removes dust.
    min_area_frac
        Connected components smaller than this fraction of the thumbnail
        are dropped (dust, debris).
    """

    max_px: int = 2048
    min_saturation: float = 0.04
    glass_saturation: float = 0.1
    smooth_px: float = 1.0
    min_value: float = 0.15
    closing_px: int = 2
    opening_px: int = 1
    min_area_frac: float = 1e-4


@dataclass(frozen=True)
class TissueMask:
    """Where the tissue is, at thumbnail scale.

    Attributes
    ----------
    mask
        ``(h, w)`` bool array, true on tissue.
    scale
        Thumbnail pixels per level-0 pixel.
    threshold
        Saturation threshold (0-1) that was applied.
    """

    mask: np.ndarray
    scale: float
    threshold: float

    @property
    def fraction(self) -> float:
        """Fraction of the image covered by tissue."""
        return float(self.mask.mean())

    def contains(self, xy_level0) -> np.ndarray:
        """Whether level-0 points ``(N, 2)`` (x, y) lie on tissue; points off the image are not."""
        xy = np.asarray(xy_level0, dtype=np.float64).reshape(-1, 2)
        ij = np.floor(xy * self.scale).astype(np.int64)
        height, width = self.mask.shape
        inside = (ij[:, 0] >= 0) & (ij[:, 1] >= 0) & (ij[:, 0] < width) & (ij[:, 1] < height)
        out = np.zeros(len(xy), dtype=bool)
        out[inside] = self.mask[ij[inside, 1], ij[inside, 0]]
        return out

    def resized(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask as uint8 (1 = tissue) resampled (nearest) to ``(height, width)``."""
        height, width = shape
        rows = np.minimum((np.arange(height) + 0.5) * self.mask.shape[0] / height, self.mask.shape[0] - 1).astype(np.int64)
        cols = np.minimum((np.arange(width) + 0.5) * self.mask.shape[1] / width, self.mask.shape[1] - 1).astype(np.int64)
        return self.mask[np.ix_(rows, cols)].astype(np.uint8)


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Otsu's threshold: the cut maximising the between-class variance of a histogram.

    Parameters
    ----------
    values
        Samples (any shape).
    bins
        Histogram bins.
    value_range
        Histogram range.

    Returns
    -------
    float
        Values strictly above the threshold form the upper class. For
        constant input, the lower end of ``value_range``.
    """
    hist, edges = np.histogram(np.ravel(values), bins=bins, range=value_range)
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centres)
    mean_low = np.divide(sum_low, weight_low, out=np.zeros_like(sum_low), where=weight_low > 0)
    mean_high = np.divide(sum_low[-1] - sum_low, weight_high, out=np.zeros_like(sum_low), where=weight_high > 0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    if not between.any():
        return float(value_range[0])
    return float(edges[int(np.argmax(between)) + 1])  # upper edge of the last "low" bin


def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value (both 0-1) of a uint8 RGB image."""
    rgb = rgb.astype(np.float32) / 255.0
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    saturation = np.divide(chroma, value, out=np.zeros_like(value), where=value > 0)
    return saturation, value


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def clean_mask(mask: np.ndarray, settings: TissueSettings) -> np.ndarray:
    """Close gaps, remove specks, fill holes and drop small components of a bool mask."""
    if settings.closing_px > 0:
        # Pad so the closing does not erode tissue touching the border.
        pad = settings.closing_px
        padded = np.pad(mask, pad, mode="edge")
        mask = ndimage.binary_closing(padded, structure=_disk(pad))[pad:-pad, pad:-pad]
    if settings.opening_px > 0:
        mask = ndimage.binary_opening(mask, structure=_disk(settings.opening_px))
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= settings.min_area_frac * mask.size
        keep[0] = False
        mask = keep[labels]
    return mask


def saturation_threshold(saturation: np.ndarray, settings: TissueSettings) -> float:
    """Otsu's threshold between glass and tissue saturation, or the floor when no glass is seen."""
    if saturation.size == 0:
        return settings.min_saturation
    threshold = otsu_threshold(saturation)
    lower = saturation[saturation <= threshold]
    if lower.size == 0 or np.median(lower) > settings.glass_saturation:
        return settings.min_saturation  # both classes are tissue: all coloured pixels are
    return max(threshold, settings.min_saturation)


def tissue_from_rgb(rgb: np.ndarray, settings: TissueSettings | None = None) -> tuple[np.ndarray, float]:
    """Bool tissue mask and the saturation threshold used, for a uint8 RGB thumbnail."""
    settings = settings or TissueSettings()
    saturation, value = saturation_value(rgb)
    if settings.smooth_px > 0:
        saturation = ndimage.gaussian_filter(saturation, settings.smooth_px)
    bright = value >= settings.min_value
    threshold = saturation_threshold(saturation[bright], settings)
    return clean_mask((saturation > threshold) & bright, settings), threshold


def detect_tissue(image: SlideImage, max_px: int | None = None, settings: TissueSettings | None = None) -> TissueMask:
    """Find the tissue of a slide on a thumbnail.

    Parameters
    ----------
    image
        Slide handle (:func:`virtualst.embed.images.open_image`).
    max_px
        Longest thumbnail side; overrides ``settings.max_px``.
    settings
        Threshold and clean-up settings.

    Returns
    -------
    TissueMask
        Mask at thumbnail scale with its scale and threshold.

    Raises
    ------
    InputError
        No tissue was found (a blank or non-H&E image).
    """
    settings = settings or TissueSettings()
    if max_px is not None:
        settings = replace(settings, max_px=int(max_px))
    rgb = image.thumbnail(settings.max_px)
    mask, threshold = tissue_from_rgb(rgb, settings)
    if not mask.any():
        raise InputError(image.path, f"no tissue found (no coloured region above saturation {threshold:.2f}); is this an H&E slide?")
    return TissueMask(mask=mask, scale=rgb.shape[1] / image.extent[0], threshold=threshold)
