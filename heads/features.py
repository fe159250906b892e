"""Standardisation and PCA of embeddings, fitted on training spots only."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

#: Default floor of a feature's scale, as a fraction of the median feature std.
MIN_SCALE = 0.1


def _principal_axes(Z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` principal axes (rows) and variances of centred ``Z``, by an exact eigendecomposition.

    With more spots than features the covariance (features × features) is
    decomposed; otherwise the Gram matrix (spots × spots), whose
    eigenvectors map to the same axes: ``v = Zᵀu / ‖Zᵀu‖``. Spatial context
    triples the embedding width (3 × 1280 features for ~500 spots on
    her2st), where this is ~100x cheaper. Axes of (numerically) zero
    variance are dropped on that path: they are not determined by the data.
    """
    n, d = Z.shape
    dof = max(n - 1, 1)
    if n >= d:
        values, vectors = np.linalg.eigh(Z.T @ Z / dof)
        order = np.argsort(values)[::-1][:k]
        return vectors[:, order].T, np.maximum(values[order], 0.0)
    values, vectors = np.linalg.eigh(Z @ Z.T / dof)
    order = np.argsort(values)[::-1][:k]
    values, vectors = values[order], vectors[:, order]
    keep = values > 1e-10 * max(float(values[0]), 1e-300)
    axes = Z.T @ vectors[:, keep]
    return (axes / np.linalg.norm(axes, axis=0)).T, values[keep]


class FeatureTransform(TransformerMixin, BaseEstimator):
    """Standardise features, then optionally project on the top principal components.

    Parameters
    ----------
    standardize
        Centre and scale each feature to unit variance (constant features
        are only centred). No feature is divided by less than
        ``min_scale`` times the median feature std: an encoder feature
        that is almost never active in training (std ~1e-6) would otherwise
        turn one test spot that activates it into a z-score in the
        thousands and wreck every prediction for that spot.
    min_scale
        Floor on a feature's scale, as a fraction of the median std of
        the non-constant features; 0 disables it (``StandardScaler``).
    n_components
        Principal components kept (HEST uses 256); ``None`` keeps the
        standardised features. Capped at ``min(n_samples, n_features)``.

    Attributes
    ----------
    mean_, scale_ : ndarray (n_features_in_,)
    components_ : ndarray (n_components_, n_features_in_) or None
        Orthonormal rows, signs fixed so the largest loading is positive
        (deterministic across BLAS builds).
    explained_variance_ : ndarray (n_components_,) or None
    n_features_out_ : int
    """

    def __init__(self, standardize: bool = True, n_components: int | None = 256, min_scale: float = MIN_SCALE) -> None:
        self.standardize = standardize
        self.n_components = n_components
        self.min_scale = min_scale

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=[np.float64, np.float32])
        X = X.astype(np.float64, copy=False)
        self.mean_ = X.mean(axis=0)
        if self.standardize:
            std = X.std(axis=0)
            varying = std > 1e-12 * max(1.0, float(np.abs(self.mean_).max()))
            floor = self.min_scale * float(np.median(std[varying])) if varying.any() else 0.0
            self.scale_ = np.where(varying, np.maximum(std, floor), 1.0)
        else:
            self.scale_ = np.ones(X.shape[1])
        self.components_ = self.explained_variance_ = None
        self.n_features_out_ = X.shape[1]
        if self.n_components is not None:
            Z = (X - self.mean_) / self.scale_
            components, values = _principal_axes(Z, int(min(self.n_components, *Z.shape)))
            k = len(components)
            signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
            self.components_ = components * signs[:, None]
            self.explained_variance_ = values
            self.n_features_out_ = k
        return self

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        Z = (X.astype(np.float64, copy=False) - self.mean_) / self.scale_
        return Z if self.components_ is None else Z @ self.components_.T

    # pickle-free state, used by the heads that own a FeatureTransform
    def export_arrays(self, prefix: str = "features.") -> dict[str, np.ndarray]:
        """Fitted arrays under ``prefix``."""
        check_is_fitted(self)
        out = {f"{prefix}mean": self.mean_, f"{prefix}scale": self.scale_}
        if self.components_ is not None:
            out[f"{prefix}components"] = self.components_
            out[f"{prefix}explained_variance"] = self.explained_variance_
        return out

    def restore_arrays(self, arrays: dict[str, np.ndarray], prefix: str = "features.") -> FeatureTransform:
        """Set the fitted attributes from :meth:`export_arrays` output."""
        self.mean_ = np.asarray(arrays[f"{prefix}mean"], dtype=np.float64)
        self.scale_ = np.asarray(arrays[f"{prefix}scale"], dtype=np.float64)
        self.components_ = arrays.get(f"{prefix}components")
        self.explained_variance_ = arrays.get(f"{prefix}explained_variance")
        self.n_features_in_ = len(self.mean_)
        self.n_features_out_ = self.n_features_in_ if self.components_ is None else len(self.components_)
        return self
