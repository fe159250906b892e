"""Standardisation + PCA of embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from virtualst.heads.features import FeatureTransform


@parametrize_with_checks([FeatureTransform(n_components=2), FeatureTransform(n_components=None)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_matches_standard_scaler_and_pca_up_to_sign():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20)) + 5
    ours = FeatureTransform(n_components=5).fit(X).transform(X)
    scaled = StandardScaler().fit_transform(X)
    theirs = PCA(n_components=5, svd_solver="full").fit_transform(scaled)
    np.testing.assert_allclose(np.abs(ours), np.abs(theirs), atol=1e-8)
    np.testing.assert_allclose(FeatureTransform(n_components=None).fit_transform(X), scaled, atol=1e-10)


def test_constant_feature_and_component_cap():
    X = np.column_stack([np.arange(10.0), np.full(10, 3.0)])
    out = FeatureTransform(n_components=None).fit_transform(X)
    assert np.all(np.isfinite(out)) and np.allclose(out[:, 1], 0)
    assert FeatureTransform(n_components=256).fit(X).n_features_out_ == 2


def test_rarely_active_feature_cannot_explode_a_test_spot():
    """An encoder feature active in one training spot of 250 (std ~1e-3) used to give z-scores in the hundreds."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(250, 6))
    X[:, 5] = 0.0
    X[7, 5] = 0.02
    spot = np.zeros((1, 6))
    spot[0, 5] = 0.3
    floored = FeatureTransform(n_components=None).fit(X)
    assert floored.scale_[5] == pytest.approx(0.1 * np.median(X.std(axis=0)))
    assert abs(floored.transform(spot)[0, 5]) < 5
    plain = FeatureTransform(n_components=None, min_scale=0.0).fit(X)
    assert abs(plain.transform(spot)[0, 5]) > 200
    np.testing.assert_allclose(plain.transform(X), StandardScaler().fit_transform(X), atol=1e-10)


@pytest.mark.parametrize("n_components", [3, None])
def test_export_restore_round_trip(n_components):
    X = np.random.default_rng(2).normal(size=(50, 6))
    fitted = FeatureTransform(n_components=n_components).fit(X)
    restored = FeatureTransform(n_components=n_components).restore_arrays(fitted.export_arrays("f."), "f.")
    np.testing.assert_array_equal(restored.transform(X), fitted.transform(X))


def test_fewer_spots_than_features_gives_the_covariance_axes():
    """The Gram-matrix path (n < d) finds the same components and variances as the covariance path."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(40, 90)) @ rng.normal(size=(90, 90))
    fitted = FeatureTransform(n_components=20, min_scale=0.0).fit(X)
    Z = StandardScaler().fit_transform(X)
    values, vectors = np.linalg.eigh(Z.T @ Z / 39)
    order = np.argsort(values)[::-1][:20]
    np.testing.assert_allclose(fitted.explained_variance_, values[order], rtol=1e-8)
    np.testing.assert_allclose(np.abs(fitted.components_), np.abs(vectors[:, order].T), atol=1e-8)
    # Centred data of 40 spots spans 39 axes: the undetermined 40th is dropped, not invented.
    assert FeatureTransform(n_components=256).fit(X).n_features_out_ == 39
