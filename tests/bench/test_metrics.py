"""Per-gene metrics, summaries and HEST aggregation (virtualst.bench.metrics)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from virtualst.bench.metrics import (
    METRICS,
    aggregate_hest,
    bootstrap_ci,
    fold_means,
    gene_table,
    mae_per_gene,
    mse_per_gene,
    pearson_per_gene,
    spearman_per_gene,
    summarize,
    summarize_genes,
)


@pytest.fixture
def pair():
    """80 spots x 6 genes; integer-valued truth so Spearman sees ties."""
    rng = np.random.default_rng(0)
    truth = rng.poisson(3.0, size=(80, 6)).astype(float)
    pred = 0.5 * truth + rng.normal(size=(80, 6))
    return truth, pred


# ---------------------------------------------------------------- per-gene values
def test_correlations_match_scipy(pair):
    truth, pred = pair
    expected_r = [stats.pearsonr(truth[:, j], pred[:, j])[0] for j in range(truth.shape[1])]
    expected_rho = [stats.spearmanr(truth[:, j], pred[:, j])[0] for j in range(truth.shape[1])]
    np.testing.assert_allclose(pearson_per_gene(truth, pred), expected_r, rtol=0, atol=1e-12)
    np.testing.assert_allclose(spearman_per_gene(truth, pred), expected_rho, rtol=0, atol=1e-12)


def test_errors_and_1d_input(pair):
    truth, pred = pair
    np.testing.assert_allclose(mse_per_gene(truth, pred), ((truth - pred) ** 2).mean(axis=0))
    np.testing.assert_allclose(mae_per_gene(truth, pred), np.abs(truth - pred).mean(axis=0))
    assert pearson_per_gene(truth[:, 0], pred[:, 0]).shape == (1,)


def test_constant_columns_are_nan_never_zero(pair):
    truth, pred = pair[0].copy(), pair[1].copy()
    truth[:, 1] = 0.0  # gene not detected in the test fold
    pred[:, 2] = 0.1  # a constant prediction (float mean noise must not make it a correlation)
    for metric in (pearson_per_gene, spearman_per_gene):
        r = metric(truth, pred)
        assert np.isnan(r[[1, 2]]).all()
        assert np.isfinite(np.delete(r, [1, 2])).all()
    table = gene_table(truth, pred, [f"g{j}" for j in range(6)], fold="f0")
    s = summarize(table, n_boot=50).set_index("metric")
    assert s.loc["pearson", "n_nan"] == 2 and s.loc["pearson", "n_genes"] == 6
    assert s.loc["pearson", "mean"] == pytest.approx(np.nanmean(table["pearson"]))
    assert s.loc["mse", "n_nan"] == 0  # errors stay defined


def test_invalid_inputs_raise(pair):
    truth, pred = pair
    with pytest.raises(ValueError, match="must both be"):
        pearson_per_gene(truth, pred[:, :3])
    bad = pred.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        mse_per_gene(truth, bad)
    with pytest.raises(ValueError, match="gene names"):
        gene_table(truth, pred, ["a"])


def test_gene_table_columns(pair):
    truth, pred = pair
    table = gene_table(truth, pred, list("abcdef"), fold="k0")
    assert list(table.columns) == ["gene", "fold", *METRICS, "mean_expression"]
    assert (table["fold"] == "k0").all()
    np.testing.assert_allclose(table["mean_expression"], truth.mean(axis=0))


# ---------------------------------------------------------------- summaries
def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = np.random.default_rng(1).normal(0.3, 0.1, size=50)
    values[[3, 7]] = np.nan
    low, high = bootstrap_ci(values, n_boot=1000, seed=0)
    mean = np.nanmean(values)
    assert low < mean < high
    assert high - low < 0.1  # ~4 standard errors of a 48-gene mean
    assert bootstrap_ci(values, n_boot=1000, seed=0) == (low, high)
    assert bootstrap_ci(values, n_boot=1000, seed=1) != (low, high)
    assert np.isnan(bootstrap_ci([np.nan, np.nan])).all()
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(values, level=1.5)


def test_top_k_takes_most_expressed_genes():
    values = np.array([0.9, 0.1, np.nan, 0.5])
    expression = np.array([1.0, 5.0, 4.0, 3.0])
    s = summarize_genes(values, expression, top_k=2, n_boot=20)
    assert s.top_k_mean == pytest.approx(0.1) and s.top_k_nan == 1  # genes 1 and 2; gene 2 undefined
    assert s.mean == pytest.approx(0.5) and s.n_nan == 1
    assert summarize_genes(values, expression, top_k=50, n_boot=20).top_k == 4


def test_summarize_one_row_per_fold_and_metric(pair):
    truth, pred = pair
    genes = list("abcdef")
    table = pd.concat([gene_table(truth, pred, genes, "k0"), gene_table(truth, -pred, genes, "k1")])
    table["row"] = "ridge"
    s = summarize(table, top_k=3, n_boot=100)
    assert len(s) == 2 * len(METRICS)
    assert set(s.columns) >= {"fold", "row", "metric", "mean", "n_nan", "top_k_mean", "ci_low", "ci_high"}
    r = s[s.metric == "pearson"].set_index("fold")["mean"]
    assert r["k0"] == pytest.approx(-r["k1"])


# ---------------------------------------------------------------- HEST aggregation
def test_aggregate_hest_toy_table():
    agg = aggregate_hest({"IDC": [0.2, 0.4], "PRAD": [0.3, 0.3, 0.6]})
    t = agg.per_task.set_index("task")
    assert t.loc["IDC", "mean"] == pytest.approx(0.3) and t.loc["IDC", "std"] == pytest.approx(0.1)  # ddof=0
    assert t.loc["PRAD", "std"] == pytest.approx(np.sqrt((0.1**2 + 0.1**2 + 0.2**2) / 3))
    assert list(t["n_folds"]) == [2, 3]
    assert agg.mean == pytest.approx(0.35)  # tasks weigh the same, not folds


def test_aggregate_hest_from_gene_tables():
    rows = []
    for task, folds in {"A": {"f0": [0.1, 0.3], "f1": [0.5, np.nan]}, "B": {"f0": [0.2, 0.2]}}.items():
        for fold, r in folds.items():
            rows += [
                {"task": task, "fold": fold, "gene": f"g{i}", "pearson": v, "spearman": v, "mse": 1.0, "mae": 1.0, "mean_expression": 1.0}
                for i, v in enumerate(r)
            ]
    means = fold_means(pd.DataFrame(rows))
    assert means.set_index(["task", "fold"]).loc[("A", "f1"), "n_nan"] == 1
    agg = aggregate_hest(means)
    assert agg.per_task.set_index("task").loc["A", "mean"] == pytest.approx(0.35)  # (0.2 + 0.5) / 2
    assert agg.mean == pytest.approx((0.35 + 0.2) / 2)
    assert np.isnan(aggregate_hest({"A": [0.2, np.nan]}).mean)  # an unscorable fold stays visible
    with pytest.raises(ValueError, match="task"):
        aggregate_hest(pd.DataFrame({"pearson": [0.1]}))
