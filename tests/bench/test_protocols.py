"""Benchmark rows fitted on a training fold only (virtualst.bench.protocols)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from virtualst.bench import protocols
from virtualst.bench.data import SampleData
from virtualst.bench.metrics import mse_per_gene, pearson_per_gene
from virtualst.bench.protocols import ROWS, expand_rows, get_protocol, run_fold, run_protocol
from virtualst.heads.smoothing import PredictionSmoother
from virtualst.heads.targets import GeneSpec, normalize

N_GENES = 20

#: Small, fast settings per head kind (the row defaults are sized for real sections).
FAST = {
    "ridge": {},
    "lgbm": {"n_estimators": 30, "n_components": 8, "learning_rate": 0.1, "min_child_samples": 10, "early_stopping_rounds": None, "n_jobs": 1},
    "knn": {"k_grid": (5, 20), "temperature_grid": (0.1, 1.0), "n_splits": 3},
    "ensemble": {"members": (("ridge", {}), ("knn", {"k_grid": (10,), "temperature_grid": (0.3,)})), "n_splits": 3},
}


def fast_options(name: str) -> dict:
    row = ROWS[name]
    return {"head_params": FAST[row.head], "smooth_splits": 3} if isinstance(row, protocols.HeadRow) else {}


def make_task(n_samples=5, side=8, n_features=16, seed=0, signal=1.0, depth_sd=0.3):
    """Sections on a 100 µm grid; half the genes follow a smooth latent field the features also see."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(3, n_features))
    loadings = np.zeros((3, N_GENES))
    loadings[:, : N_GENES // 2] = signal * rng.normal(size=(3, N_GENES // 2))
    base = rng.uniform(0.002, 0.05, size=N_GENES)
    genes = np.array([f"g{j}" for j in range(N_GENES)])
    x, y = np.meshgrid(np.arange(side), np.arange(side))
    coords = 100.0 * np.column_stack([x.ravel(), y.ravel()])
    samples = []
    for i in range(n_samples):
        waves = rng.normal(size=(3, 2)) / 300.0
        latent = np.sin(coords @ waves.T + rng.uniform(0, 2 * np.pi, size=3))
        features = (latent @ mixing + 0.3 * rng.normal(size=(len(coords), n_features))).astype(np.float32)
        library = 2000.0 * rng.lognormal(0.0, depth_sd, size=len(coords))
        counts = rng.poisson(library[:, None] * base * np.exp(latent @ loadings))
        samples.append(
            SampleData(
                sample_id=f"s{i}",
                patient_id=f"p{i // 2}",
                features=features,
                counts=sp.csr_matrix(counts.astype(np.float64)),
                genes=genes,
                coords_um=coords.copy(),
                barcodes=np.array([f"s{i}_{j}" for j in range(len(coords))]),
            )
        )
    return samples


@pytest.fixture(scope="module")
def task():
    return make_task()


def perturbed(samples, seed=1):
    """Copies with wildly different features and counts (same shapes, genes and coords)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in samples:
        c = copy.deepcopy(s)
        c.features = (1e3 * rng.standard_cauchy(size=s.features.shape)).astype(s.features.dtype)
        c.counts = sp.csr_matrix(rng.poisson(rng.uniform(0, 500, size=s.counts.shape)).astype(np.float64))
        out.append(c)
    return out


# ---------------------------------------------------------------- registry
def test_rows_and_expansion():
    assert expand_rows(["ridge", "knn"], ["none", "context", "smooth", "context+smooth"]) == [
        "ridge",
        "ridge+context",
        "ridge+smooth",
        "ridge+context+smooth",
        "knn",
        "knn+context",
        "knn+smooth",
        "knn+context+smooth",
    ]
    assert len(expand_rows()) == 20 and set(expand_rows()) <= set(ROWS)
    assert {"hest-ridge", "mean", "library-size", "ridge-group+smooth", "ensemble+context"} <= set(ROWS)
    assert ROWS["ridge-group"].row_params == {"cv": "group"}
    with pytest.raises(ValueError, match="unknown head"):
        expand_rows(["svm"], ["none"])
    with pytest.raises(ValueError, match="unknown smoothing"):
        expand_rows(["ridge"], ["blur"])
    with pytest.raises(ValueError, match="unknown row"):
        get_protocol("nope")
    with pytest.raises(ValueError, match="no option"):
        get_protocol("mean", head_params={})


def test_fold_checks(task):
    with pytest.raises(ValueError, match="both sides"):
        run_protocol("mean", task[:3], task[2:], genes="hvg:5")
    with pytest.raises(ValueError, match="unknown normalisation"):
        run_protocol("mean", task[:3], task[3:], normalization="tpm", genes="hvg:5")
    fold = SimpleNamespace(name="k0", train=("s0", "s1", "s2"), test=("s3", "s4"), patient_disjoint=False)
    result = run_fold("mean", fold, task, genes="hvg:5")
    assert result.metadata["fold"] == "k0" and result.metadata["patient_disjoint"] is False and result.metadata["row"] == "mean"
    assert list(result.predictions) == ["s3", "s4"] and result.gene_table()["fold"].eq("k0").all()
    with pytest.raises(ValueError, match="unknown sample"):
        run_fold("mean", SimpleNamespace(name="k1", train=("s0", "x"), test=("s4",), patient_disjoint=True), task)


# ---------------------------------------------------------------- HEST ridge
@pytest.mark.parametrize("side, n_features, solver", [(10, 300, "full"), (12, 640, "randomized")])  # randomized: as 1024-d embeddings
def test_hest_ridge_reproduces_the_sklearn_pipeline(side, n_features, solver):
    samples = make_task(n_samples=4, side=side, n_features=n_features, seed=3)  # >= 300 training spots: PCA(256) uncapped
    train, test = samples[:3], samples[3:]
    result = run_protocol("hest-ridge", train, test, genes="hvg:8")

    # Hand-written: HVGs by variance of pooled log1p counts, then scaler -> PCA(256) -> Ridge.
    counts = sp.vstack([s.counts for s in train]).toarray()
    chosen = np.argsort(-np.log1p(counts).var(axis=0), kind="stable")[:8]
    assert result.genes == [f"g{j}" for j in chosen]
    X = np.concatenate([s.features for s in train])
    scaler, pca = StandardScaler(), PCA(n_components=256, random_state=1)
    Z = pca.fit_transform(scaler.fit_transform(X)).astype(np.float32)  # HEST feeds the ridge float32 tensors
    alpha = 100 / (256 * 8)  # n_features = PCA output width, n_genes = target columns
    ridge = Ridge(alpha=alpha, fit_intercept=False, solver="lsqr", max_iter=1000, random_state=1).fit(Z, np.log1p(counts[:, chosen]))
    expected = ridge.predict(pca.transform(scaler.transform(test[0].features)).astype(np.float32))

    np.testing.assert_array_equal(result.predictions["s3"], expected)
    np.testing.assert_array_equal(result.truths["s3"], np.log1p(test[0].counts.toarray()[:, chosen]))
    assert result.metadata["alpha"] == alpha and result.metadata["n_components"] == 256
    assert result.fitted["pca"]._fit_svd_solver == solver


def test_hest_ridge_caps_pca_and_labels_non_log1p_targets_as_not_exact(task):
    result = run_protocol("hest-ridge", task[:3], task[3:], normalization="cpm-log1p", genes="hvg:6")
    assert result.metadata["n_components"] == 16  # min(256, 192 spots, 16 features)
    assert result.metadata["alpha"] == pytest.approx(100 / (16 * 6))
    assert result.metadata["normalization"] == "cpm-log1p" and result.metadata["exact_hest"] is False
    np.testing.assert_array_equal(result.truths["s3"], normalize(task[3].counts, task[3].genes, result.genes, "cpm-log1p"))
    assert run_protocol("hest-ridge", task[:3], task[3:], genes="hvg:6").metadata["exact_hest"] is True


# ---------------------------------------------------------------- leak-freedom
def test_genes_and_preprocessing_see_only_training_samples(task):
    train, test = task[:3], task[3:]
    a = run_protocol("hest-ridge", train, test, genes="hvg:6")
    b = run_protocol("hest-ridge", train, perturbed(test), genes="hvg:6")
    assert a.genes == b.genes == GeneSpec.parse("hvg:6").select([s.counts for s in train], [s.genes for s in train])
    for attr in ("mean_", "scale_"):
        np.testing.assert_array_equal(getattr(a.fitted["scaler"], attr), getattr(b.fitted["scaler"], attr))
    np.testing.assert_array_equal(a.fitted["pca"].components_, b.fitted["pca"].components_)
    np.testing.assert_array_equal(a.fitted["ridge"].coef_, b.fitted["ridge"].coef_)


@pytest.mark.parametrize("name", ["hest-ridge", "mean", "library-size", "ridge-group+context+smooth", "knn+context"])
def test_other_test_samples_never_change_a_prediction(task, name):
    train, test = task[:3], task[3:]
    a = run_protocol(name, train, test, genes="hvg:6", **fast_options(name))
    b = run_protocol(name, train, [test[0], *perturbed(test[1:])], genes="hvg:6", **fast_options(name))
    np.testing.assert_array_equal(a.predictions["s3"], b.predictions["s3"])
    np.testing.assert_array_equal(a.truths["s3"], b.truths["s3"])


def test_pinned_genes_are_kept(task):
    genes = ["g15", "g2", "g7"]
    result = run_protocol("mean", task[:3], perturbed(task[3:]), genes=genes)
    assert result.genes == genes


def test_smoothing_strength_is_chosen_on_training_samples_only(task, monkeypatch):
    seen = []
    original = PredictionSmoother.fit

    def spy(self, predictions_list, truths_list, coords_list):
        seen.append(sum(len(t) for t in truths_list))
        return original(self, predictions_list, truths_list, coords_list)

    monkeypatch.setattr(PredictionSmoother, "fit", spy)
    train, test = task[:3], task[3:]
    a = run_protocol("ridge+smooth", train, test, genes="hvg:6", smooth_splits=3)
    b = run_protocol("ridge+smooth", train, perturbed(test), genes="hvg:6", smooth_splits=3)
    assert seen == [a.metadata["n_train_spots"]] * 2
    np.testing.assert_array_equal(a.fitted["smoother"].strength_, b.fitted["smoother"].strength_)
    assert a.metadata["smooth_strength"] == list(a.fitted["smoother"].strength_)


def test_single_training_sample_skips_smoothing(task):
    result = run_protocol("ridge+smooth", task[:1], task[3:], genes="hvg:6")
    assert "smooth_skipped" in result.metadata and result.fitted["smoother"] is None


def test_ground_truth_is_measured_and_inputs_untouched(task):
    before = [(s.features.copy(), s.counts.toarray()) for s in task]
    result = run_protocol("ridge+context+smooth", task[:3], task[3:], normalization="cpm-log1p", genes="hvg:6", smooth_splits=3)
    for s in task[3:]:
        np.testing.assert_array_equal(result.truths[s.sample_id], normalize(s.counts, s.genes, result.genes, "cpm-log1p"))
    for s, (features, counts) in zip(task, before):
        np.testing.assert_array_equal(s.features, features)
        np.testing.assert_array_equal(s.counts.toarray(), counts)


# ---------------------------------------------------------------- baselines and our rows
def test_library_size_row_recovers_a_depth_driven_target():
    samples = make_task(n_samples=4, signal=0.0, depth_sd=1.0, seed=5)  # expression = depth x constant
    result = run_protocol("library-size", samples[:3], samples[3:], genes="hvg:5")
    mean = run_protocol("mean", samples[:3], samples[3:], genes="hvg:5")
    pred, truth = result.pooled()
    assert pearson_per_gene(truth, pred).min() > 0.8
    assert mse_per_gene(truth, pred).mean() < 0.3 * mse_per_gene(*mean.pooled()[::-1]).mean()
    # log1p(c · depth) grows like log(depth) once counts are large: slopes near 1
    assert np.all(np.abs(np.array(result.metadata["slope"]) - 1) < 0.35)


def test_mean_row_predicts_the_training_mean(task):
    result = run_protocol("mean", task[:3], task[3:], genes="hvg:6")
    expected = np.concatenate([normalize(s.counts, s.genes, result.genes) for s in task[:3]]).mean(axis=0)
    np.testing.assert_allclose(result.predictions["s4"], np.tile(expected, (64, 1)))
    assert np.isnan(result.gene_table()["pearson"]).all()  # constant predictions: undefined, not 0


@pytest.mark.parametrize("name", expand_rows())
def test_our_rows_beat_the_mean(task, name):
    train, test = task[:3], task[3:]
    result = run_protocol(name, train, test, normalization="cpm-log1p", genes="hvg:6", **fast_options(name))
    baseline = run_protocol("mean", train, test, normalization="cpm-log1p", genes="hvg:6")
    pred, truth = result.pooled()
    assert result.genes == baseline.genes and pred.shape == truth.shape == (128, 6)
    assert mse_per_gene(truth, pred).mean() < mse_per_gene(truth, baseline.pooled()[0]).mean()
    assert np.nanmean(pearson_per_gene(truth, pred)) > 0.3
    assert json.loads(json.dumps(result.metadata))["row"] == name  # results are JSON, never pickles
