"""Per-gene scores of predicted expression, their summaries, and the HEST-Benchmark aggregation.

Conventions
-----------
* Arrays are ``(n_spots, n_genes)``, truth first; every score is per gene
  (column), computed on all the spots of one fold pooled (as HEST-Benchmark
  pools the test samples of a split).
* Pearson and Spearman are undefined when either column is constant: a gene
  never detected in the test fold, or a row such as ``mean`` that predicts
  one value per gene. They are NaN here, never 0 (0 would rank an undefined
  score as "no correlation" and drag means down without saying so). Every
  mean over genes skips NaNs and reports how many it skipped (``n_nan``).
  Unlike :func:`virtualst.heads.cv.pearson_per_gene`, which returns 0 so
  that hyper-parameter searches always get a number. HEST-Benchmark's own
  fold mean is a plain mean, so one undefined gene makes its fold NaN
  there: check ``n_nan`` when comparing with published numbers.
* The "top-k" summary averages the ``k`` genes with the highest mean
  measured expression in the fold's own test truth (the ``mean_expression``
  column). Ranking by the evaluated truth is leak-free: it only chooses
  which scores to average, nothing is fitted on it, and every row scored on
  the fold shares the same genes; ranking on the training fold instead
  would make the subset depend on which samples happened to train.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.stats import rankdata

#: A column whose standard deviation is below this fraction of its largest
#: magnitude is constant: mean subtraction leaves ~1e-17 noise on exact
#: constants, which must not turn into a random correlation.
CONSTANT_RTOL = 1e-12

#: Bootstrap means drawn per batch (bounds memory at large gene counts).
_BOOT_BATCH = 100


def _check_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.ndim == 1:
        t = t[:, None]
    if p.ndim == 1:
        p = p[:, None]
    if t.ndim != 2 or t.shape != p.shape:
        raise ValueError(f"truth {np.shape(y_true)} and predictions {np.shape(y_pred)} must both be (n_spots, n_genes)")
    if len(t) == 0:
        raise ValueError("no spots to score")
    # A NaN prediction is a bug upstream: say so rather than score around it.
    for name, a in (("truth", t), ("predictions", p)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contain non-finite values")
    return t, p


def _constant(a: np.ndarray) -> np.ndarray:
    """True for the columns of ``a`` that are constant (see :data:`CONSTANT_RTOL`)."""
    scale = np.maximum(np.abs(a).max(axis=0), 1.0)
    return a.std(axis=0) <= CONSTANT_RTOL * scale


def _correlation(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    tc = t - t.mean(axis=0)
    pc = p - p.mean(axis=0)
    undefined = _constant(t) | _constant(p)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (tc * pc).sum(axis=0) / np.sqrt((tc * tc).sum(axis=0) * (pc * pc).sum(axis=0))
    return np.where(undefined, np.nan, np.clip(r, -1.0, 1.0))


def pearson_per_gene(y_true, y_pred) -> np.ndarray:
    """Pearson r of each gene, NaN where either column is constant.

    Parameters
    ----------
    y_true, y_pred : array-like (n_spots, n_genes) or (n_spots,)

    Returns
    -------
    ndarray (n_genes,)
    """
    return _correlation(*_check_pair(y_true, y_pred))


def spearman_per_gene(y_true, y_pred) -> np.ndarray:
    """Spearman rho of each gene (Pearson of average ranks, as :func:`scipy.stats.spearmanr`), NaN where either column is constant."""
    t, p = _check_pair(y_true, y_pred)
    return _correlation(rankdata(t, axis=0), rankdata(p, axis=0))


def mse_per_gene(y_true, y_pred) -> np.ndarray:
    """Mean squared error of each gene."""
    t, p = _check_pair(y_true, y_pred)
    return ((t - p) ** 2).mean(axis=0)


def mae_per_gene(y_true, y_pred) -> np.ndarray:
    """Mean absolute error of each gene."""
    t, p = _check_pair(y_true, y_pred)
    return np.abs(t - p).mean(axis=0)


#: Per-gene metrics by column name, in table order.
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "pearson": pearson_per_gene,
    "spearman": spearman_per_gene,
    "mse": mse_per_gene,
    "mae": mae_per_gene,
}


def gene_table(y_true, y_pred, genes: Sequence[str], fold: str = "") -> pd.DataFrame:
    """Every metric of every gene of one fold.

    Parameters
    ----------
    y_true, y_pred : array-like (n_spots, n_genes)
        Measured (never smoothed) and predicted expression, test spots pooled.
    genes
        Gene names, one per column.
    fold
        Fold label copied onto every row.

    Returns
    -------
    pandas.DataFrame
        Columns ``gene, fold, pearson, spearman, mse, mae, mean_expression``
        (the mean of the truth column), one row per gene.
    """
    t, p = _check_pair(y_true, y_pred)
    if len(genes) != t.shape[1]:
        raise ValueError(f"{len(genes)} gene names for {t.shape[1]} columns")
    table = pd.DataFrame({"gene": [str(g) for g in genes], "fold": str(fold)})
    for name, metric in METRICS.items():
        table[name] = metric(t, p)
    table["mean_expression"] = t.mean(axis=0)
    return table


# ----------------------------------------------------------------------- summaries
def bootstrap_means(values, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of the non-NaN ``values``; empty when none.

    The same ``seed`` always gives the same resamples.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return np.empty(0)
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [v[rng.integers(0, v.size, size=(min(_BOOT_BATCH, n_boot - b), v.size))].mean(axis=1) for b in range(0, n_boot, _BOOT_BATCH)]
    )


def percentile_interval(means: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Central ``level`` interval of bootstrap means; NaN, NaN when there are none."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if len(means) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_ci(values, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over genes.

    Genes are resampled with replacement; NaN genes are dropped first.
    The same ``seed`` always gives the same interval.

    Returns
    -------
    (low, high)
        NaN, NaN when no gene has a score.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return percentile_interval(bootstrap_means(values, n_boot, seed), level)


@dataclass(frozen=True)
class GeneSummary:
    """One metric summarised over the genes of a fold.

    Attributes
    ----------
    mean
        Mean over the genes with a score (NaN genes skipped).
    n_genes, n_nan
        Genes in all, genes skipped for an undefined score.
    top_k_mean, top_k, top_k_nan
        Mean over the ``top_k`` most expressed genes, and how many of them were NaN.
    ci_low, ci_high
        Bootstrap interval of ``mean`` (see :func:`bootstrap_ci`).
    """

    mean: float
    n_genes: int
    n_nan: int
    top_k_mean: float
    top_k: int
    top_k_nan: int
    ci_low: float
    ci_high: float


def _nanmean(v: np.ndarray) -> float:
    return float(v[~np.isnan(v)].mean()) if (~np.isnan(v)).any() else float("nan")


def summarize_genes(values, mean_expression, top_k: int = 50, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> GeneSummary:
    """Summarise per-gene scores: mean, top-``k`` by expression, bootstrap interval.

    Parameters
    ----------
    values : array-like (n_genes,)
        One metric per gene, NaN where undefined.
    mean_expression : array-like (n_genes,)
        Ranks the genes for the top-``k`` mean (ties: first gene first).
    top_k
        Genes in the top subset (all of them when there are fewer).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    expr = np.asarray(mean_expression, dtype=np.float64).ravel()
    if v.shape != expr.shape:
        raise ValueError(f"{v.size} scores but {expr.size} mean expressions")
    top = v[np.argsort(-expr, kind="stable")[:top_k]]
    low, high = bootstrap_ci(v, n_boot=n_boot, level=level, seed=seed)
    return GeneSummary(
        mean=_nanmean(v),
        n_genes=int(v.size),
        n_nan=int(np.isnan(v).sum()),
        top_k_mean=_nanmean(top),
        top_k=int(top.size),
        top_k_nan=int(np.isnan(top).sum()),
        ci_low=low,
        ci_high=high,
    )


def _key_columns(table: pd.DataFrame) -> list[str]:
    """Columns identifying a fold (``fold``, and ``task``/``row``... when present)."""
    return [c for c in table.columns if c not in ("gene", "mean_expression", *METRICS)]


def summarize(table: pd.DataFrame, top_k: int = 50, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Summaries of a per-gene table, one row per fold and metric.

    Parameters
    ----------
    table
        :func:`gene_table` output, possibly several folds concatenated and
        extra key columns (``task``, ``row``...) added; each combination of
        the non-metric columns is summarised separately.

    Returns
    -------
    pandas.DataFrame
        The key columns, ``metric``, and the fields of :class:`GeneSummary`.
    """
    keys = _key_columns(table)
    records = []
    groups = table.groupby(keys, sort=False, dropna=False) if keys else [((), table)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        for metric in METRICS:
            summary = summarize_genes(part[metric], part["mean_expression"], top_k=top_k, n_boot=n_boot, level=level, seed=seed)
            records.append({**dict(zip(keys, key)), "metric": metric, **asdict(summary)})
    return pd.DataFrame.from_records(records)


# ----------------------------------------------------------------------- HEST aggregation
def fold_means(table: pd.DataFrame, metric: str = "pearson") -> pd.DataFrame:
    """Mean of ``metric`` over the genes of each fold (NaN genes skipped), with the count skipped.

    Returns
    -------
    pandas.DataFrame
        The key columns of ``table``, ``metric`` (the fold mean) and ``n_nan``.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    keys = _key_columns(table)
    grouped = table.groupby(keys, sort=False, dropna=False)[metric]
    return pd.DataFrame({metric: grouped.mean(), "n_nan": grouped.apply(lambda s: int(s.isna().sum()))}).reset_index()


@dataclass(frozen=True)
class HestAggregate:
    """HEST-Benchmark numbers: per task mean ± std over folds, and the mean over tasks.

    Attributes
    ----------
    per_task : pandas.DataFrame
        Columns ``task, n_folds, mean, std``.
    mean : float
        Mean of the task means (each task weighs the same, whatever its folds).
    """

    per_task: pd.DataFrame
    mean: float


def aggregate_hest(per_fold_means: Mapping[str, Sequence[float]] | pd.DataFrame, value: str = "pearson") -> HestAggregate:
    """Aggregate per-fold mean scores as HEST-Benchmark does.

    Pearson per gene -> mean per fold (:func:`fold_means`) -> mean and std
    over the folds of a task -> mean over tasks. The std is numpy's default
    population std (``ddof=0``), the "±" HEST reports. A fold mean that is
    NaN (no gene could be scored) makes its task and the overall mean NaN:
    visible, rather than averaged away.

    Parameters
    ----------
    per_fold_means
        ``{task: [fold mean, ...]}``, or a DataFrame with a ``task`` column
        and the ``value`` column (one row per fold).
    value
        Column holding the fold means in a DataFrame.
    """
    if isinstance(per_fold_means, pd.DataFrame):
        if "task" not in per_fold_means or value not in per_fold_means:
            raise ValueError(f"per-fold table needs 'task' and {value!r} columns, got {list(per_fold_means.columns)}")
        by_task = {str(t): part[value].to_numpy(dtype=np.float64) for t, part in per_fold_means.groupby("task", sort=False)}
    else:
        by_task = {str(t): np.asarray(v, dtype=np.float64).ravel() for t, v in per_fold_means.items()}
    if not by_task or any(v.size == 0 for v in by_task.values()):
        raise ValueError("every task needs at least one fold mean")
    per_task = pd.DataFrame(
        {
            "task": list(by_task),
            "n_folds": [v.size for v in by_task.values()],
            "mean": [float(np.mean(v)) for v in by_task.values()],
            "std": [float(np.std(v)) for v in by_task.values()],
        }
    )
    return HestAggregate(per_task=per_task, mean=float(per_task["mean"].mean(skipna=False)))
