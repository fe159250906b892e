"""Tiles of fixed physical size centred on spots.

A tile covers ``tile_um`` micrometres of tissue whatever the scan resolution:
``size0 = tile_um / um_per_px`` level-0 pixels, resampled to ``px`` pixels.
The default (224 px covering 112 µm, i.e. 0.5 µm/px) is the HEST-Benchmark
convention. Tiles that cross the image edge are padded white and flagged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from virtualst.embed.images import crosses_edge
from virtualst.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from virtualst.embed.images import SlideImage
    from virtualst.sample import Sample

#: HEST convention: 224 px at 0.5 µm/px.
DEFAULT_PX = 224
DEFAULT_UM = 112.0


@dataclass(frozen=True)
class TileSpec:
    """Size of a tile in output pixels and in micrometres of tissue.

    Parameters
    ----------
    px
        Side of the tile handed to the encoder, in pixels.
    um
        Side of the tile in µm (fixed physical size).
    spot_factor
        If set, the tile side is ``spot_diameter_um * spot_factor``
        (spot-matched tiles); ``um`` must then be ``None`` or left at its
        default, which ``spot_factor`` overrides.

    Examples
    --------
    >>> TileSpec()                      # 224 px, 112 µm
    >>> TileSpec(px=224, spot_factor=1.0)  # one spot diameter per tile
    """

    px: int = DEFAULT_PX
    um: float | None = DEFAULT_UM
    spot_factor: float | None = None

    def __post_init__(self) -> None:
        if self.spot_factor is not None and self.um == DEFAULT_UM:
            object.__setattr__(self, "um", None)  # spot_factor replaces the default size
        if (self.um is None) == (self.spot_factor is None):
            raise ValueError("set exactly one of TileSpec.um and TileSpec.spot_factor")
        if int(self.px) != self.px or self.px <= 0:
            raise ValueError(f"TileSpec.px must be a positive integer, got {self.px}")
        object.__setattr__(self, "px", int(self.px))
        for name in ("um", "spot_factor"):
            value = getattr(self, name)
            if value is not None:
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(f"TileSpec.{name} must be positive, got {value}")
                object.__setattr__(self, name, float(value))

    def tile_um(self, sample: Sample) -> float:
        """Side of the tile in µm for ``sample``."""
        if self.um is not None:
            return self.um
        return float(sample.spot_diameter_um) * self.spot_factor

    def um_per_px(self, sample: Sample) -> float:
        """Physical size of one output pixel for ``sample``."""
        return self.tile_um(sample) / self.px

    def to_dict(self) -> dict:
        """JSON-able description, stored with cached embeddings."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TileSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(px=data["px"], um=data.get("um"), spot_factor=data.get("spot_factor"))


@dataclass(frozen=True)
class TileGeometry:
    """Where the tiles of a sample lie in level-0 pixels.

    Attributes
    ----------
    size0
        Tile side in level-0 pixels (fractional).
    top_left
        (N, 2) int64 rounded top-left corners (x, y), the cache ``coords``.
    centers
        (N, 2) float64 exact spot centres (x, y); reads use these.
    tile_um
        Tile side in µm.
    px
        Tile side in output pixels.
    """

    size0: float
    top_left: np.ndarray
    centers: np.ndarray
    tile_um: float
    px: int

    @property
    def origins(self) -> np.ndarray:
        """(N, 2) float64 exact top-left corners."""
        return self.centers - self.size0 / 2


def tile_geometry(sample: Sample, spec: TileSpec) -> TileGeometry:
    """Compute tile boxes for every spot of ``sample`` (no pixel reads)."""
    tile_um = spec.tile_um(sample)
    size0 = tile_um / float(sample.um_per_px)
    centers = sample.centers
    # floor(x + 0.5): round half up, unlike numpy's round-half-to-even.
    top_left = np.floor(centers - size0 / 2 + 0.5).astype(np.int64)
    return TileGeometry(size0=size0, top_left=top_left, centers=centers, tile_um=tile_um, px=spec.px)


def read_tile(image: SlideImage, center_xy, size0: float, px: int) -> tuple[np.ndarray, bool]:
    """Read one ``(px, px, 3)`` uint8 tile centred exactly on ``center_xy``.

    Parameters
    ----------
    image
        Slide handle.
    center_xy
        Spot centre (x, y) in level-0 pixels.
    size0
        Tile side in level-0 pixels.
    px
        Output side in pixels.

    Returns
    -------
    tile, crossed_edge
        The tile (white outside the image) and whether it crosses the edge.
    """
    cx, cy = float(center_xy[0]), float(center_xy[1])
    return image.read_region(cx - size0 / 2, cy - size0 / 2, size0, px)


def _image_of(sample: Sample) -> SlideImage:
    if sample.image is None:
        raise InputError(sample.source or sample.sample_id, "the sample has no image to cut tiles from")
    return sample.image


def iter_tiles(
    sample: Sample, spec: TileSpec, indices: Iterable[int] | None = None
) -> Iterator[tuple[int, np.ndarray, bool]]:
    """Yield ``(index, tile, crossed_edge)`` for the spots of ``sample``.

    Parameters
    ----------
    sample
        Sample with an image.
    spec
        Tile size.
    indices
        Spot row positions to read (default: all, in order).
    """
    image = _image_of(sample)
    geometry = tile_geometry(sample, spec)
    rows = range(sample.n_spots) if indices is None else indices
    for i in rows:
        tile, crossed = read_tile(image, geometry.centers[i], geometry.size0, geometry.px)
        yield int(i), tile, crossed


def edge_flags(sample: Sample, spec: TileSpec) -> np.ndarray:
    """Which tiles cross the image edge, from geometry alone (no pixel reads)."""
    image = _image_of(sample)
    geometry = tile_geometry(sample, spec)
    origins = geometry.origins
    size0 = geometry.size0
    return np.asarray(crosses_edge(origins[:, 0], origins[:, 1], size0, size0, image.extent), dtype=bool)
