"""RidgeHead and its core ridge_loo: scikit-learn conformance, equality with RidgeCV, state, real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import RidgeCV
from sklearn.utils.estimator_checks import parametrize_with_checks

from virtualst.heads.base import Head, head_class
from virtualst.heads.cv import pearson_per_gene
from virtualst.heads.ridge import DEFAULT_ALPHAS, RidgeHead, onednn_available, ridge_loo

GRID = DEFAULT_ALPHAS


def regression(n: int, p: int, t: int = 12, seed: int = 0):
    """Features with a decaying spectrum and offsets; targets mixing signal and noise at varied levels."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * np.logspace(0.5, -1.5, p) + rng.normal(0, 3, p)
    coef = rng.standard_normal((p, t)) * rng.uniform(0.0, 1.0, t)
    Y = X @ coef + rng.standard_normal((n, t)) * rng.uniform(0.05, 3.0, t) + rng.normal(0, 5, t)
    return X, Y, rng.standard_normal((40, p)) + rng.normal(0, 3, p)


@parametrize_with_checks([RidgeHead(), RidgeHead(n_components=None, standardize=False, fit_intercept=False)])
def test_sklearn_conformance(estimator, check):
    check(estimator)


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("shape", [(150, 20), (30, 60)], ids=["n>p", "n<p"])
def test_same_as_ridgecv(shape, fit_intercept):
    X, Y, X_new = regression(*shape)
    ref = RidgeCV(alphas=GRID, alpha_per_target=True, fit_intercept=fit_intercept, store_cv_results=True).fit(X, Y)
    loo = ref.cv_results_.mean(axis=0).T  # (A, t)
    for prune in (False, True):
        got = ridge_loo(X, Y, GRID, fit_intercept, backend="numpy", prune=prune)
        np.testing.assert_array_equal(got.alpha, ref.alpha_)
        np.testing.assert_allclose(X_new @ got.coef.T + got.intercept, ref.predict(X_new), rtol=0, atol=1e-8)
        # The LOO table is scored in float32 (re-scored in float64 near ties only); pruned pairs are NaN.
        assert got.scored.all() if not prune else got.scored.any()
        np.testing.assert_array_equal(np.isnan(got.mse), ~got.scored)
        np.testing.assert_allclose(got.mse[got.scored], loo[got.scored], rtol=1e-3)
        assert got.flops["total"] > got.flops["loo_f32"] > 0

    # The head centres its features (FeatureTransform), so without intercept it matches RidgeCV on centred X.
    head = RidgeHead(standardize=False, n_components=None, fit_intercept=fit_intercept).fit(X, Y)
    Z, Z_new = X - X.mean(axis=0), X_new - X.mean(axis=0)
    ref = RidgeCV(alphas=GRID, alpha_per_target=True, fit_intercept=fit_intercept).fit(Z, Y)
    np.testing.assert_array_equal(head.alpha_, ref.alpha_)
    np.testing.assert_allclose(head.predict(X_new), ref.predict(Z_new), rtol=0, atol=1e-8)
    np.testing.assert_allclose(head.cv_mse_, -ref.best_score_, rtol=1e-4)  # float32 scores


def _designs():
    """(X, Y, fit_intercept) of varied conditioning: n > p, n < p, duplicated and constant columns, no intercept."""
    X, Y, _ = regression(150, 20, t=30, seed=1)
    yield X, Y, True
    yield X, Y, False
    X, Y, _ = regression(30, 60, t=30, seed=2)
    yield X, Y, True
    X, Y, _ = regression(80, 10, t=30, seed=3)
    yield np.hstack([X, X[:, :3], np.ones((80, 2))]), Y, True
    X, Y, _ = regression(400, 40, t=30, seed=4)
    X[:5] *= 30.0  # a few high-leverage spots: wide bounds
    yield X, Y, True


@pytest.mark.parametrize("exact_rows", [0, 4, 64])
@pytest.mark.parametrize("case", range(5))
def test_loo_bounds_hold_the_exact_scores(case, exact_rows, monkeypatch):
    from virtualst.heads import ridge as ridge_module

    monkeypatch.setattr(ridge_module, "_EXACT_ROWS", exact_rows)
    X, Y, fit_intercept = list(_designs())[case]
    exact = RidgeCV(alphas=GRID, alpha_per_target=True, fit_intercept=fit_intercept, store_cv_results=True).fit(X, Y)
    loo = exact.cv_results_.mean(axis=0).T  # (A, t), float64
    x_mean = X.mean(axis=0) if fit_intercept else 0.0
    y_mean = Y.mean(axis=0) if fit_intercept else np.zeros(Y.shape[1])
    spec, _ = ridge_module._spectrum(X - x_mean, Y, y_mean)
    grid = np.asarray(GRID)
    shrink = spec.lam[:, None] / (spec.lam[:, None] + grid[None, :])
    h = (spec.u**2) @ shrink + (1.0 / len(X) if fit_intercept else 0.0)
    with np.errstate(divide="ignore"):
        dinv = (1.0 / (1.0 - h)).T
    y_ss = ((Y - y_mean) ** 2).sum(axis=0)
    bounds = ridge_module._LooBounds(spec, shrink, dinv)
    lower, upper, _ = bounds.of(spec.q, y_ss, (Y - y_mean)[bounds.rows])
    assert len(bounds.rows) == min(exact_rows, len(X))
    checked = np.isfinite(loo) & np.isfinite(lower) & np.isfinite(upper)
    assert checked.mean() > 0.5
    assert np.all(lower[checked] <= loo[checked] * (1 + 1e-9))
    assert np.all(loo[checked] <= upper[checked] * (1 + 1e-9))
    if exact_rows >= len(X):  # every residual computed: the bounds close on the score
        np.testing.assert_allclose(lower[checked], loo[checked], rtol=1e-6)
        np.testing.assert_allclose(upper[checked], loo[checked], rtol=1e-6)


@pytest.mark.parametrize("exact_rows", [0, 64])
@pytest.mark.parametrize("case", range(5))
def test_pruning_keeps_the_choice_and_skips_only_losers(case, exact_rows, monkeypatch):
    from virtualst.heads import ridge as ridge_module

    monkeypatch.setattr(ridge_module, "_EXACT_ROWS", exact_rows)
    X, Y, fit_intercept = list(_designs())[case]
    full = ridge_loo(X, Y, GRID, fit_intercept, backend="numpy", prune=False)
    pruned = ridge_loo(X, Y, GRID, fit_intercept, backend="numpy", prune=True)
    np.testing.assert_array_equal(pruned.alpha_index, full.alpha_index)
    np.testing.assert_array_equal(pruned.coef, full.coef)
    # Same float32 scores up to rounding (the products group targets differently).
    np.testing.assert_allclose(pruned.mse[pruned.scored], full.mse[pruned.scored], rtol=1e-4)
    best = full.mse[full.alpha_index, np.arange(Y.shape[1])]
    skipped = ~pruned.scored
    assert np.all(full.mse[skipped] > np.broadcast_to(best, full.mse.shape)[skipped])


def test_pruning_scores_fewer_alphas_on_many_spots():
    X, Y, _ = regression(3000, 40, t=50, seed=5)
    got = ridge_loo(X, Y, GRID, backend="numpy")
    assert got.scored.mean() < 0.6, got.scored.mean()
    assert got.flops["loo_f32"] < 0.6 * ridge_loo(X, Y, GRID, backend="numpy", prune=False).flops["loo_f32"]
    head = RidgeHead(standardize=False, n_components=None).fit(X, Y)  # centring only: the same problem
    assert head.cv_scored_ == pytest.approx(got.scored.mean())
    assert Head.from_state(head.get_state()).cv_scored_ == head.cv_scored_


def test_rank_deficient_design():
    X, Y, X_new = regression(80, 10)
    X = np.hstack([X, X[:, :3], np.ones((80, 2))])  # duplicated and constant columns
    X_new = np.hstack([X_new, X_new[:, :3], np.ones((40, 2))])
    got = ridge_loo(X, Y, GRID, backend="numpy")
    ref = RidgeCV(alphas=GRID, alpha_per_target=True).fit(X, Y)
    assert got.rank == 10
    np.testing.assert_array_equal(got.alpha, ref.alpha_)
    np.testing.assert_allclose(X_new @ got.coef.T + got.intercept, ref.predict(X_new), rtol=0, atol=1e-8)


@pytest.mark.parametrize("standardize, n_components", [(True, None), (True, 5), (False, 5)])
def test_feature_transform_then_ridgecv(standardize, n_components):
    X, Y, X_new = regression(120, 16)
    head = RidgeHead(standardize=standardize, n_components=n_components).fit(X, Y)
    Z = head.transform_.transform(X)
    assert Z.shape[1] == (n_components or 16) == head.coef_.shape[1]
    ref = RidgeCV(alphas=GRID, alpha_per_target=True).fit(Z, Y)
    np.testing.assert_array_equal(head.alpha_, ref.alpha_)
    np.testing.assert_allclose(head.predict(X_new), ref.predict(head.transform_.transform(X_new)), rtol=0, atol=1e-8)


def test_one_dimensional_y():
    X, Y, X_new = regression(100, 8, t=1)
    y = Y[:, 0]
    head = RidgeHead(standardize=False, n_components=None).fit(X, y)
    ref = RidgeCV(alphas=GRID).fit(X, y)
    pred = head.predict(X_new)
    assert pred.shape == (40,) and head.coef_.shape == (8,) and isinstance(head.intercept_, float)
    assert head.alpha_.shape == (1,) and head.alpha_[0] == ref.alpha_
    np.testing.assert_allclose(pred, ref.predict(X_new), rtol=0, atol=1e-8)


def test_groups_ignored_by_loo(linear_data):
    X, Y, groups = linear_data
    with_groups = RidgeHead(n_components=None).fit(X, Y, groups=groups)
    without = RidgeHead(n_components=None).fit(X, Y)
    np.testing.assert_array_equal(with_groups.predict(X), without.predict(X))
    assert with_groups.score(X, Y) > 0.95 and with_groups.cv_used_ == "loo"


def test_group_cv_matches_refitting_each_alpha_on_each_fold(linear_data):
    from sklearn.linear_model import Ridge

    X, Y, groups = linear_data
    Y = Y + np.random.default_rng(5).normal(scale=[0.1, 3.0, 10.0], size=Y.shape)  # genes needing different alphas
    alphas = (0.1, 10.0, 1000.0, 1e5)
    head = RidgeHead(n_components=None, standardize=False, alphas=alphas, cv="group").fit(X, Y, groups=groups)
    assert head.cv_used_ == "group" and head.cv_scored_ == 1.0
    # Reference: sklearn Ridge refitted per fold and alpha, scored by mean per-fold Pearson.
    score = np.zeros((len(alphas), Y.shape[1]))
    for g in np.unique(groups):
        train, test = groups != g, groups == g
        for a, alpha in enumerate(alphas):
            score[a] += pearson_per_gene(Y[test], Ridge(alpha=alpha).fit(X[train], Y[train]).predict(X[test]))
    expected = np.asarray(alphas)[score.argmax(axis=0)]
    np.testing.assert_array_equal(head.alpha_, expected)
    for j, alpha in enumerate(expected):
        np.testing.assert_allclose(head.predict(X)[:, j], Ridge(alpha=alpha).fit(X, Y[:, j]).predict(X), atol=1e-8)
    back = Head.from_state(head.get_state())
    assert back.cv_used_ == "group"
    np.testing.assert_array_equal(back.predict(X), head.predict(X))


def test_group_cv_falls_back_to_loo_without_groups(linear_data):
    X, Y, _ = linear_data
    head = RidgeHead(n_components=None, cv="group").fit(X, Y, groups=np.zeros(len(X)))
    assert head.cv_used_ == "loo"
    with pytest.raises(ValueError, match="cv must be 'loo' or 'group'"):
        RidgeHead(cv="kfold").fit(X, Y)


@pytest.mark.parametrize("multi", [True, False], ids=["2d", "1d"])
def test_state_round_trip(multi):
    X, Y, X_new = regression(90, 20, t=5)
    head = RidgeHead(n_components=6, alphas=(0.5, 5.0, 50.0)).fit(X, Y if multi else Y[:, 2])
    state = head.get_state()
    json.dumps({"params": state.params, "meta": state.meta})  # JSON-able
    assert all(isinstance(a, np.ndarray) for a in state.arrays.values()) and not state.texts and not state.children
    assert head_class("ridge") is RidgeHead
    back = Head.from_state(state)
    assert isinstance(back, RidgeHead) and back.get_params() == {**head.get_params(), "alphas": [0.5, 5.0, 50.0]}
    np.testing.assert_array_equal(back.predict(X_new), head.predict(X_new))
    np.testing.assert_array_equal(back.alpha_, head.alpha_)
    np.testing.assert_array_equal(back.cv_mse_, head.cv_mse_)


@pytest.mark.parametrize("alphas", [(), (1.0, 0.0), (1.0, -2.0), (np.nan,)])
def test_invalid_alphas(alphas):
    X, Y, _ = regression(30, 4)
    with pytest.raises(ValueError, match="alphas"):
        RidgeHead(alphas=alphas).fit(X, Y)


def test_ties_go_to_first_alpha_in_grid_order():
    X, Y, _ = regression(60, 5)
    got = ridge_loo(X, Y, (10.0, 10.0, 1.0), backend="numpy")
    ref = RidgeCV(alphas=(10.0, 10.0, 1.0), alpha_per_target=True).fit(X, Y)
    np.testing.assert_array_equal(got.alpha, ref.alpha_)
    assert set(got.alpha_index) <= {0, 2}


def test_near_ties_are_rescored_in_float64():
    X, Y, _ = regression(200, 30, t=20)
    grid = (3.0, 3.0 * (1 + 1e-7), 3.0 * (1 - 1e-7))  # scores differ far below float32 resolution
    got = ridge_loo(X, Y, grid, backend="numpy")
    ref = RidgeCV(alphas=grid, alpha_per_target=True).fit(X, Y)
    assert got.n_refined == Y.shape[1]
    np.testing.assert_array_equal(got.alpha, ref.alpha_)
    assert len(set(got.alpha_index)) > 1


def test_onednn_backend_matches_numpy():
    if not onednn_available():
        pytest.skip("torch with oneDNN not available")
    X, Y, _ = regression(400, 64, t=40)
    fast = ridge_loo(X, Y, GRID, backend="onednn", chunk_size=16)
    slow = ridge_loo(X, Y, GRID, backend="numpy")
    assert fast.backend == "onednn" and slow.backend == "numpy"
    np.testing.assert_array_equal(fast.alpha, slow.alpha)
    np.testing.assert_allclose(fast.coef, slow.coef, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fast.mse, slow.mse, rtol=1e-4)


@pytest.mark.realdata
def test_her2st_beats_mean_baseline(her2st_split):
    X_train, Y_train, groups, X_test, Y_test = her2st_split
    head = RidgeHead().fit(X_train, Y_train, groups=groups)
    pred = head.predict(X_test)
    mse = np.mean((pred - Y_test) ** 2)
    baseline = np.mean((Y_train.mean(axis=0) - Y_test) ** 2)
    r = pearson_per_gene(Y_test, pred)
    assert r.mean() > 0.1, r.mean()
    assert mse < baseline, (mse, baseline)
    interior = (head.alpha_ > GRID[0]) & (head.alpha_ < GRID[-1])
    assert interior.mean() >= 0.5, np.unique(head.alpha_, return_counts=True)
