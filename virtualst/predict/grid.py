"""Virtual spot grids laid over the tissue of a slide.

A *grid kind* (registry :data:`GRIDS`) names a lattice *layout*
(:data:`LAYOUTS`: hexagonal or square), a centre-to-centre pitch and a spot
diameter, after the assays the heads were trained on:

==========  ==========  ========  ==============
kind        layout      pitch     spot diameter
==========  ==========  ========  ==============
visium      hexagonal   100 µm    55 µm
st          square      200 µm    100 µm
square      square      100 µm    = pitch
==========  ==========  ========  ==============

:func:`make_grid` centres the lattice on the image and keeps the points whose
centre lies on tissue. Array coordinates follow Visium: on the hexagonal
lattice ``array_col`` steps by half a pitch and has the parity of
``array_row``, whose rows are ``pitch * sqrt(3) / 2`` apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from virtualst.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from virtualst.predict.tissue import TissueMask

#: (width, height, pitch), all level-0 pixels -> (array_row, array_col, x, y) of every lattice point.
Layout = Callable[[float, float, float], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def _centred_steps(length: float, step: float) -> tuple[int, float]:
    """How many points ``step`` apart fit in ``[0, length)``, and the first one (the lattice centred)."""
    n = max(1, math.floor(length / step))
    return n, (length - (n - 1) * step) / 2


def square_lattice(width: float, height: float, pitch: float):
    """Square lattice: rows and columns ``pitch`` apart."""
    n_cols, x0 = _centred_steps(width, pitch)
    n_rows, y0 = _centred_steps(height, pitch)
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    return rows, cols, x0 + cols * pitch, y0 + rows * pitch


def hex_lattice(width: float, height: float, pitch: float):
    """Hexagonal lattice (Visium): columns half a pitch apart, rows ``pitch * sqrt(3) / 2`` apart, odd rows shifted."""
    dx, dy = pitch / 2, pitch * math.sqrt(3) / 2
    n_cols, x0 = _centred_steps(width, dx)
    n_rows, y0 = _centred_steps(height, dy)
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    keep = (rows + cols) % 2 == 0  # a column index has its row's parity
    rows, cols = rows[keep], cols[keep]
    return rows, cols, x0 + cols * dx, y0 + rows * dy


#: Lattice layouts by name.
LAYOUTS: dict[str, Layout] = {"hex": hex_lattice, "square": square_lattice}


@dataclass(frozen=True)
class GridKind:
    """A named spot grid.

    Parameters
    ----------
    name
        Registry key (``--grid``).
    layout
        Key of :data:`LAYOUTS`.
    pitch_um
        Default centre-to-centre distance in µm.
    spot_diameter_um
        Spot diameter in µm; ``None`` means "equal to the pitch".
    description
        One line for help texts.
    """

    name: str
    layout: str
    pitch_um: float
    spot_diameter_um: float | None = None
    description: str = ""

    def diameter(self, pitch_um: float) -> float:
        """Spot diameter in µm at ``pitch_um``."""
        return float(pitch_um if self.spot_diameter_um is None else self.spot_diameter_um)


#: Grid kinds by name.
GRIDS: dict[str, GridKind] = {}


def register_grid(kind: GridKind) -> GridKind:
    """Add ``kind`` to :data:`GRIDS`."""
    if kind.layout not in LAYOUTS:
        raise ValueError(f"unknown layout {kind.layout!r}; known: {', '.join(LAYOUTS)}")
    GRIDS[kind.name] = kind
    return kind


register_grid(GridKind("visium", "hex", 100.0, 55.0, "Visium-like: hexagonal, 55 µm spots, 100 µm apart"))
register_grid(GridKind("st", "square", 200.0, 100.0, "legacy ST-like: square, 100 µm spots, 200 µm apart"))
register_grid(GridKind("square", "square", 100.0, None, "square, spots as wide as the pitch (100 µm unless --pitch-um)"))


def get_grid(name: str) -> GridKind:
    """The grid kind called ``name``."""
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; known: {', '.join(GRIDS)}")
    return GRIDS[name]


@dataclass
class SpotGrid:
    """Spots of a virtual grid on tissue.

    Attributes
    ----------
    kind
        Grid kind name.
    pitch_um, spot_diameter_um
        Geometry in µm.
    um_per_px
        Level-0 pixel size the grid was laid out with.
    spots
        Columns ``barcode`` (``r{row}c{col}``), ``x``, ``y`` (level-0 px),
        ``in_tissue`` (all true), ``array_row``, ``array_col``.
    """

    kind: str
    pitch_um: float
    spot_diameter_um: float
    um_per_px: float
    spots: pd.DataFrame

    @property
    def n_spots(self) -> int:
        """Number of spots on tissue."""
        return len(self.spots)


def make_grid(
    tissue: TissueMask,
    extent: tuple[float, float],
    um_per_px: float,
    kind: str = "visium",
    pitch_um: float | None = None,
    spot_diameter_um: float | None = None,
    where: str = "slide",
) -> SpotGrid:
    """Lay a grid over the image and keep the spots whose centre is on tissue.

    Parameters
    ----------
    tissue
        Tissue mask of the image.
    extent
        Image (width, height) in level-0 pixels.
    um_per_px
        µm per level-0 pixel.
    kind
        Key of :data:`GRIDS`.
    pitch_um
        Centre-to-centre distance overriding the kind's default.
    spot_diameter_um
        Spot diameter overriding the kind's.
    where
        Name of the slide, for error messages.

    Returns
    -------
    SpotGrid

    Raises
    ------
    InputError
        No grid point lies on the tissue.
    """
    grid = get_grid(kind)
    pitch = float(grid.pitch_um if pitch_um is None else pitch_um)
    if not (math.isfinite(pitch) and pitch > 0):
        raise ValueError(f"pitch must be a positive number of µm, got {pitch_um}")
    diameter = float(spot_diameter_um) if spot_diameter_um is not None else grid.diameter(pitch)
    # Whole pixels only: spot centres must stay inside the rounded image size.
    width, height = math.floor(extent[0]), math.floor(extent[1])
    rows, cols, x, y = LAYOUTS[grid.layout](width, height, pitch / um_per_px)
    on_tissue = tissue.contains(np.column_stack([x, y]))
    if not on_tissue.any():
        raise InputError(where, f"no {kind} grid spot ({pitch:g} µm pitch) lies on the detected tissue; try a smaller --pitch-um")
    rows, cols = rows[on_tissue], cols[on_tissue]
    spots = pd.DataFrame(
        {
            "barcode": [f"r{r}c{c}" for r, c in zip(rows.tolist(), cols.tolist())],
            "x": x[on_tissue],
            "y": y[on_tissue],
            "in_tissue": True,
            "array_row": rows.astype(np.int64),
            "array_col": cols.astype(np.int64),
        }
    )
    return SpotGrid(kind=grid.name, pitch_um=pitch, spot_diameter_um=diameter, um_per_px=float(um_per_px), spots=spots)
