"""Virtual spot grids: registry, lattice geometry, tissue filtering."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from virtualst.errors import InputError
from virtualst.predict.grid import GRIDS, GridKind, get_grid, make_grid, register_grid
from virtualst.predict.tissue import TissueMask

UM_PER_PX = 0.5
EXTENT = (4000.0, 3000.0)  # 2 x 1.5 mm at 0.5 µm/px


def full_tissue(shape=(300, 400)) -> TissueMask:
    """Everything is tissue; thumbnail 10x smaller than :data:`EXTENT`."""
    return TissueMask(np.ones(shape, dtype=bool), scale=shape[1] / EXTENT[0], threshold=0.1)


def neighbour_distances(spots, k: int) -> np.ndarray:
    xy = spots[["x", "y"]].to_numpy()
    distances, _ = cKDTree(xy).query(xy, k=k + 1)
    return distances[:, 1:]


def test_registry_holds_the_assay_geometries():
    assert {"visium", "st", "square"} <= set(GRIDS)
    assert (GRIDS["visium"].layout, GRIDS["visium"].pitch_um, GRIDS["visium"].diameter(100)) == ("hex", 100.0, 55.0)
    assert (GRIDS["st"].layout, GRIDS["st"].pitch_um, GRIDS["st"].diameter(200)) == ("square", 200.0, 100.0)
    assert GRIDS["square"].diameter(73.0) == 73.0  # spots as wide as the pitch
    with pytest.raises(ValueError, match="unknown grid 'hexagon'; known: visium, st, square"):
        get_grid("hexagon")
    with pytest.raises(ValueError, match="unknown layout 'triangle'"):
        register_grid(GridKind("tri", "triangle", 100.0))


def test_visium_grid_is_hexagonal_with_visium_array_coordinates():
    grid = make_grid(full_tissue(), EXTENT, UM_PER_PX)
    spots = grid.spots
    assert (grid.kind, grid.pitch_um, grid.spot_diameter_um) == ("visium", 100.0, 55.0)
    pitch_px = 100 / UM_PER_PX
    # Every spot's nearest neighbours are one pitch away; interior spots have six of them.
    six = neighbour_distances(spots, 6)
    np.testing.assert_allclose(six[:, 0], pitch_px)
    interior = (spots.x > 300) & (spots.x < 3700) & (spots.y > 300) & (spots.y < 2700)
    np.testing.assert_allclose(six[interior.to_numpy()], pitch_px)
    assert ((spots.array_row - spots.array_col) % 2 == 0).all()
    # Rows sqrt(3)/2 pitch apart; a column step is half a pitch.
    row0 = spots[spots.array_row == 0]
    np.testing.assert_allclose(np.diff(np.sort(spots.y.unique())), pitch_px * math.sqrt(3) / 2)
    np.testing.assert_allclose(np.diff(row0.x.to_numpy()), pitch_px)
    assert list(spots.barcode[:2]) == [f"r{r}c{c}" for r, c in zip(spots.array_row[:2], spots.array_col[:2])]
    assert spots.barcode.is_unique and spots.in_tissue.all()
    # One spot per pitch^2 * sqrt(3)/2 of area.
    expected = EXTENT[0] * EXTENT[1] / (pitch_px**2 * math.sqrt(3) / 2)
    assert grid.n_spots == pytest.approx(expected, rel=0.03)


def test_lattice_is_centred_inside_the_image():
    spots = make_grid(full_tissue(), EXTENT, UM_PER_PX).spots
    assert spots.x.min() > 0 and spots.y.min() > 0 and spots.x.max() < EXTENT[0] and spots.y.max() < EXTENT[1]
    assert spots.x.min() == pytest.approx(EXTENT[0] - spots.x.max())
    assert spots.y.min() == pytest.approx(EXTENT[1] - spots.y.max())


@pytest.mark.parametrize(("kind", "pitch_um", "diameter"), [("st", None, 100.0), ("square", None, 100.0), ("square", 50.0, 50.0)])
def test_square_grids(kind, pitch_um, diameter):
    grid = make_grid(full_tissue(), EXTENT, UM_PER_PX, kind=kind, pitch_um=pitch_um)
    pitch = pitch_um or GRIDS[kind].pitch_um
    assert (grid.pitch_um, grid.spot_diameter_um) == (pitch, diameter)
    np.testing.assert_allclose(neighbour_distances(grid.spots, 4)[:, 0], pitch / UM_PER_PX)
    n_cols, n_rows = grid.spots.array_col.nunique(), grid.spots.array_row.nunique()
    assert grid.n_spots == n_cols * n_rows == math.floor(EXTENT[0] * UM_PER_PX / pitch) * math.floor(EXTENT[1] * UM_PER_PX / pitch)


def test_pitch_override_keeps_the_visium_spot_size():
    grid = make_grid(full_tissue(), EXTENT, UM_PER_PX, pitch_um=150.0)
    assert (grid.pitch_um, grid.spot_diameter_um) == (150.0, 55.0)
    np.testing.assert_allclose(neighbour_distances(grid.spots, 1)[:, 0], 300.0)
    with pytest.raises(ValueError, match="pitch must be a positive"):
        make_grid(full_tissue(), EXTENT, UM_PER_PX, pitch_um=0.0)


def test_only_spots_centred_on_tissue_are_kept():
    mask = np.zeros((300, 400), dtype=bool)
    mask[:, :200] = True  # left half of the image
    mask[100:120, 300:320] = True  # a 200 px (100 µm) square island on the right
    tissue = TissueMask(mask, scale=0.1, threshold=0.1)
    full = make_grid(full_tissue(), EXTENT, UM_PER_PX, kind="square")
    spots = make_grid(tissue, EXTENT, UM_PER_PX, kind="square").spots
    right = spots[spots.x >= 2000]
    assert len(right) == 1 and 3000 <= right.x.iloc[0] < 3200 and 1000 <= right.y.iloc[0] < 1200
    assert len(spots) - 1 == (full.spots.x < 2000).sum()
    assert tissue.contains(spots[["x", "y"]].to_numpy()).all()


def test_no_spot_on_tissue_is_an_input_error():
    mask = np.zeros((300, 400), dtype=bool)
    mask[0, 0] = True  # a speck between lattice points
    with pytest.raises(InputError, match=r"slide.svs: no st grid spot \(200 µm pitch\) lies on the detected tissue; try a smaller --pitch-um"):
        make_grid(TissueMask(mask, scale=0.1, threshold=0.1), EXTENT, UM_PER_PX, kind="st", where="slide.svs")
