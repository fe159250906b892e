"""Inner cross-validation shared by the heads that choose hyper-parameters.

Folds follow ``groups`` (sample or patient ids) when there are at least two,
so a spot is never scored by a model that saw its neighbours on the same
section; otherwise plain shuffled k-fold with a fixed seed.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import GroupKFold, KFold


def inner_splits(
    n_samples: int, groups=None, n_splits: int = 5, random_state: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train/validation index pairs over ``n_samples`` rows.

    Parameters
    ----------
    n_samples
        Number of rows.
    groups
        Optional group label per row; with >= 2 distinct labels, folds are
        group-disjoint (at most ``n_splits``, at most one per group).
    n_splits
        Folds wanted.
    random_state
        Seed of the shuffled k-fold used without groups.
    """
    index = np.arange(n_samples)
    if groups is not None:
        groups = np.asarray(groups)
        n_groups = len(np.unique(groups))
        if n_groups >= 2:
            return list(GroupKFold(n_splits=min(n_splits, n_groups)).split(index, groups=groups))
    k = max(2, min(n_splits, n_samples))
    return list(KFold(n_splits=k, shuffle=True, random_state=random_state).split(index))


def pearson_per_gene(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson r of each column; 0 where either column is constant."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.ndim == 1:
        t, p = t[:, None], p[:, None]
    t = t - t.mean(axis=0)
    p = p - p.mean(axis=0)
    denom = np.sqrt((t * t).sum(axis=0) * (p * p).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (t * p).sum(axis=0) / denom
    return np.where(denom > 0, r, 0.0)
