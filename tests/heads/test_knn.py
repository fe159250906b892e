"""KNNHead: scikit-learn contract, exact neighbours, softmax weighting, inner CV, state, real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.estimator_checks import parametrize_with_checks

from virtualst.heads.base import Head
from virtualst.heads.cv import inner_splits, pearson_per_gene
from virtualst.heads.knn import KNNHead, softmax_weights

#: Search the raw features with one fixed (k, temperature): no CV, no transform.
RAW = {"standardize": False, "n_components": None}


@pytest.fixture
def cloud():
    """150 references and 40 queries in 8-d, 3 smooth targets (no ties at float precision)."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(150, 8)) + 0.5
    Y = np.column_stack([np.sin(X[:, 0]), X[:, 1] ** 2, X[:, 2] * X[:, 3]])
    return X, Y, rng.normal(size=(40, 8)) + 0.5


@parametrize_with_checks([KNNHead(), KNNHead(metric="l2", index="ivf", standardize=True, k_grid=(3, 10))])
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.mark.parametrize(("metric", "sk_metric"), [("cosine", "cosine"), ("l2", "euclidean")])
@pytest.mark.parametrize("transform", [RAW, {"standardize": True, "n_components": 5}])
def test_neighbours_match_sklearn_brute_force(cloud, metric, sk_metric, transform):
    X, Y, Q = cloud
    head = KNNHead(k_grid=(7,), temperature_grid=(1.0,), metric=metric, **transform).fit(X, Y)
    space = (lambda A: A) if head.transform_ is None else head.transform_.transform
    dist, idx = NearestNeighbors(n_neighbors=7, algorithm="brute", metric=sk_metric).fit(space(X)).kneighbors(space(Q))
    got_dist, got_idx = head.kneighbors(Q)
    np.testing.assert_array_equal(got_idx, idx)
    np.testing.assert_allclose(got_dist, dist, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ivf_probing_every_list_is_exact(cloud, metric):
    X, Y, Q = cloud
    flat = KNNHead(k_grid=(10,), temperature_grid=(0.1,), metric=metric, **RAW).fit(X, Y)
    ivf = KNNHead(k_grid=(10,), temperature_grid=(0.1,), metric=metric, index="ivf", nlist=6, nprobe=6, **RAW).fit(X, Y)
    assert ivf.ivf_centroids_.shape == (6, X.shape[1])
    np.testing.assert_array_equal(ivf.kneighbors(Q, return_distance=False), flat.kneighbors(Q, return_distance=False))
    np.testing.assert_allclose(ivf.predict(Q), flat.predict(Q), rtol=1e-12)


def test_ivf_short_of_neighbours_still_predicts(cloud):
    X, Y, Q = cloud
    head = KNNHead(k_grid=(100,), temperature_grid=(0.1,), index="ivf", nlist=6, nprobe=1, **RAW).fit(X, Y)
    dist, idx = head.kneighbors(Q)
    assert (idx < 0).any() and np.isinf(dist[idx < 0]).all()  # one list holds fewer than 100 references
    assert np.isfinite(head.predict(Q)).all()


def test_softmax_weights_limits():
    sims = np.array([[0.9, 0.5, 0.1], [0.2, 0.2, -np.inf]])
    np.testing.assert_allclose(softmax_weights(sims, 1e-6), [[1, 0, 0], [0.5, 0.5, 0]])
    np.testing.assert_allclose(softmax_weights(sims[:1], 1e6), [[1 / 3] * 3], rtol=1e-5)
    np.testing.assert_allclose(softmax_weights(sims, 0.3).sum(axis=1), 1.0)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_temperature_limits(cloud, metric):
    X, Y, Q = cloud
    _, idx = KNNHead(k_grid=(5,), temperature_grid=(1.0,), metric=metric, **RAW).fit(X, Y).kneighbors(Q)
    nearest = KNNHead(k_grid=(5,), temperature_grid=(1e-9,), metric=metric, **RAW).fit(X, Y).predict(Q)
    np.testing.assert_allclose(nearest, Y[idx[:, 0]], rtol=1e-6)
    flat = KNNHead(k_grid=(5,), temperature_grid=(1e9,), metric=metric, **RAW).fit(X, Y).predict(Q)
    np.testing.assert_allclose(flat, Y[idx].mean(axis=1), rtol=1e-5, atol=1e-6)


def test_inner_cv_scores_every_candidate_and_picks_the_best(linear_data):
    X, Y, groups = linear_data
    k_grid, temps = (3, 10, 40), (0.03, 0.3)
    head = KNNHead(k_grid=k_grid, temperature_grid=temps, **RAW).fit(X, Y, groups=groups)
    assert head.cv_scores_.shape == (3, 2)
    assert head.k_ in k_grid and head.temperature_ in temps
    assert head.cv_score_ == head.cv_scores_.max()
    assert head.cv_scores_[k_grid.index(head.k_), temps.index(head.temperature_)] == head.cv_score_
    # One search per fold with the largest k, sliced, equals refitting each candidate on the folds.
    for i, k in enumerate(k_grid):
        for j, t in enumerate(temps):
            one = KNNHead(k_grid=(k,), temperature_grid=(t,), **RAW)
            folds = [pearson_per_gene(Y[va], one.fit(X[tr], Y[tr]).predict(X[va])).mean() for tr, va in inner_splits(len(X), groups, 5, 0)]
            assert head.cv_scores_[i, j] == pytest.approx(np.mean(folds), abs=1e-6)  # candidates' products in float32


def test_candidate_scores_equal_scoring_each_candidate_alone():
    from virtualst.heads.knn import _candidate_scores, _weighted_targets

    rng = np.random.default_rng(3)
    n_ref, n_val, kmax = 60, 90, 12
    targets = np.column_stack([rng.normal(5.0, 1.0, n_ref), rng.poisson(2.0, n_ref), rng.normal(0.0, 1e-3, n_ref)]).astype(np.float32)
    y_true = np.column_stack([rng.normal(5.0, 1.0, n_val), rng.poisson(2.0, n_val), rng.normal(3.0, 1.0, n_val)])
    idx = np.argsort(rng.random((n_val, n_ref)), axis=1)[:, :kmax]
    sims = -np.sort(rng.random((n_val, kmax)), axis=1)
    sims[:5, 8:], idx[:5, 8:] = -np.inf, -1  # queries short of neighbours (IVF) ...
    sims[5], idx[5] = -np.inf, -1  # ... and one without any
    ks, temps = [1, 5, 12, 40], [0.01, 0.3, 2.0]  # 40 > kmax: every neighbour found
    got = _candidate_scores(sims, idx, targets, y_true, ks, temps)
    for i, k in enumerate(ks):
        for j, t in enumerate(temps):
            pred = _weighted_targets(sims[:, :k], idx[:, :k], targets, t)
            assert got[i, j] == pytest.approx(pearson_per_gene(y_true, pred).mean(), abs=1e-6), (k, t)
    # A gene constant among the references, or among the true values (a gene not detected in a fold),
    # scores r = 0 (pearson_per_gene's rule), not rounding noise.
    constant = np.full((n_ref, 1), 3.0, dtype=np.float32)
    np.testing.assert_array_equal(_candidate_scores(sims, idx, constant, y_true[:, :1], ks, temps), 0.0)
    np.testing.assert_array_equal(_candidate_scores(sims, idx, targets[:, :1], np.full((n_val, 1), 0.1), ks, temps), 0.0)


def test_smooth_targets_prefer_few_neighbours_and_noise_many():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 3))
    smooth = np.sin(2 * X[:, 0])
    noisy = smooth + 3.0 * rng.normal(size=300)
    grid = {"k_grid": (3, 100), "temperature_grid": (1.0,), "metric": "l2", **RAW}
    assert KNNHead(**grid).fit(X, smooth).k_ == 3
    assert KNNHead(**grid).fit(X, noisy).k_ == 100


def test_k_larger_than_references_and_1d_targets(cloud):
    X, Y, Q = cloud
    head = KNNHead(k_grid=(10_000,), temperature_grid=(1e9,), **RAW).fit(X[:20], Y[:20, 0])
    pred = head.predict(Q)
    assert pred.shape == (len(Q),)
    np.testing.assert_allclose(pred, Y[:20, 0].mean(), rtol=1e-5)
    assert head.kneighbors(Q)[1].shape == (len(Q), 20)


@pytest.mark.parametrize(
    "params",
    [{}, {"metric": "l2", "index": "ivf", "nprobe": 2, "standardize": True, "n_components": 4}],
    ids=["cosine-flat-raw", "l2-ivf-pca"],
)
def test_state_round_trip(cloud, params):
    X, Y, Q = cloud
    groups = np.repeat(np.arange(3), 50)
    head = KNNHead(k_grid=(5, 20), temperature_grid=(0.1, 1.0), **params).fit(X, Y, groups=groups)
    state = head.get_state()
    json.dumps(state.params), json.dumps(state.meta)  # plain JSON, no faiss objects
    assert all(isinstance(a, np.ndarray) for a in state.arrays.values())
    restored = Head.from_state(state)
    assert isinstance(restored, KNNHead) and restored.k_ == head.k_ and restored.temperature_ == head.temperature_
    np.testing.assert_array_equal(restored.predict(Q), head.predict(Q))
    np.testing.assert_array_equal(restored.kneighbors(Q)[1], head.kneighbors(Q)[1])


@pytest.mark.parametrize(
    "params",
    [{"metric": "dot"}, {"index": "hnsw"}, {"k_grid": (0, 5)}, {"temperature_grid": (0.0,)}, {"nprobe": 0}],
)
def test_bad_parameters_raise(linear_data, params):
    X, Y, _ = linear_data
    with pytest.raises(ValueError):
        KNNHead(**params).fit(X, Y)


@pytest.mark.realdata
def test_her2st_beats_mean_expression(her2st_split):
    X_train, Y_train, groups, X_test, Y_test = her2st_split
    head = KNNHead().fit(X_train, Y_train, groups=groups)
    pred = head.predict(X_test)
    r = pearson_per_gene(Y_test, pred).mean()
    mse_mean = ((Y_test - Y_train.mean(axis=0)) ** 2).mean()
    assert r > 0.2, f"mean Pearson {r:.3f}"
    assert ((Y_test - pred) ** 2).mean() < 0.95 * mse_mean
