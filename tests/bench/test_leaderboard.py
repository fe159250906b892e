"""Leaderboard aggregation: HEST's fold-then-task averaging, intervals, ranking, Markdown."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from virtualst.bench.leaderboard import across_tasks, best_image_row, build_leaderboard, markdown_report, markdown_table, verdict
from virtualst.bench.metrics import bootstrap_means


def per_gene_rows(task, row, fold_scores, norm="log1p", encoder="enc"):
    """A per-gene table: one fold per entry of ``fold_scores`` (a list of Pearson values per gene)."""
    frames = []
    for k, scores in enumerate(fold_scores):
        n = len(scores)
        frames.append(
            pd.DataFrame(
                {
                    "task": task,
                    "encoder": encoder,
                    "normalization": norm,
                    "row": row,
                    "fold": f"f{k}",
                    "gene": [f"g{j}" for j in range(n)],
                    "pearson": scores,
                    "spearman": scores,
                    "mse": np.full(n, 1.0 + k),
                    "mae": np.full(n, 0.5),
                    "mean_expression": np.arange(n, 0, -1, dtype=float),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def test_pearson_is_the_mean_over_folds_of_the_mean_over_genes():
    table = per_gene_rows("t", "ridge", [[0.1, 0.3], [0.5, 0.7, np.nan]])
    entry = build_leaderboard(table, n_boot=200).iloc[0]
    assert entry["pearson"] == pytest.approx(np.mean([0.2, 0.6]))
    assert entry["pearson_std"] == pytest.approx(np.std([0.2, 0.6]))  # population std, as HEST
    assert entry["n_folds"] == 2 and entry["n_nan"] == 1 and entry["n_genes"] == 3
    assert entry["mse"] == pytest.approx(1.5)


def test_top_k_uses_the_most_expressed_genes_of_each_fold():
    table = per_gene_rows("t", "ridge", [[0.9, 0.1, 0.1, 0.1]])  # g0 is the most expressed
    assert build_leaderboard(table, top_k=1, n_boot=10).iloc[0]["pearson_top"] == pytest.approx(0.9)


def test_interval_resamples_genes_of_every_fold_together():
    scores = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.9]]
    entry = build_leaderboard(per_gene_rows("t", "ridge", scores), n_boot=500, seed=3).iloc[0]
    draws = np.mean([bootstrap_means(s, 500, 3) for s in scores], axis=0)
    assert (entry["ci_low"], entry["ci_high"]) == pytest.approx(tuple(np.quantile(draws, [0.025, 0.975])))
    assert entry["ci_low"] < entry["pearson"] < entry["ci_high"]


def test_ranking_is_per_task_and_normalisation_with_undefined_scores_last():
    table = pd.concat(
        [
            per_gene_rows("a", "ridge", [[0.2, 0.2]]),
            per_gene_rows("a", "knn", [[0.4, 0.4]]),
            per_gene_rows("a", "mean", [[np.nan, np.nan]]),
            per_gene_rows("a", "ridge", [[0.9, 0.9]], norm="cpm-log1p"),
            per_gene_rows("b", "ridge", [[0.6, 0.6]]),
        ]
    )
    board = build_leaderboard(table, n_boot=10)
    a = board[(board["task"] == "a") & (board["normalization"] == "log1p")]
    assert list(a["row"]) == ["knn", "ridge", "mean"] and list(a["rank"]) == [1, 2, 3]
    assert np.isnan(a["pearson"].iloc[2])
    assert board[board["task"] == "b"]["rank"].tolist() == [1]
    overall = across_tasks(board)
    ridge = overall[(overall["row"] == "ridge") & (overall["normalization"] == "log1p")].iloc[0]
    assert ridge["n_tasks"] == 2 and ridge["pearson"] == pytest.approx(0.4)


def test_best_image_row_skips_the_depth_oracle_and_verdict_states_the_margin():
    table = pd.concat(
        [
            per_gene_rows("a", "library-size", [[0.8, 0.8]]),
            per_gene_rows("a", "knn", [[0.4, 0.4]]),
            per_gene_rows("a", "hest-ridge", [[0.25, 0.25]]),
        ]
    )
    board = build_leaderboard(table, n_boot=10)
    assert best_image_row(board).row == "knn"
    assert verdict(board) == "Best image-based row: `knn` (enc), Pearson 0.400, +0.150 over `hest-ridge` (0.250)."
    md = markdown_table(board)
    assert "**0.400 ± 0.000**" in md and "**0.800" not in md
    assert "not a predictor" in md and "0.250 ± 0.000" in md


def test_markdown_report_labels_split_and_exactness_of_the_hest_row():
    table = pd.concat([per_gene_rows("a", "hest-ridge", [[0.3]]), per_gene_rows("a", "hest-ridge", [[0.3]], norm="cpm-log1p")])
    board = build_leaderboard(table, n_boot=10)
    info = {"a": {"description": "task a", "split": "leave-one-sample-out", "genes": "hvg:50", "n_folds": 1, "patient_disjoint": False}}
    text = markdown_report(board, {"command": "virtualst bench"}, info, figures={("a", "log1p"): ["plots/x.png"]})
    assert "## a — log1p targets" in text and "## a — cpm-log1p targets" in text
    assert "**not patient-disjoint**" in text and "![plots/x.png](plots/x.png)" in text
    log1p, cpm = text.split("## a — cpm-log1p targets")
    assert "exact (log1p targets)" in log1p and "HEST reports log1p only" in cpm


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="fold"):
        build_leaderboard(per_gene_rows("a", "r", [[0.1]]).drop(columns="fold"))
