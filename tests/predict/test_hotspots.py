"""Getis-Ord Gi* hotspots: the formula, FDR control, and awkward inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control

from virtualst.predict.hotspots import (
    DEFAULT_RADIUS_PITCHES,
    bh_qvalues,
    default_radius_um,
    distance_band_weights,
    gi_star,
    hotspots,
    hotspots_many,
    spot_coords_um,
)


def square_grid(side: int, pitch: float = 100.0) -> np.ndarray:
    """``side`` × ``side`` spot centres (µm), row by row."""
    ii, jj = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    return np.column_stack([jj.ravel() * pitch, ii.ravel() * pitch]).astype(np.float64)


def hex_grid(rows: int, cols: int, pitch: float = 100.0) -> np.ndarray:
    """Visium-like hexagonal lattice: odd rows shifted by half a pitch."""
    pts = [(c * pitch + (r % 2) * pitch / 2, r * pitch * np.sqrt(3) / 2) for r in range(rows) for c in range(cols)]
    return np.asarray(pts, dtype=np.float64)


def gi_star_brute_force(x: np.ndarray, coords: np.ndarray, radius: float) -> np.ndarray:
    """Getis & Ord (1992) G*_i as a ratio with its randomisation mean and variance, by explicit loops.

    ``G*_i = sum_j w_ij x_j / sum_j x_j`` (j over all spots, i included),
    ``E = W*_i / n``, ``Var = W*_i (n - W*_i) / (n^2 (n - 1)) * Y2 / Y1^2``
    with ``Y1 = sum x / n`` and ``Y2 = sum x^2 / n - Y1^2`` (binary weights,
    positive x). An independent route to the z-score the module computes.
    """
    n = len(x)
    y1 = x.sum() / n
    y2 = (x**2).sum() / n - y1**2
    z = np.empty(n)
    for i in range(n):
        w = np.array([1.0 if np.hypot(*(coords[i] - coords[j])) <= radius else 0.0 for j in range(n)])
        big_w = w.sum()
        g = (w * x).sum() / x.sum()
        expected = big_w / n
        variance = big_w * (n - big_w) / (n**2 * (n - 1)) * y2 / y1**2
        z[i] = (g - expected) / np.sqrt(variance)
    return z


def test_gi_star_matches_brute_force_formula():
    rng = np.random.default_rng(1)
    coords = rng.uniform(0, 1000, size=(45, 2))
    x = rng.gamma(2.0, 3.0, size=45) + 0.5  # positive, as the ratio form needs
    radius = 260.0
    weights = distance_band_weights(coords, radius)
    assert weights.diagonal().tolist() == [1.0] * 45
    np.testing.assert_allclose(gi_star(x, weights), gi_star_brute_force(x, coords, radius), rtol=1e-10, atol=1e-10)
    table = hotspots(x, coords, radius_um=radius)
    np.testing.assert_allclose(table["gi_z"].dropna(), gi_star_brute_force(x, coords, radius)[table["n_neighbours"] > 0], rtol=1e-10)


def test_gi_star_is_shift_and_scale_invariant():
    rng = np.random.default_rng(2)
    coords = square_grid(8)
    x = rng.normal(size=64)
    w = distance_band_weights(coords, 150.0)
    np.testing.assert_allclose(gi_star(x, w), gi_star(1e6 + 3.0 * x, w), rtol=1e-7, atol=1e-9)


def test_planted_cluster_is_hot_and_only_there():
    rng = np.random.default_rng(3)
    coords = square_grid(20)
    x = rng.normal(size=400)
    rows, cols = coords[:, 1] / 100, coords[:, 0] / 100
    block = (rows >= 8) & (rows < 12) & (cols >= 8) & (cols < 12)
    x[block] += 3.0
    table = hotspots(x, coords)
    hot = table["hotspot"].to_numpy() == "hot"
    assert hot[block].mean() >= 0.75, "most of the planted block must be called hot"
    near_block = (rows >= 7) & (rows < 13) & (cols >= 7) & (cols < 13)  # its first ring shares the signal
    assert hot[~near_block].sum() <= 3
    assert (table["hotspot"] == "cold").sum() <= 3
    assert table.loc[hot, "q"].max() <= 0.05


def test_pure_noise_gives_almost_no_hotspots():
    coords = square_grid(15)
    n_with_any = 0
    for seed in range(10):
        x = np.random.default_rng(100 + seed).normal(size=len(coords))
        n_with_any += int((hotspots(x, coords)["hotspot"] != "").any())
    # BH at 5% bounds the chance of any call under the global null near 5% (positive dependence).
    assert n_with_any <= 2


def test_cold_cluster_is_cold():
    rng = np.random.default_rng(4)
    coords = hex_grid(16, 16)
    x = rng.normal(size=len(coords))
    centre = np.array([800.0, 700.0])
    low = np.hypot(*(coords - centre).T) < 250
    x[low] -= 3.0
    table = hotspots(x, coords)
    assert (table["hotspot"].to_numpy()[low] == "cold").mean() >= 0.7
    assert (table["hotspot"] == "hot").sum() <= 2


def test_bh_qvalues_match_scipy_and_keep_nan():
    rng = np.random.default_rng(5)
    p = rng.uniform(size=200) ** 3
    np.testing.assert_allclose(bh_qvalues(p), false_discovery_control(p, method="bh"), rtol=1e-12)
    with_nan = p.copy()
    with_nan[[3, 50, 199]] = np.nan
    q = bh_qvalues(with_nan)
    finite = np.isfinite(with_nan)
    assert np.isnan(q[~finite]).all()
    np.testing.assert_allclose(q[finite], false_discovery_control(with_nan[finite], method="bh"), rtol=1e-12)
    assert np.isnan(bh_qvalues(np.array([np.nan]))).all()
    assert bh_qvalues(np.array([])).shape == (0,)


def test_constant_values_give_no_hotspots_and_no_nan():
    coords = square_grid(6)
    table = hotspots(np.full(36, 2.5), coords)
    assert (table["hotspot"] == "").all()
    assert np.isfinite(table["gi_z"]).all() and (table["gi_z"] == 0).all()
    assert (table["p"] == 1).all() and (table["q"] == 1).all()


def test_isolated_spot_is_not_tested():
    coords = np.vstack([square_grid(5), [[5000.0, 5000.0]]])
    x = np.r_[np.random.default_rng(6).normal(size=25), 50.0]  # an extreme value alone
    table = hotspots(x, coords)
    last = table.iloc[-1]
    assert last["n_neighbours"] == 0 and last["hotspot"] == ""
    assert np.isnan(last["gi_z"]) and np.isnan(last["p"]) and np.isnan(last["q"])
    assert np.isfinite(table["gi_z"].iloc[:-1]).all()


def test_single_spot_and_empty():
    one = hotspots([1.0], [[0.0, 0.0]])
    assert one["hotspot"].tolist() == [""] and one["n_neighbours"].tolist() == [0]
    empty = hotspots(np.empty(0), np.empty((0, 2)), radius_um=100.0)
    assert list(empty.columns) == ["gi_z", "p", "q", "hotspot", "n_neighbours"] and len(empty) == 0


def test_default_radius_takes_first_ring():
    square = square_grid(7)
    assert default_radius_um(square) == pytest.approx(DEFAULT_RADIUS_PITCHES * 100.0)
    centre = 3 * 7 + 3
    assert hotspots(np.arange(49.0), square)["n_neighbours"].iloc[centre] == 8  # 4 edges + 4 diagonals
    hexes = hex_grid(7, 7)
    assert hotspots(np.arange(49.0), hexes)["n_neighbours"].iloc[3 * 7 + 3] == 6


def test_series_index_attrs_and_validation():
    coords = square_grid(4)
    values = pd.Series(np.arange(16.0), index=[f"spot{i}" for i in range(16)])
    table = hotspots(values, coords, radius_um=150.0, fdr=0.1)
    assert table.index.tolist() == values.index.tolist()
    assert table.attrs == {"radius_um": 150.0, "fdr": 0.1}
    with pytest.raises(ValueError, match="non-finite"):
        hotspots(np.r_[np.nan, np.arange(15.0)], coords)
    with pytest.raises(ValueError, match="16 values"):
        hotspots(np.arange(16.0), coords[:10])
    with pytest.raises(ValueError, match="fdr"):
        hotspots(np.arange(16.0), coords, fdr=0)
    with pytest.raises(ValueError, match="radius"):
        hotspots(np.arange(16.0), coords, radius_um=-1)


def test_hotspots_many_matches_single_calls():
    rng = np.random.default_rng(7)
    coords = square_grid(6)
    scores = pd.DataFrame({"a": rng.normal(size=36), "b": rng.normal(size=36)}, index=[f"s{i}" for i in range(36)])
    many = hotspots_many(scores, coords)
    for name in scores:
        pd.testing.assert_frame_equal(many[name], hotspots(scores[name], coords))


def test_spot_coords_um():
    import anndata as ad

    adata = ad.AnnData(np.zeros((3, 1), dtype=np.float32))
    adata.obsm["spatial"] = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 20.0]])
    adata.uns["virtualst"] = {"um_per_px": 0.5}
    np.testing.assert_allclose(spot_coords_um(adata), [[0, 0], [5, 0], [0, 10]])
    del adata.uns["virtualst"]
    with pytest.raises(KeyError, match="um_per_px"):
        spot_coords_um(adata)
