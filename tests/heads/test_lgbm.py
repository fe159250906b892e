"""LGBMHead: sklearn contract, determinism, early stopping, text-model round trip, real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from virtualst.heads.base import Head, make_head
from virtualst.heads.cv import pearson_per_gene
from virtualst.heads.lgbm import LGBMHead, validation_split

#: Few, fast trees for the synthetic tests.
FAST = dict(n_estimators=40, learning_rate=0.2, num_leaves=7, min_child_samples=5, early_stopping_rounds=5, n_jobs=1)


# sklearn's checks use make_regression with one informative axis-aligned feature:
# PCA would rotate it away from the trees' axes, so the checks run without it.
@parametrize_with_checks([LGBMHead(n_components=None, **FAST)])
def test_sklearn_contract(estimator, check):
    check(estimator)


def test_registered():
    assert isinstance(make_head("lgbm", n_estimators=3), LGBMHead)


def test_fits_linear_data(linear_data):
    X, Y, groups = linear_data
    head = LGBMHead(n_components=None, **FAST).fit(X[:150], Y[:150], groups=groups[:150])
    r = pearson_per_gene(Y[150:], head.predict(X[150:]))
    assert head.predict(X).shape == Y.shape
    assert len(head.boosters_) == Y.shape[1] and head.best_iteration_.shape == (Y.shape[1],)
    assert np.all(r > 0.5)


def test_deterministic_and_independent_of_n_jobs(linear_data):
    X, Y, groups = linear_data
    params = dict(FAST, subsample=0.7, colsample_bytree=0.5, random_state=3)
    a = LGBMHead(**params).fit(X, Y, groups=groups).predict(X)
    b = LGBMHead(**params).fit(X, Y, groups=groups).predict(X)
    c = LGBMHead(**dict(params, n_jobs=2)).fit(X, Y, groups=groups).predict(X)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("early_stopping_rounds", [5, None])
def test_relabelled_datasets_give_the_boosters_of_fresh_ones(linear_data, early_stopping_rounds):
    """Binning once and relabelling per gene (2 jobs sharing the datasets) trains what fresh datasets train."""
    import lightgbm as lgb

    X, Y, groups = linear_data
    head = LGBMHead(**dict(FAST, subsample=0.7, n_jobs=2, early_stopping_rounds=early_stopping_rounds)).fit(X, Y, groups=groups)
    Z = head.transform_.transform(X)
    params = head._lgb_params(1)
    split = validation_split(len(Z), groups, head.validation_fraction, head.random_state)
    for j, booster in enumerate(head.boosters_):
        n_trees = FAST["n_estimators"]
        if early_stopping_rounds:
            train, valid = split
            dtrain = lgb.Dataset(Z[train], label=Y[train, j], params=params)
            dvalid = lgb.Dataset(Z[valid], label=Y[valid, j], reference=dtrain, params=params)
            stop = lgb.early_stopping(early_stopping_rounds, first_metric_only=True, verbose=False)
            n_trees = lgb.train(params, dtrain, num_boost_round=n_trees, valid_sets=[dvalid], callbacks=[stop]).best_iteration
        fresh = lgb.train(params, lgb.Dataset(Z, label=Y[:, j], params=params), num_boost_round=n_trees)
        assert head.best_iteration_[j] == n_trees
        np.testing.assert_array_equal(booster.predict(Z), fresh.predict(Z))


def test_early_stopping_stops_on_noise():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(300, 8)), rng.normal(size=(300, 2))
    head = LGBMHead(n_estimators=300, learning_rate=0.1, min_child_samples=5, early_stopping_rounds=10, n_jobs=1).fit(X, Y)
    assert np.all(head.best_iteration_ < 60)
    assert [b.num_trees() for b in head.boosters_] == list(head.best_iteration_)


def test_no_early_stopping_trains_every_tree(linear_data):
    X, Y, _ = linear_data
    head = LGBMHead(**dict(FAST, n_estimators=12, early_stopping_rounds=None)).fit(X, Y[:, 0])
    assert list(head.best_iteration_) == [12]


def test_validation_split_holds_out_whole_groups():
    groups = np.repeat(["a", "b", "c", "d"], [30, 30, 30, 10])
    train, valid = validation_split(100, groups, fraction=0.25, random_state=0)
    assert len(train) + len(valid) == 100 and not set(train) & set(valid)
    assert not set(groups[train]) & set(groups[valid])
    assert len(valid) >= 25 and len(set(groups[train])) >= 1
    # A single group is no group: rows are split at random.
    train, valid = validation_split(100, np.zeros(100), fraction=0.2, random_state=0)
    assert len(valid) == 20
    assert validation_split(2, None, fraction=0.2) is None


def test_validation_split_keeps_a_training_group():
    groups = np.repeat([0, 1], 5)
    train, valid = validation_split(10, groups, fraction=0.9, random_state=0)
    assert len(set(groups[train])) == 1 and len(set(groups[valid])) == 1


def test_groups_length_checked(linear_data):
    X, Y, groups = linear_data
    with pytest.raises(ValueError, match="groups"):
        LGBMHead(**FAST).fit(X, Y, groups=groups[:-1])


@pytest.mark.parametrize("one_d", [False, True])
def test_state_round_trip(linear_data, one_d):
    X, Y, groups = linear_data
    Y = Y[:, 1] if one_d else Y
    head = LGBMHead(n_components=6, **FAST).fit(X, Y, groups=groups)
    state = head.get_state()
    n_genes = 1 if one_d else Y.shape[1]
    assert sorted(state.texts) == [f"gene_{j:04d}" for j in range(n_genes)]
    assert all(text.startswith("tree") for text in state.texts.values())
    json.dumps(state.params), json.dumps(state.meta)  # JSON-able
    restored = Head.from_state(state)
    assert isinstance(restored, LGBMHead)
    np.testing.assert_array_equal(restored.predict(X), head.predict(X))
    np.testing.assert_array_equal(restored.best_iteration_, head.best_iteration_)
    assert restored.predict(X).shape == Y.shape


@pytest.mark.realdata
def test_beats_mean_baseline_on_her2st(her2st_split):
    X_train, Y_train, groups, X_test, Y_test = her2st_split
    pred = LGBMHead(n_jobs=2).fit(X_train, Y_train, groups=groups).predict(X_test)
    r = pearson_per_gene(Y_test, pred)
    mse, mse_mean = np.mean((Y_test - pred) ** 2), np.mean((Y_test - Y_train.mean(axis=0)) ** 2)
    assert r.mean() > 0.15, r.mean()  # ~0.27 observed
    assert mse < 0.97 * mse_mean, (mse, mse_mean)  # ~0.93 observed
