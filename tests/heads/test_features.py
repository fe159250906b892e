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


@pytest.mark.parametrize("n_components", [3, None])
def test_export_restore_round_trip(n_components):
    X = np.random.default_rng(2).normal(size=(50, 6))
    fitted = FeatureTransform(n_components=n_components).fit(X)
    restored = FeatureTransform(n_components=n_components).restore_arrays(fitted.export_arrays("f."), "f.")
    np.testing.assert_array_equal(restored.transform(X), fitted.transform(X))
