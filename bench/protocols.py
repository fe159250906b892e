"""Benchmark rows: what is fitted on a training fold and how its test spots are predicted.

Every row (:data:`ROWS`) is a config dataclass, a :class:`Protocol`, and runs
the same frame (:meth:`Protocol.run`):

1. genes chosen on the training samples only (an explicit list pins them);
2. targets: the normalised counts of those genes, sample by sample;
3. the row's model: everything (scaler, PCA, heads, smoothing strength)
   fitted on the training samples only, the test samples only predicted;
4. truths: the test spots' normalised counts as measured, never smoothed.

Rows:

* ``hest-ridge`` — the HEST-Benchmark linear probe (DESIGN.md §4):
  ``StandardScaler`` + ``PCA(256)`` + ``Ridge(alpha = 100 / (n_features ·
  n_genes), fit_intercept=False, solver="lsqr", max_iter=1000)`` on the
  requested targets; HEST itself only on ``log1p`` targets, so only that
  run is labelled exact (``metadata["exact_hest"]``); see :class:`HestRidge`.
* ``mean`` — the training mean of each gene: the floor every row must beat.
* ``library-size`` — each gene linear in the spot's ``log1p`` total counts:
  how much of a score the sequencing depth alone explains (DESIGN.md §4).
* ours, ``{head}[+context][+smooth]`` — a head of :data:`HEAD_ROWS` with one of
  the :data:`SMOOTHINGS` (see :func:`expand_rows`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from virtualst.bench.data import SampleData
from virtualst.bench.metrics import gene_table
from virtualst.heads.base import Head, jsonable, make_head
from virtualst.heads.cv import inner_splits
from virtualst.heads.smoothing import FeatureContext, PredictionSmoother
from virtualst.heads.targets import NORMALIZATIONS, GeneSpec, library_size, normalize


@dataclass
class FoldResult:
    """Predictions and truths of one fold's test spots.

    Attributes
    ----------
    genes : list of str
        Predicted genes, in column order.
    predictions, truths : dict of sample id -> ndarray (n_spots, n_genes) float64
        Per test sample, in the order given; truths are the normalised
        measured counts, never smoothed.
    metadata : dict
        JSON-able: row, protocol config, normalisation used and requested,
        gene spec, sample ids, spot counts and fitted scalars (alphas, λ...).
    fitted : dict
        The fitted objects (scaler, PCA, head, smoother...) for inspection;
        not part of the result's identity.
    """

    genes: list[str]
    predictions: dict[str, np.ndarray]
    truths: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)
    fitted: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """``(predictions, truths)`` of all test spots stacked, as HEST-Benchmark scores a split."""
        ids = list(self.predictions)
        return np.concatenate([self.predictions[i] for i in ids]), np.concatenate([self.truths[i] for i in ids])

    def gene_table(self, fold: str | None = None) -> pd.DataFrame:
        """Per-gene metrics on the pooled test spots (:func:`virtualst.bench.metrics.gene_table`)."""
        pred, truth = self.pooled()
        return gene_table(truth, pred, self.genes, fold=self.metadata.get("fold", "") if fold is None else fold)


class _Fit(NamedTuple):
    """What a row's model returns: test predictions, JSON-able metadata, fitted objects."""

    predictions: list[np.ndarray]
    metadata: dict[str, Any]
    fitted: dict[str, Any]


def _check_split(train: Sequence[SampleData], test: Sequence[SampleData]) -> None:
    if not train or not test:
        raise ValueError(f"a fold needs training and test samples, got {len(train)} and {len(test)}")
    for side, samples in (("train", train), ("test", test)):
        ids = [s.sample_id for s in samples]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate sample ids in {side}: {sorted({i for i in ids if ids.count(i) > 1})}")
    shared = {s.sample_id for s in train} & {s.sample_id for s in test}
    if shared:
        raise ValueError(f"samples on both sides of the fold: {', '.join(sorted(shared))}")


def _split_rows(values: np.ndarray, samples: Sequence[SampleData]) -> list[np.ndarray]:
    """Cut rows stacked sample after sample back into one block per sample."""
    return np.split(values, np.cumsum([s.n_spots for s in samples])[:-1])


@dataclass(frozen=True)
class Protocol:
    """A benchmark row: one way of turning training samples into test predictions.

    Subclasses are config dataclasses (their fields are the row's
    parameters) implementing :meth:`_fit_predict`.
    """

    def run(
        self,
        train: Sequence[SampleData],
        test: Sequence[SampleData],
        normalization: str = "log1p",
        genes: str | Sequence[str] | GeneSpec = "hvg:50",
    ) -> FoldResult:
        """Fit on ``train``, predict ``test``.

        Parameters
        ----------
        train, test
            The fold's samples; no sample id on both sides.
        normalization
            A key of :data:`virtualst.heads.targets.NORMALIZATIONS`.
        genes
            A gene spec (``"hvg:50"``, ``"heg:250"``, a list...); ``hvg``/``heg``
            are selected on ``train`` only.
        """
        train, test = list(train), list(test)
        _check_split(train, test)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {normalization!r}; known: {', '.join(NORMALIZATIONS)}")
        spec = GeneSpec.parse(genes)
        chosen = spec.select([s.counts for s in train], [s.genes for s in train])
        y_train = [normalize(s.counts, s.genes, chosen, normalization) for s in train]
        truths = {s.sample_id: normalize(s.counts, s.genes, chosen, normalization) for s in test}
        fit = self._fit_predict(train, y_train, test)
        predictions = {s.sample_id: np.asarray(p, dtype=np.float64).reshape(s.n_spots, len(chosen)) for s, p in zip(test, fit.predictions)}
        metadata = {
            "protocol": type(self).__name__,
            "config": jsonable(asdict(self)),
            "normalization": normalization,
            "gene_spec": str(spec),
            "train_samples": [s.sample_id for s in train],
            "test_samples": [s.sample_id for s in test],
            "n_train_spots": int(sum(s.n_spots for s in train)),
            "n_test_spots": int(sum(s.n_spots for s in test)),
            **jsonable(fit.metadata),
        }
        return FoldResult(genes=list(chosen), predictions=predictions, truths=truths, metadata=metadata, fitted=fit.fitted)

    def _fit_predict(self, train: list[SampleData], y_train: list[np.ndarray], test: list[SampleData]) -> _Fit:
        """Fit on the training samples and their targets; predict each test sample."""
        raise NotImplementedError


# ----------------------------------------------------------------------- HEST-Benchmark
@dataclass(frozen=True)
class HestRidge(Protocol):
    """The HEST-Benchmark linear probe, reproduced (DESIGN.md §4).

    ``StandardScaler`` then ``PCA`` fitted on the training spots, then one
    multi-output ``Ridge`` without intercept on log1p targets. The penalty is
    ``alpha = alpha_numerator / (n_features · n_genes)`` with ``n_features``
    the width of the matrix the ridge is fitted on, i.e. the PCA output
    (256 normally), and ``n_genes`` the number of target columns (50 for the
    HEST tasks): 100 / (256 · 50) ≈ 0.0078, an almost unpenalised fit. (HEST
    computes it from the shapes of the matrices it hands the ridge, after
    PCA; not from the encoder's embedding width.)

    Parameters
    ----------
    n_components
        PCA components; capped at ``min(n_training_spots, n_features)``
        because scikit-learn's PCA cannot return more (the cap, and so
        ``alpha``, is recorded in the metadata).
    alpha_numerator, max_iter
        As HEST: 100 and 1000.
    random_state
        Seeds the PCA (``svd_solver="auto"`` picks the randomized solver for
        256 of 1024+ features) and the ridge; 1, HEST's default seed.
    float32
        Hand the ridge float32 components, as HEST does (it converts the PCA
        outputs to 32-bit tensors); ``False`` keeps float64.

    Notes
    -----
    Without an intercept and with uncentred targets, predictions are off by
    the per-gene mean: Pearson (HEST's only metric) is unaffected, MSE/MAE of
    this row are not comparable with the others. HEST-Benchmark fits log1p
    targets: on any other normalisation this is the same probe but not
    HEST's number, and ``metadata["exact_hest"]`` says which.
    """

    n_components: int = 256
    alpha_numerator: float = 100.0
    max_iter: int = 1000
    random_state: int = 1
    float32: bool = True

    def run(self, train, test, normalization="log1p", genes="hvg:50") -> FoldResult:
        result = super().run(train, test, normalization, genes)
        result.metadata["exact_hest"] = normalization == "log1p"
        return result

    def _fit_predict(self, train, y_train, test) -> _Fit:
        X = np.concatenate([s.features for s in train])
        Y = np.concatenate(y_train)
        k = int(min(self.n_components, *X.shape))
        pipe = Pipeline([("scaler", StandardScaler()), ("pca", PCA(n_components=k, random_state=self.random_state))])
        dtype = np.float32 if self.float32 else np.float64
        Z = pipe.fit_transform(X).astype(dtype)
        alpha = self.alpha_numerator / (Z.shape[1] * Y.shape[1])
        ridge = Ridge(alpha=alpha, fit_intercept=False, solver="lsqr", max_iter=self.max_iter, random_state=self.random_state).fit(Z, Y)
        predictions = [ridge.predict(pipe.transform(s.features).astype(dtype)) for s in test]
        return _Fit(predictions, {"n_components": k, "alpha": alpha}, {"scaler": pipe["scaler"], "pca": pipe["pca"], "ridge": ridge})


# ----------------------------------------------------------------------- baselines
@dataclass(frozen=True)
class MeanBaseline(Protocol):
    """Every test spot gets the training mean of each gene (Pearson undefined: NaN)."""

    def _fit_predict(self, train, y_train, test) -> _Fit:
        mean = np.concatenate(y_train).mean(axis=0)
        return _Fit([np.tile(mean, (s.n_spots, 1)) for s in test], {}, {"mean": mean})


def log_depth(sample: SampleData) -> np.ndarray:
    """``log1p`` of each spot's total counts over every measured gene (0 for an empty spot)."""
    return np.log1p(library_size(sample.counts))


@dataclass(frozen=True)
class LibrarySizeBaseline(Protocol):
    """Each gene as ``a + b · log1p(total counts)``, least squares on the training spots.

    It reads the test spots' own total counts, which no image model sees: it
    is not a predictor but a measure of how much of a row's score the
    sequencing depth alone can explain (log1p targets are confounded by it).
    """

    def _fit_predict(self, train, y_train, test) -> _Fit:
        x = np.concatenate([log_depth(s) for s in train])
        Y = np.concatenate(y_train)
        xc = x - x.mean()
        ss = float(xc @ xc)
        # One depth for every spot: no slope can be fitted, the row falls back to the mean.
        slope = (xc @ (Y - Y.mean(axis=0))) / ss if ss > 0 else np.zeros(Y.shape[1])
        intercept = Y.mean(axis=0) - slope * x.mean()
        predictions = [intercept + np.outer(log_depth(s), slope) for s in test]
        return _Fit(predictions, {"slope": slope, "intercept": intercept}, {})


# ----------------------------------------------------------------------- our heads
def _design(samples: Sequence[SampleData], context: FeatureContext | None) -> np.ndarray:
    """Stacked features, widened sample by sample with their spatial context (never across sections)."""
    blocks = [s.features if context is None else context.transform(s.features, s.coords_um) for s in samples]
    return np.concatenate(blocks)


def _groups(samples: Sequence[SampleData]) -> np.ndarray:
    return np.repeat([s.sample_id for s in samples], [s.n_spots for s in samples])


@dataclass(frozen=True)
class HeadRow(Protocol):
    """One of our heads, optionally with spatial context features and prediction smoothing.

    Parameters
    ----------
    head
        Head kind (:func:`virtualst.heads.base.make_head`).
    row_params
        Head parameters that define the row (``ridge-group``: ``cv="group"``).
    head_params
        Further head parameters (tuning, small test settings), applied over ``row_params``.
    context
        :class:`~virtualst.heads.smoothing.FeatureContext` appended to every
        sample's features, or ``None``.
    smooth
        Smooth each test sample's predictions with a
        :class:`~virtualst.heads.smoothing.PredictionSmoother` whose strength
        per gene is chosen on out-of-fold predictions over the training
        samples (inner folds hold out whole samples). With a single training
        sample there is no out-of-sample prediction to choose from and the
        predictions are left unsmoothed (``metadata["smooth_skipped"]``).
    smooth_strengths
        Candidate λ of the smoother.
    smooth_splits
        Inner folds for the out-of-fold predictions.

    Notes
    -----
    Every head is fitted with ``groups`` = the training sample ids, so its
    own inner validation (group CV of ``ridge-group``, LightGBM early
    stopping, kNN and ensemble CV) holds out whole sections; the default
    ``ridge`` (exact leave-one-out) ignores them.
    """

    head: str = "ridge"
    row_params: Mapping[str, Any] = field(default_factory=dict)
    head_params: Mapping[str, Any] = field(default_factory=dict)
    context: FeatureContext | None = None
    smooth: bool = False
    smooth_strengths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    smooth_splits: int = 5

    def new_head(self) -> Head:
        """An unfitted head with this row's parameters."""
        return make_head(self.head, **{**self.row_params, **self.head_params})

    def _fit_predict(self, train, y_train, test) -> _Fit:
        X, Y, groups = _design(train, self.context), np.concatenate(y_train), _groups(train)
        head = self.new_head().fit(X, Y, groups=groups)
        predictions = [head.predict(_design([s], self.context)) for s in test]
        metadata: dict[str, Any] = {"head_params": head.get_params(deep=False)}
        fitted: dict[str, Any] = {"head": head}
        if self.smooth:
            smoother, note = self._fit_smoother(X, Y, groups, train, y_train)
            fitted["smoother"] = smoother
            if smoother is None:
                metadata["smooth_skipped"] = note
            else:
                predictions = [smoother.transform(np.asarray(p, dtype=np.float64), s.coords_um) for p, s in zip(predictions, test)]
                metadata["smooth_strength"] = smoother.strength_
        return _Fit(predictions, metadata, fitted)

    def _fit_smoother(self, X, Y, groups, train, y_train) -> tuple[PredictionSmoother | None, str]:
        """λ per gene from out-of-fold predictions of the training samples, scored on their raw targets."""
        if len(train) < 2:
            return None, "needs >= 2 training samples for out-of-sample predictions"
        oof = np.empty_like(Y)
        for fit_rows, held_out in inner_splits(len(X), groups, self.smooth_splits):
            inner = self.new_head().fit(X[fit_rows], Y[fit_rows], groups=groups[fit_rows])
            oof[held_out] = np.asarray(inner.predict(X[held_out])).reshape(len(held_out), -1)
        smoother = PredictionSmoother(strengths=self.smooth_strengths)
        return smoother.fit(_split_rows(oof, train), y_train, [s.coords_um for s in train]), ""


# ----------------------------------------------------------------------- registry
#: Our heads by row name: ``(head kind, parameters that define the row)``.
HEAD_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "ridge": ("ridge", {}),
    "ridge-group": ("ridge", {"cv": "group"}),
    "lgbm": ("lgbm", {}),
    "knn": ("knn", {}),
    "ensemble": ("ensemble", {}),
}

#: Spatial options by name: the :class:`HeadRow` fields they set.
SMOOTHINGS: dict[str, dict[str, Any]] = {
    "none": {"context": None, "smooth": False},
    "context": {"context": FeatureContext(), "smooth": False},
    "smooth": {"context": None, "smooth": True},
    "context+smooth": {"context": FeatureContext(), "smooth": True},
}


def row_name(head: str, smoothing: str = "none") -> str:
    """``ridge``, ``ridge+context``, ``knn+smooth``, ``lgbm+context+smooth``..."""
    return head if smoothing == "none" else f"{head}+{smoothing}"


def expand_rows(heads: Iterable[str] = tuple(HEAD_ROWS), smoothings: Iterable[str] = tuple(SMOOTHINGS)) -> list[str]:
    """Row names of every head × smoothing pair, heads outer.

    Raises
    ------
    ValueError
        On a head or smoothing not in :data:`HEAD_ROWS` / :data:`SMOOTHINGS`.
    """
    heads, smoothings = list(heads), list(smoothings)
    for name, given, known in (("head", heads, HEAD_ROWS), ("smoothing", smoothings, SMOOTHINGS)):
        unknown = [g for g in given if g not in known]
        if unknown:
            raise ValueError(f"unknown {name}(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return [row_name(h, s) for h in heads for s in smoothings]


def _head_row(head: str, smoothing: str) -> HeadRow:
    kind, params = HEAD_ROWS[head]
    return HeadRow(head=kind, row_params=dict(params), **SMOOTHINGS[smoothing])


#: Every benchmark row by name.
ROWS: dict[str, Protocol] = {
    "hest-ridge": HestRidge(),
    "mean": MeanBaseline(),
    "library-size": LibrarySizeBaseline(),
    **{row_name(h, s): _head_row(h, s) for h in HEAD_ROWS for s in SMOOTHINGS},
}


def get_protocol(name: str, **options: Any) -> Protocol:
    """The row ``name``, with ``options`` replacing its fields (e.g. ``head_params={...}``)."""
    try:
        protocol = ROWS[name]
    except KeyError:
        raise ValueError(f"unknown row {name!r}; known: {', '.join(ROWS)}") from None
    allowed = {f.name for f in fields(protocol)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"row {name!r} has no option(s) {', '.join(unknown)}; it takes: {', '.join(sorted(allowed)) or 'none'}")
    return replace(protocol, **options)


def run_protocol(
    name: str,
    train: Sequence[SampleData],
    test: Sequence[SampleData],
    normalization: str = "log1p",
    genes: str | Sequence[str] | GeneSpec = "hvg:50",
    **options: Any,
) -> FoldResult:
    """Run the row ``name`` on one fold (see :meth:`Protocol.run`); ``options`` as :func:`get_protocol`."""
    result = get_protocol(name, **options).run(train, test, normalization, genes)
    result.metadata["row"] = name
    return result


def run_fold(
    name: str,
    fold,
    samples: Mapping[str, SampleData] | Sequence[SampleData],
    normalization: str = "log1p",
    genes: str | Sequence[str] | GeneSpec = "hvg:50",
    **options: Any,
) -> FoldResult:
    """Run the row ``name`` on a fold given by sample ids.

    Parameters
    ----------
    fold
        A ``bench.splits.Fold``-like object: ``name``, ``train`` and ``test``
        (sample ids), ``patient_disjoint``.
    samples
        The task's samples, by id or as a list.
    """
    by_id = dict(samples) if isinstance(samples, Mapping) else {s.sample_id: s for s in samples}
    missing = [i for i in (*fold.train, *fold.test) if i not in by_id]
    if missing:
        raise ValueError(f"fold {fold.name!r} names unknown sample(s): {', '.join(missing)}")
    result = run_protocol(name, [by_id[i] for i in fold.train], [by_id[i] for i in fold.test], normalization, genes, **options)
    result.metadata.update(
        fold=str(fold.name),
        patient_disjoint=bool(fold.patient_disjoint),
        patients_known=bool(getattr(fold, "patients_known", True)),  # False: disjointness assumed, one patient per sample
    )
    return result
