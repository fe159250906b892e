"""Gradient-boosted trees, one LightGBM booster per gene, on PCA features.

Each gene gets its own booster trained with the native ``lightgbm.train`` API.
The number of trees is chosen by early stopping on an inner validation split
(whole groups held out when ``groups`` are given, so the stopping point is not
tuned on spots that neighbour training spots), then every booster is refitted
on all spots with that many trees. Boosters are saved as LightGBM's own text
models, so a saved head never goes through pickle.
"""

from __future__ import annotations

import queue
from typing import Any

import lightgbm as lgb
import numpy as np
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.utils.validation import check_is_fitted, validate_data

from virtualst.heads.base import Head
from virtualst.heads.features import FeatureTransform


def validation_split(n_samples: int, groups=None, fraction: float = 0.2, random_state: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """Train/validation indices for early stopping, or ``None`` when too few rows.

    With >= 2 distinct ``groups``, whole groups (in a seeded random order) are
    held out until at least ``fraction`` of the rows are; at least one group
    always stays in training. Otherwise a seeded random ``fraction`` of rows.

    Parameters
    ----------
    n_samples
        Number of rows.
    groups
        Optional group label per row.
    fraction
        Target share of validation rows, in (0, 1).
    random_state
        Seed of the group order / row permutation.
    """
    rng = np.random.default_rng(random_state)
    index = np.arange(n_samples)
    if groups is not None:
        labels, codes = np.unique(np.asarray(groups), return_inverse=True)
        if len(labels) >= 2:
            counts = np.bincount(codes)
            held: list[int] = []
            for g in rng.permutation(len(labels))[: len(labels) - 1]:
                held.append(int(g))
                if counts[held].sum() >= fraction * n_samples:
                    break
            is_valid = np.isin(codes, held)
            return index[~is_valid], index[is_valid]
    n_valid = int(round(fraction * n_samples))
    if n_valid < 1 or n_samples - n_valid < 2:
        return None
    perm = rng.permutation(n_samples)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def _binned_datasets(Z: np.ndarray, split, params: dict[str, Any]) -> tuple[lgb.Dataset, tuple | None]:
    """LightGBM datasets binned once, their labels set per gene: ``(all rows, early-stopping pair)``.

    ``split`` is ``(train_index, valid_index)`` or ``None``; the pair is
    ``(train, valid, train_index, valid_index)`` with ``valid`` binned like
    ``train``. Binning the same features again for every gene cost about a
    tenth of the fit (20,000 spots, 32 components).
    """
    full = lgb.Dataset(Z, label=np.zeros(len(Z)), params=params).construct()
    if split is None:
        return full, None
    train, valid = split
    dtrain = lgb.Dataset(Z[train], label=np.zeros(len(train)), params=params).construct()
    dvalid = lgb.Dataset(Z[valid], label=np.zeros(len(valid)), reference=dtrain, params=params).construct()
    return full, (dtrain, dvalid, train, valid)


def _fit_gene(
    y, pool: queue.SimpleQueue, params: dict[str, Any], n_estimators: int, early_stopping_rounds: int | None
) -> tuple[lgb.Booster, int]:
    """Early-stop on the pair (when there is one), then refit on all rows; returns ``(booster, n_trees)``.

    ``pool`` holds one :func:`_binned_datasets` per parallel job: a gene
    borrows one, relabels it, and gives it back.
    """
    full, pair = pool.get()
    try:
        n_trees = n_estimators
        if pair is not None:
            dtrain, dvalid, train, valid = pair
            dtrain.set_label(y[train])
            dvalid.set_label(y[valid])
            stop = lgb.early_stopping(early_stopping_rounds, first_metric_only=True, verbose=False)
            probe = lgb.train(params, dtrain, num_boost_round=n_estimators, valid_sets=[dvalid], callbacks=[stop])
            n_trees = max(1, probe.best_iteration or n_estimators)
        # Refit on every spot: with few sections the held-out group is a third of the data (see LGBMHead notes).
        full.set_label(y)
        return lgb.train(params, full, num_boost_round=n_trees), n_trees
    finally:
        pool.put((full, pair))


class LGBMHead(Head):
    """One LightGBM regressor per gene on standardised, PCA-reduced embeddings.

    Parameters
    ----------
    n_components
        Principal components fed to the trees (``None``: all standardised
        features). Trees split on one axis at a time, so a few dozen
        high-variance directions work better than hundreds of noisy ones.
    n_estimators
        Maximum boosting rounds per gene.
    learning_rate
        Shrinkage per tree.
    num_leaves
        Leaves per tree.
    min_child_samples
        Minimum spots per leaf.
    subsample
        Row fraction bagged for each tree (``1.0`` disables bagging).
    colsample_bytree
        Feature fraction sampled for each tree.
    reg_lambda
        L2 penalty on leaf values.
    early_stopping_rounds
        Stop when the validation MSE has not improved for this many rounds;
        ``None`` or ``0`` trains ``n_estimators`` rounds on all spots.
    validation_fraction
        Share of spots (whole groups when ``groups`` are given) held out
        for early stopping.
    n_jobs
        Genes fitted in parallel threads (each booster single-threaded);
        ``-1`` uses every core. When there are fewer genes than jobs, the
        spare cores go to LightGBM's own threads.
    random_state
        Seed of the validation split and of LightGBM's bagging and feature
        sampling; the same data and parameters give identical predictions.

    Attributes
    ----------
    transform_ : FeatureTransform
    boosters_ : list of lightgbm.Booster, one per target
    best_iteration_ : ndarray of int (n_targets_,)
        Trees in each refitted booster (the early-stopping choice).
    n_targets_ : int
    n_features_in_ : int
    y_ndim_ : int
        1 when fitted on a 1-D ``y`` (predictions are then 1-D).

    Notes
    -----
    Defaults were chosen by leave-one-section-out on her2st C2–C5 (~180
    spots per section, 50 HVGs): 32 components beat 16, 64, 128 and 256;
    ``learning_rate=0.02`` with ``min_child_samples=40`` beat faster, less
    regularised trees (mean Pearson 0.33 vs 0.30). On the synthetic
    20,000-spot problem of ``virtualst perf`` row 6 they stop after a median
    336 trees (1-993 over 40 genes; 100 genes in ~66 s on 2 cores).

    After early stopping, each booster is refitted on all spots with the
    chosen number of trees rather than kept: with three training sections
    the held-out group is a third of the data, and refitting gained 0.01
    mean Pearson over keeping the early-stopped booster.
    """

    kind = "lgbm"

    def __init__(
        self,
        n_components: int | None = 32,
        n_estimators: int = 1000,
        learning_rate: float = 0.02,
        num_leaves: int = 15,
        min_child_samples: int = 40,
        subsample: float = 0.8,
        colsample_bytree: float = 0.5,
        reg_lambda: float = 1.0,
        early_stopping_rounds: int | None = 100,
        validation_fraction: float = 0.2,
        n_jobs: int | None = -1,
        random_state: int = 0,
    ) -> None:
        self.n_components = n_components
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.early_stopping_rounds = early_stopping_rounds
        self.validation_fraction = validation_fraction
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _lgb_params(self, num_threads: int) -> dict[str, Any]:
        return {
            "objective": "regression",
            "metric": "l2",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "bagging_fraction": self.subsample,
            "bagging_freq": 1 if self.subsample < 1.0 else 0,
            "feature_fraction": self.colsample_bytree,
            "lambda_l2": self.reg_lambda,
            "seed": self.random_state,
            "deterministic": True,
            # col-wise skips LightGBM's timing test (a nondeterministic choice) and suits few features.
            "force_col_wise": True,
            "num_threads": num_threads,
            "verbosity": -1,
        }

    def _threads(self, n_tasks: int) -> tuple[int, int]:
        """``(parallel gene jobs, LightGBM threads per booster)``."""
        total = max(1, effective_n_jobs(self.n_jobs))
        jobs = max(1, min(total, n_tasks))
        return jobs, max(1, total // jobs)

    def fit(self, X, Y, groups=None):
        """Fit one booster per column of ``Y``.

        Parameters
        ----------
        X : array-like (n_spots, n_features)
        Y : array-like (n_spots,) or (n_spots, n_targets)
        groups : array-like (n_spots,), optional
            Section/patient ids; the early-stopping split holds out whole groups.
        """
        # Bagging one spot leaves LightGBM an empty dataset: ask for two.
        X, Y2, groups = self._fit_data(X, Y, groups, min_samples=2)
        self.transform_ = FeatureTransform(n_components=self.n_components).fit(X)
        Z = self.transform_.transform(X)
        split = validation_split(len(Z), groups, self.validation_fraction, self.random_state) if self.early_stopping_rounds else None
        jobs, threads = self._threads(Y2.shape[1])
        params = self._lgb_params(threads)
        pool: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(jobs):
            pool.put(_binned_datasets(Z, split, params))
        fitted = Parallel(n_jobs=jobs, prefer="threads")(
            delayed(_fit_gene)(Y2[:, j], pool, params, self.n_estimators, self.early_stopping_rounds) for j in range(Y2.shape[1])
        )
        self.boosters_ = [b for b, _ in fitted]
        self.best_iteration_ = np.array([n for _, n in fitted], dtype=np.int64)
        self.n_targets_ = Y2.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        """Predicted targets, ``(n_spots,)`` when fitted on 1-D ``y``, else ``(n_spots, n_targets)``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        Z = self.transform_.transform(X)
        jobs, threads = self._threads(len(self.boosters_))
        cols = Parallel(n_jobs=jobs, prefer="threads")(delayed(b.predict)(Z, num_threads=threads) for b in self.boosters_)
        P = np.column_stack(cols)
        return self._as_fitted_shape(P)

    # ------------------------------------------------------------------ state
    def _export(self):
        meta = {"y_ndim": int(self.y_ndim_), "n_targets": int(self.n_targets_), "best_iteration": self.best_iteration_}
        texts = {f"gene_{j:04d}": b.model_to_string() for j, b in enumerate(self.boosters_)}
        return meta, self.transform_.export_arrays("features."), texts, {}

    def _restore(self, meta, arrays, texts, children):
        self.transform_ = FeatureTransform(n_components=self.n_components).restore_arrays(arrays, "features.")
        self.n_features_in_ = self.transform_.n_features_in_
        self.n_targets_ = int(meta["n_targets"])
        self.y_ndim_ = int(meta["y_ndim"])
        self.best_iteration_ = np.asarray(meta["best_iteration"], dtype=np.int64)
        self.boosters_ = [lgb.Booster(model_str=texts[f"gene_{j:04d}"]) for j in range(self.n_targets_)]
