"""EnsembleHead: simplex grid, blend scoring, weight choice, sklearn contract, round trip with children."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import check_is_fitted, validate_data

from virtualst.heads.base import HEADS, Head, make_head
from virtualst.heads.cv import pearson_per_gene
from virtualst.heads.ensemble import EnsembleHead, blend_scores, choose_blend, simplex_grid


class _LstsqHead(Head):
    """Test member: least squares on a subset of the columns; records the groups it was given."""

    kind = "test_ensemble_lstsq"

    def __init__(self, columns=None):
        self.columns = columns

    def _cols(self, X):
        return X if self.columns is None else X[:, list(self.columns)]

    def fit(self, X, Y, groups=None):
        X, Y = validate_data(self, X, Y, multi_output=True, y_numeric=True)
        self.y_ndim_ = np.ndim(Y)
        A = np.column_stack([self._cols(X), np.ones(len(X))])
        self.coef_ = np.linalg.lstsq(A, np.reshape(Y, (len(X), -1)), rcond=None)[0]
        self.groups_seen_ = None if groups is None else np.asarray(groups)
        return self

    def predict(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        P = np.column_stack([self._cols(X), np.ones(len(X))]) @ self.coef_
        return P[:, 0] if self.y_ndim_ == 1 else P

    def _export(self):
        return {"y_ndim": self.y_ndim_, "n_features_in": self.n_features_in_}, {"coef": self.coef_}, {}, {}

    def _restore(self, meta, arrays, texts, children):
        self.y_ndim_, self.n_features_in_, self.coef_ = meta["y_ndim"], meta["n_features_in"], arrays["coef"]


class _NoiseHead(Head):
    """Test member: pseudo-noise around the training mean (no ``groups`` in ``fit``).

    The noise is a hash-like function of each row, so predictions do not depend
    on the batch (sklearn checks subset and order invariance).
    """

    kind = "test_ensemble_noise"

    def __init__(self, seed=0):
        self.seed = seed

    def fit(self, X, Y):
        X, Y = validate_data(self, X, Y, multi_output=True, y_numeric=True)
        self.y_ndim_ = np.ndim(Y)
        self.mean_ = np.reshape(Y, (len(X), -1)).mean(axis=0)
        return self

    def predict(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        V = np.random.default_rng(self.seed).normal(size=(X.shape[1], len(self.mean_)))
        P = self.mean_ + np.sin(1e3 * (X @ V))
        return P[:, 0] if self.y_ndim_ == 1 else P

    def _export(self):
        return {"y_ndim": self.y_ndim_, "n_features_in": self.n_features_in_}, {"mean": self.mean_}, {}, {}

    def _restore(self, meta, arrays, texts, children):
        self.y_ndim_, self.n_features_in_, self.mean_ = meta["y_ndim"], meta["n_features_in"], arrays["mean"]


@pytest.fixture(scope="module", autouse=True)
def _unregister_test_heads():
    """Keep the test-only kinds out of the registry once this module is done."""
    yield
    for kind in (_LstsqHead.kind, _NoiseHead.kind):
        HEADS.pop(kind, None)


LSTSQ_NOISE = (("test_ensemble_lstsq", {}), ("test_ensemble_noise", {"seed": 1}))


@parametrize_with_checks([EnsembleHead(members=LSTSQ_NOISE, n_splits=2)])
def test_sklearn_contract(estimator, check):
    check(estimator)


def test_registered():
    assert isinstance(make_head("ensemble", members=LSTSQ_NOISE), EnsembleHead)


def test_simplex_grid():
    grid = simplex_grid(3, 0.1)
    assert grid.shape == (66, 3)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    assert grid.min() >= 0 and len({tuple(w) for w in grid}) == 66
    np.testing.assert_array_equal(grid[0], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(simplex_grid(1, 0.25), [[1.0]])
    with pytest.raises(ValueError, match="divide 1"):
        simplex_grid(2, 0.3)


def test_blend_scores_match_direct_computation():
    rng = np.random.default_rng(0)
    oof, Y = rng.normal(size=(3, 40, 4)), rng.normal(size=(40, 4))
    Y[:20, 3] = 2.0  # constant within the first fold: Pearson 0 there
    folds = [np.arange(20), np.arange(20, 40)]
    grid = simplex_grid(3, 0.25)
    pearson, mse = blend_scores(oof, Y, folds, grid)
    for k, w in enumerate(grid):
        blend = np.einsum("i,ing->ng", w, oof)
        np.testing.assert_allclose(pearson[k], np.mean([pearson_per_gene(Y[f], blend[f]) for f in folds], axis=0), atol=1e-12)
        np.testing.assert_allclose(mse[k], ((Y - blend) ** 2).mean(axis=0), atol=1e-12)


def test_choose_blend_breaks_ties_by_mse():
    pearson = np.array([[0.5, 0.0], [0.5, 0.0], [0.2, 0.0]])
    mse = np.array([[2.0, 3.0], [1.0, 2.0], [0.1, 1.0]])
    np.testing.assert_array_equal(choose_blend(pearson, mse), [1, 2])
    np.testing.assert_array_equal(choose_blend(pearson, mse, per_gene=False), [1, 1])


@pytest.mark.parametrize("per_gene", [True, False])
def test_weights_drop_a_noise_member(linear_data, per_gene):
    X, Y, groups = linear_data
    head = EnsembleHead(members=LSTSQ_NOISE, per_gene=per_gene, n_splits=3).fit(X, Y, groups=groups)
    assert head.weights_.shape == (2, Y.shape[1])
    np.testing.assert_array_equal(head.weights_[0], 1.0)
    assert np.all(head.member_scores_[0] > 0.9) and np.all(np.abs(head.member_scores_[1]) < 0.3)
    np.testing.assert_allclose(head.cv_score_, head.member_scores_[0])
    np.testing.assert_allclose(head.predict(X), head.members_[0].predict(X))


def test_weights_mix_complementary_members(linear_data):
    X, Y, groups = linear_data
    # Each member sees half of the features; together they explain more than either.
    members = (("test_ensemble_lstsq", {"columns": list(range(6))}), ("test_ensemble_lstsq", {"columns": list(range(6, 12))}))
    head = EnsembleHead(members=members, n_splits=4).fit(X, Y, groups=groups)
    np.testing.assert_allclose(head.weights_.sum(axis=0), 1.0)
    assert np.all((head.weights_ > 0) & (head.weights_ < 1))
    assert np.all(head.cv_score_ >= head.member_scores_.max(axis=0))


def test_groups_reach_only_members_that_take_them(linear_data):
    X, Y, groups = linear_data
    head = EnsembleHead(members=LSTSQ_NOISE, n_splits=2).fit(X, Y, groups=groups)
    np.testing.assert_array_equal(head.members_[0].groups_seen_, groups)
    with pytest.raises(ValueError, match="groups"):
        EnsembleHead(members=LSTSQ_NOISE).fit(X, Y, groups=groups[:-1])


@pytest.mark.parametrize("one_d", [False, True])
def test_state_round_trip_with_children(linear_data, one_d):
    X, Y, groups = linear_data
    Y = Y[:, 0] if one_d else Y
    head = EnsembleHead(members=LSTSQ_NOISE, weight_grid_step=0.5, n_splits=2).fit(X, Y, groups=groups)
    state = head.get_state()
    assert sorted(state.children) == ["member_0", "member_1"]
    assert state.children["member_1"].kind == "test_ensemble_noise"
    json.dumps(state.params), json.dumps(state.meta)  # JSON-able, members included
    restored = Head.from_state(state)
    assert isinstance(restored, EnsembleHead)
    np.testing.assert_array_equal(restored.weights_, head.weights_)
    np.testing.assert_array_equal(restored.predict(X), head.predict(X))
    assert restored.predict(X).shape == Y.shape


@pytest.mark.skipif(
    importlib.util.find_spec("virtualst.heads.ridge") is None or importlib.util.find_spec("virtualst.heads.knn") is None,
    reason="ridge/knn heads not written yet",
)
def test_default_members_ridge_and_knn(linear_data):
    import virtualst.heads.knn  # noqa: F401  (registers "knn")
    import virtualst.heads.ridge  # noqa: F401  (registers "ridge")

    X, Y, groups = linear_data
    head = EnsembleHead(n_splits=3).fit(X, Y, groups=groups)
    assert [m.kind for m in head.members_] == ["ridge", "knn"]
    np.testing.assert_allclose(head.weights_.sum(axis=0), 1.0)
    assert np.all(head.weights_[0] >= 0.5)  # the data are linear: ridge should lead
    restored = Head.from_state(head.get_state())
    np.testing.assert_allclose(restored.predict(X), head.predict(X), rtol=0, atol=1e-12)


def test_round_trip_with_lgbm_member_texts(linear_data):
    import virtualst.heads.lgbm  # noqa: F401  (registers "lgbm")

    X, Y, groups = linear_data
    lgbm = {"n_components": None, "n_estimators": 20, "learning_rate": 0.2, "min_child_samples": 5, "early_stopping_rounds": 5, "n_jobs": 1}
    head = EnsembleHead(members=(("lgbm", lgbm), ("test_ensemble_lstsq", {})), weight_grid_step=0.5, n_splits=2).fit(X, Y, groups=groups)
    state = head.get_state()
    assert sorted(state.children["member_0"].texts) == [f"gene_{j:04d}" for j in range(Y.shape[1])]
    restored = Head.from_state(state)
    np.testing.assert_array_equal(restored.predict(X), head.predict(X))


@pytest.mark.realdata
def test_ridge_knn_blend_on_her2st(her2st_split):
    import virtualst.heads.knn  # noqa: F401
    import virtualst.heads.ridge  # noqa: F401

    X_train, Y_train, groups, X_test, Y_test = her2st_split
    head = EnsembleHead().fit(X_train, Y_train, groups=groups)
    # The grid holds each pure member, so the chosen blend is never worse out of fold.
    assert np.all(head.cv_score_ >= head.member_scores_.max(axis=0) - 1e-9)
    r = pearson_per_gene(Y_test, head.predict(X_test))
    assert r.mean() > 0.2, r.mean()  # ~0.32 observed (ridge alone 0.32, kNN 0.32 on this split)
