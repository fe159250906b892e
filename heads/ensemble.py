"""Convex blends of heads, weighted per gene on out-of-fold predictions.

Every member is fitted on the inner folds of :func:`~virtualst.heads.cv.inner_splits`
(group-disjoint when ``groups`` are given), its out-of-fold predictions are
blended with every weight vector of a simplex grid, and the blend with the best
mean per-fold Pearson is kept (per gene, or one blend for all genes). The
members are then refitted on all spots.

Pearson and MSE of a blend ``P w`` only need, per fold and gene, the moments
``P'P``, ``P'y`` and ``y'y`` of the member predictions, so every grid point is
scored without ever forming a blended prediction.
"""

from __future__ import annotations

import inspect
from itertools import combinations
from typing import Any

import numpy as np
from sklearn.utils.validation import check_is_fitted, validate_data

from virtualst.heads.base import Head, make_head
from virtualst.heads.cv import inner_splits

#: Pearson values this close count as a tie, broken by the lower MSE.
PEARSON_TIE = 1e-9


def simplex_grid(n_members: int, step: float) -> np.ndarray:
    """Every weight vector with entries in multiples of ``step`` summing to 1.

    Parameters
    ----------
    n_members
        Length of each weight vector.
    step
        Grid spacing; ``1 / step`` must be a whole number.

    Returns
    -------
    ndarray (n_points, n_members)
        Ordered with the pure first member first; ``C(1/step + n_members - 1, n_members - 1)`` rows.
    """
    n = round(1.0 / step)
    if n < 1 or abs(n * step - 1.0) > 1e-9:
        raise ValueError(f"weight_grid_step must divide 1 (0.1, 0.25, 0.5...), got {step}")
    # Stars and bars: the bar positions split n units between the members.
    points = []
    for bars in combinations(range(n + n_members - 1), n_members - 1):
        edges = (-1, *bars, n + n_members - 1)
        points.append([edges[i + 1] - edges[i] - 1 for i in range(n_members)])
    return np.array(points[::-1], dtype=np.float64) / n


def blend_scores(oof: np.ndarray, Y: np.ndarray, folds: list[np.ndarray], grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean per-fold Pearson and pooled MSE of every grid blend, per gene.

    Parameters
    ----------
    oof : ndarray (n_members, n_spots, n_targets)
        Out-of-fold predictions of each member.
    Y : ndarray (n_spots, n_targets)
    folds
        Validation indices of each fold (a partition of the spots).
    grid : ndarray (n_points, n_members)

    Returns
    -------
    pearson, mse : ndarray (n_points, n_targets)
        Pearson is 0 where the blend or the target is constant in a fold.
    """
    pearson = np.zeros((len(grid), Y.shape[1]))
    sq_err = np.zeros_like(pearson)
    for idx in folds:
        P, y = oof[:, idx], Y[idx]
        # Uncentred moments give the MSE, centred ones the Pearson.
        raw = np.einsum("ki,gij,kj->kg", grid, np.einsum("ing,jng->gij", P, P), grid)
        sq_err += (y * y).sum(axis=0) + raw - 2 * grid @ np.einsum("ing,ng->gi", P, y).T
        Pc, yc = P - P.mean(axis=1, keepdims=True), y - y.mean(axis=0)
        var = np.einsum("ki,gij,kj->kg", grid, np.einsum("ing,jng->gij", Pc, Pc), grid)
        cov = grid @ np.einsum("ing,ng->gi", Pc, yc).T
        y_var = (yc * yc).sum(axis=0)
        # Constant blends/targets leave round-off-sized variances: score them 0, not noise.
        ok = (var > 1e-20 * raw) & (y_var > 1e-20 * (y * y).sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            pearson += np.where(ok, cov / np.sqrt(np.where(ok, var * y_var, 1.0)), 0.0)
    return pearson / len(folds), np.maximum(sq_err, 0.0) / len(Y)


def choose_blend(pearson: np.ndarray, mse: np.ndarray, per_gene: bool = True) -> np.ndarray:
    """Index of the chosen grid point per gene: highest Pearson, ties to the lowest MSE.

    Parameters
    ----------
    pearson, mse : ndarray (n_points, n_targets)
        Scores from :func:`blend_scores`.
    per_gene
        ``False`` scores each grid point by its mean over genes and returns
        the same point for every gene.
    """
    n_targets = pearson.shape[1]
    if not per_gene:
        pearson, mse = pearson.mean(axis=1, keepdims=True), mse.mean(axis=1, keepdims=True)
    best = np.where(pearson >= pearson.max(axis=0) - PEARSON_TIE, mse, np.inf).argmin(axis=0)
    return np.broadcast_to(best, (n_targets,)).copy()


def _fit_member(head: Head, X, Y, groups) -> Head:
    """Fit ``head``, passing ``groups`` only to heads whose ``fit`` takes it."""
    if groups is not None and "groups" in inspect.signature(head.fit).parameters:
        return head.fit(X, Y, groups=groups)
    return head.fit(X, Y)


class EnsembleHead(Head):
    """Non-negative, sum-to-one blend of member heads, chosen by inner cross-validation.

    Parameters
    ----------
    members
        ``(kind, params)`` pairs, each built with
        :func:`~virtualst.heads.base.make_head`; JSON-able.
    weight_grid_step
        Spacing of the simplex grid of candidate weights (``1/step`` whole).
    per_gene
        Choose a blend per gene; ``False`` chooses one blend for all genes
        (by the mean over genes), which is steadier with few spots.
    n_splits
        Inner folds (group-disjoint when ``groups`` has >= 2 labels).
    random_state
        Seed of the ungrouped inner folds.

    Attributes
    ----------
    members_ : list of Head
        The members refitted on all spots.
    weights_ : ndarray (n_members, n_targets)
        Blend weights, columns on the simplex.
    cv_score_ : ndarray (n_targets,)
        Out-of-fold Pearson (mean over folds) of the chosen blend per gene.
    member_scores_ : ndarray (n_members, n_targets)
        Out-of-fold Pearson of each member alone.
    n_features_in_ : int
    y_ndim_ : int
        1 when fitted on a 1-D ``y`` (predictions are then 1-D).

    Notes
    -----
    Weights maximise Pearson (the benchmark metric, averaged over folds so
    that each held-out section is scored on its own, as at test time); ties,
    e.g. genes no member predicts at all, go to the blend with the lowest
    out-of-fold MSE. Members are regressors, so the blends stay calibrated.
    """

    kind = "ensemble"

    def __init__(
        self,
        members: tuple[tuple[str, dict[str, Any]], ...] = (("ridge", {}), ("knn", {})),
        weight_grid_step: float = 0.1,
        per_gene: bool = True,
        n_splits: int = 5,
        random_state: int = 0,
    ) -> None:
        self.members = members
        self.weight_grid_step = weight_grid_step
        self.per_gene = per_gene
        self.n_splits = n_splits
        self.random_state = random_state

    def _new_members(self) -> list[Head]:
        if not self.members:
            raise ValueError("EnsembleHead needs at least one member")
        return [make_head(kind, **dict(params)) for kind, params in self.members]

    def fit(self, X, Y, groups=None):
        """Choose the blend weights out of fold, then refit every member on all spots.

        Parameters
        ----------
        X : array-like (n_spots, n_features)
        Y : array-like (n_spots,) or (n_spots, n_targets)
        groups : array-like (n_spots,), optional
            Section/patient ids: inner folds never split a group, and members
            whose ``fit`` takes ``groups`` receive them.
        """
        X, Y, groups = self._fit_data(X, Y, groups, min_samples=2)
        members = self._new_members()
        grid = simplex_grid(len(members), self.weight_grid_step)

        splits = inner_splits(len(X), groups, self.n_splits, self.random_state)
        oof = np.zeros((len(members), *Y.shape))
        for train, valid in splits:
            for m, template in enumerate(self._new_members()):
                fitted = _fit_member(template, X[train], Y[train], None if groups is None else groups[train])
                oof[m][valid] = np.asarray(fitted.predict(X[valid])).reshape(len(valid), -1)
        folds = [valid for _, valid in splits]
        pearson, mse = blend_scores(oof, Y, folds, grid)
        best = choose_blend(pearson, mse, self.per_gene)
        self.weights_ = grid[best].T.copy()
        self.cv_score_ = pearson[best, np.arange(Y.shape[1])]
        self.member_scores_ = blend_scores(oof, Y, folds, np.eye(len(members)))[0]

        self.members_ = [_fit_member(m, X, Y, groups) for m in members]
        return self

    def predict(self, X) -> np.ndarray:
        """Weighted sum of the members' predictions (1-D when fitted on a 1-D ``y``)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        P = np.zeros((len(X), self.weights_.shape[1]))
        for m, head in enumerate(self.members_):
            w = self.weights_[m]
            if np.any(w > 0):  # members with zero weight everywhere are not run
                P += w * np.asarray(head.predict(X)).reshape(len(X), -1)
        return self._as_fitted_shape(P)

    # ------------------------------------------------------------------ state
    def _export(self):
        meta = {"y_ndim": int(self.y_ndim_), "n_features_in": int(self.n_features_in_)}
        arrays = {"weights": self.weights_, "cv_score": self.cv_score_, "member_scores": self.member_scores_}
        return meta, arrays, {}, {f"member_{m}": head for m, head in enumerate(self.members_)}

    def _restore(self, meta, arrays, texts, children):
        self.y_ndim_ = int(meta["y_ndim"])
        self.n_features_in_ = int(meta["n_features_in"])
        self.weights_ = np.asarray(arrays["weights"], dtype=np.float64)
        self.cv_score_ = np.asarray(arrays["cv_score"], dtype=np.float64)
        self.member_scores_ = np.asarray(arrays["member_scores"], dtype=np.float64)
        self.members_ = [children[f"member_{m}"] for m in range(len(self.weights_))]
