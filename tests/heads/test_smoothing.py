"""Spot graphs, context features and prediction smoothing (virtualst.heads.smoothing)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from virtualst.heads.cv import pearson_per_gene
from virtualst.heads.smoothing import (
    FeatureContext,
    PredictionSmoother,
    _gaussian_weights,
    neighbour_graph,
    spot_pitch_um,
)


def square_grid(nx: int, ny: int, pitch: float = 200.0) -> np.ndarray:
    """ST-like square grid, row-major."""
    x, y = np.meshgrid(np.arange(nx), np.arange(ny))
    return pitch * np.column_stack([x.ravel(), y.ravel()]).astype(float)


def hex_grid(nx: int, ny: int, pitch: float = 100.0) -> np.ndarray:
    """Visium-like hexagonal grid: odd rows shifted by half a pitch."""
    x, y = np.meshgrid(np.arange(nx), np.arange(ny))
    xs = pitch * (x + 0.5 * (y % 2))
    ys = pitch * np.sqrt(3) / 2 * y
    return np.column_stack([xs.ravel(), ys.ravel()])


def degrees(graph) -> np.ndarray:
    return np.diff(graph.indptr)


# ---------------------------------------------------------------- pitch, graph
@pytest.mark.parametrize("grid, pitch", [(square_grid(6, 5), 200.0), (hex_grid(7, 6), 100.0)])
def test_pitch_of_regular_grids(grid, pitch):
    assert spot_pitch_um(grid) == pytest.approx(pitch)


def test_pitch_is_robust_and_needs_two_spots():
    coords = np.vstack([square_grid(6, 6), [[5000.0, 5000.0], [5010.0, 5000.0]]])  # a stray close pair
    assert spot_pitch_um(coords) == pytest.approx(200.0)
    with pytest.raises(ValueError, match="at least 2 spots"):
        spot_pitch_um(np.zeros((1, 2)))


@pytest.mark.parametrize("grid, ring", [(square_grid(7, 7), 4), (hex_grid(9, 9), 6)])
def test_default_radius_takes_first_ring(grid, ring):
    graph = neighbour_graph(grid)
    pitch = spot_pitch_um(grid)
    interior = np.all((grid > grid.min(axis=0) + 1.5 * pitch) & (grid < grid.max(axis=0) - 1.5 * pitch), axis=1)
    assert interior.sum() > 5
    assert np.all(degrees(graph)[interior] == ring)
    assert degrees(graph).max() == ring
    # first ring only: every edge has length one pitch
    rows, cols = graph.nonzero()
    assert np.allclose(np.linalg.norm(grid[rows] - grid[cols], axis=1), pitch)


def test_rows_sum_to_one_no_self_and_gaussian_weights():
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 1000, size=(60, 2))
    radius, sigma = 250.0, 120.0
    graph = neighbour_graph(coords, radius_um=radius, sigma_um=sigma)
    assert graph.shape == (60, 60)
    assert np.all(graph.diagonal() == 0)
    sums = np.asarray(graph.sum(axis=1)).ravel()
    has = degrees(graph) > 0
    assert np.allclose(sums[has], 1.0) and np.all(sums[~has] == 0)
    # brute force: exp(-d²/2σ²) within the radius, self excluded, rows normalised
    d = cdist(coords, coords)
    w = np.where((d <= radius) & ~np.eye(60, dtype=bool), np.exp(-(d**2) / (2 * sigma**2)), 0.0)
    w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
    assert np.allclose(graph.toarray(), w)


def test_raw_weights_are_symmetric():
    coords = np.random.default_rng(1).uniform(0, 800, size=(40, 2))
    raw = _gaussian_weights(coords, 200.0, 100.0, None).toarray()
    assert np.allclose(raw, raw.T)
    assert raw.max() <= 1.0 and np.all(np.diag(raw) == 0)


def test_isolated_spot_gets_empty_row():
    coords = np.vstack([square_grid(3, 3), [[5000.0, 5000.0]]])
    graph = neighbour_graph(coords)
    assert degrees(graph)[-1] == 0 and graph[:, -1].nnz == 0
    assert np.allclose(np.asarray(graph.sum(axis=1)).ravel()[:-1], 1.0)


def test_knn_graph():
    coords = square_grid(5, 5)
    graph = neighbour_graph(coords, k=3)
    assert np.all(degrees(graph) == 3) and np.all(graph.diagonal() == 0)
    assert np.allclose(np.asarray(graph.sum(axis=1)).ravel(), 1.0)
    assert np.all(degrees(neighbour_graph(coords[:3], k=10)) == 2)  # capped at n - 1


# ---------------------------------------------------------------- FeatureContext
def test_feature_context_values_on_tiny_grid():
    coords = square_grid(3, 3)  # centre spot 4 has 4 neighbours, corners 2, edges 3
    features = np.arange(9 * 2, dtype=np.float32).reshape(9, 2) ** 1.5
    ctx = FeatureContext()
    out = ctx.transform(features, coords)
    assert out.shape == (9, ctx.n_outputs(2)) == (9, 6) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :2], features)
    first_ring = {0: [1, 3], 1: [0, 2, 4], 4: [1, 3, 5, 7], 8: [5, 7]}
    for spot, nbrs in first_ring.items():
        np.testing.assert_allclose(out[spot, 2:4], features[nbrs].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(out[:, 4:], np.broadcast_to(features.mean(axis=0), (9, 2)), rtol=1e-6)


def test_feature_context_isolated_spot_and_options():
    coords = np.vstack([square_grid(2, 2), [[3000.0, 0.0]]])
    features = np.random.default_rng(0).normal(size=(5, 3))
    out = FeatureContext(include_global=False).transform(features, coords)
    assert out.shape == (5, 6)
    np.testing.assert_allclose(out[-1, 3:], features[-1])  # no neighbours: its own features
    only = FeatureContext(include_neighbours=False, include_global=False)
    assert only.n_outputs(3) == 3
    np.testing.assert_array_equal(only.transform(features, coords), features)
    with pytest.raises(ValueError, match="rows"):
        FeatureContext().transform(features[:4], coords)


def test_feature_context_dict_round_trip():
    ctx = FeatureContext(radius_um=250.0, include_global=False)
    back = FeatureContext.from_dict(json.loads(json.dumps(ctx.to_dict())))
    assert back == ctx
    with pytest.raises(ValueError, match="unknown"):
        FeatureContext.from_dict({"radius": 3.0})


# ---------------------------------------------------------------- PredictionSmoother
def smooth_field(coords: np.ndarray, n_genes: int, seed: int) -> np.ndarray:
    """Spatially smooth truth: sums of long-wavelength sinusoids."""
    rng = np.random.default_rng(seed)
    freq = rng.uniform(0.5, 2.0, size=(2, n_genes)) / 2000.0
    phase = rng.uniform(0, 2 * np.pi, size=n_genes)
    return np.sin(coords @ freq * 2 * np.pi + phase) + 0.5 * np.cos(coords @ freq[::-1] * 2 * np.pi)


def synthetic_samples(noise: float, n_samples: int = 3, n_genes: int = 4):
    rng = np.random.default_rng(42)
    coords = [square_grid(15, 15) + rng.uniform(-10, 10, size=(225, 2)) for _ in range(n_samples)]
    truths = [smooth_field(c, n_genes, seed=i) for i, c in enumerate(coords)]
    preds = [t + noise * rng.normal(size=t.shape) for t in truths]
    return preds, truths, coords


def test_smoother_helps_noisy_predictions_and_leaves_truth_alone():
    preds, truths, coords = synthetic_samples(noise=0.7)
    truths_before = [t.copy() for t in truths]
    preds_before = [p.copy() for p in preds]
    smoother = PredictionSmoother().fit(preds, truths, coords)
    for t, t0 in zip(truths, truths_before):
        np.testing.assert_array_equal(t, t0)
    for p, p0 in zip(preds, preds_before):
        np.testing.assert_array_equal(p, p0)
    assert smoother.strength_.shape == (4,) and np.all(smoother.strength_ > 0)
    assert np.all(smoother.cv_pearson_after_ > smoother.cv_pearson_before_ + 0.02)
    # the reported scores are what transform gives
    out = np.concatenate([smoother.transform(p, c) for p, c in zip(preds, coords)])
    np.testing.assert_allclose(pearson_per_gene(np.concatenate(truths), out), smoother.cv_pearson_after_)


def test_smoother_keeps_perfect_predictions():
    preds, truths, coords = synthetic_samples(noise=0.0)
    smoother = PredictionSmoother(per_gene=False).fit(preds, truths, coords)
    assert np.all(smoother.strength_ == 0)
    np.testing.assert_allclose(smoother.cv_pearson_after_, 1.0)
    np.testing.assert_array_equal(smoother.transform(preds[0], coords[0]), preds[0])


def test_smoother_ties_pick_smallest_strength():
    # constant predictions: every λ scores 0, so λ must be the smallest candidate
    coords = [square_grid(4, 4)]
    truth = [np.random.default_rng(0).normal(size=(16, 2))]
    smoother = PredictionSmoother(strengths=(1.0, 0.5, 0.25)).fit([np.ones((16, 2))], truth, coords)
    np.testing.assert_array_equal(smoother.strength_, [0.25, 0.25])


def test_smoother_export_restore_round_trip():
    preds, truths, coords = synthetic_samples(noise=0.5)
    smoother = PredictionSmoother(strengths=(0.0, 0.3, 0.6, 0.9), sigma_um=150.0).fit(preds, truths, coords)
    params, arrays = smoother.export()
    back = PredictionSmoother.restore(json.loads(json.dumps(params)), {k: v.copy() for k, v in arrays.items()})
    np.testing.assert_array_equal(back.strength_, smoother.strength_)
    np.testing.assert_array_equal(back.transform(preds[1], coords[1]), smoother.transform(preds[1], coords[1]))


def test_smoother_errors():
    preds, truths, coords = synthetic_samples(noise=0.5, n_samples=2)
    with pytest.raises(ValueError, match="one of each per sample"):
        PredictionSmoother().fit(preds, truths[:1], coords)
    with pytest.raises(ValueError, match="rows"):
        PredictionSmoother().fit([preds[0][:-1], preds[1]], truths, coords)
    with pytest.raises(ValueError, match="gene count"):
        PredictionSmoother().fit([preds[0][:, :2], preds[1]], truths, coords)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PredictionSmoother(strengths=(0.0, 1.5))
    with pytest.raises(RuntimeError, match="not fitted"):
        PredictionSmoother().transform(preds[0], coords[0])
    smoother = PredictionSmoother().fit(preds, truths, coords)
    with pytest.raises(ValueError, match="genes"):
        smoother.transform(preds[0][:, :2], coords[0])
    with pytest.raises(ValueError, match="rows"):
        smoother.transform(preds[0], coords[0][:-1])


# ---------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_her2st_graph(her2st_sections):
    for section in her2st_sections:
        coords = section.coords_um
        pitch = spot_pitch_um(coords)
        assert 170.0 <= pitch <= 230.0, f"{section.sample.sample_id}: pitch {pitch:.1f} µm"  # ST: 200 µm ± 15%
        deg = degrees(neighbour_graph(coords))
        assert deg.max() <= 4  # first ring of a square grid, never the diagonals
        assert np.mean((deg >= 2) & (deg <= 4)) > 0.9, np.bincount(deg)
        out = FeatureContext().transform(section.features, coords)
        assert out.shape == (len(coords), 3 * 1280) and np.isfinite(out).all()
