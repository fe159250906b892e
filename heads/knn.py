"""Retrieval head: a spot's expression is the softmax-weighted mean of its nearest reference spots.

The idea follows BLEEP and Loki (predict by looking up the most similar
training spots in embedding space) without their learned projections: the
search space is the (optionally standardised and PCA-reduced) embedding
itself. Neighbours come from faiss (exact flat search, or IVF for millions of
references) or, for exact cosine search over thousands of references on CPUs
with native bfloat16 products, from a bfloat16-screened exact search
(:mod:`virtualst.heads.screened_search`, 1.7-2.4x faster); the number of
neighbours ``k`` and the softmax temperature are chosen by group-aware inner
cross-validation.

Similarities are on one scale for both metrics so that one temperature grid
fits both: cosine similarity for ``"cosine"``, and for ``"l2"``
``-d^2 / (2 s^2)`` with ``s^2`` the mean squared norm of the centred
references, which equals ``cos - 1`` for points on a sphere of radius ``s``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import faiss
import numpy as np
from sklearn.utils.validation import check_is_fitted, validate_data

from virtualst.heads.base import Head
from virtualst.heads.cv import inner_splits
from virtualst.heads.features import FeatureTransform
from virtualst.heads.screened_search import BF16ScreenIndex, bf16_screen_ok, pair_scores

__all__ = ["KNNHead", "softmax_weights"]

#: Elements of the (queries, k, genes) temporaries built per chunk (~32 MB in float64).
_CHUNK = 1 << 22
#: Below this many references faiss's float32 search is as fast as the bfloat16 screen.
SCREEN_MIN_REFERENCES = 4096


def softmax_weights(similarity: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise ``softmax(similarity / temperature)``.

    Parameters
    ----------
    similarity
        (n_queries, k) similarities; ``-inf`` marks a missing neighbour
        (weight 0).
    temperature
        Positive; small values approach the nearest neighbour alone, large
        values the plain mean of the ``k`` neighbours.

    Returns
    -------
    ndarray (n_queries, k)
        Rows sum to 1; rows without any finite similarity are all NaN.
    """
    z = np.asarray(similarity, dtype=np.float64) / float(temperature)
    top = z.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        w = np.exp(z - top)  # shifting by the row maximum keeps exp() finite at tiny temperatures
        return w / w.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------- search internals
def _unit_rows(Z: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), in ``Z``'s float dtype; norms summed in float64."""
    Z = np.asarray(Z, dtype=np.result_type(Z.dtype, np.float32))
    norms = np.sqrt(np.einsum("ij,ij->i", Z, Z, dtype=np.float64))[:, None]
    return Z / np.where(norms > 0, norms, 1.0).astype(Z.dtype)


def _distance_scale(vectors: np.ndarray, metric: str) -> float:
    """``s^2`` of the l2 similarity (1 for cosine): mean squared norm of the centred references."""
    if metric != "l2":
        return 1.0
    v = vectors.astype(np.float64)
    s2 = float(((v - v.mean(axis=0)) ** 2).sum(axis=1).mean())
    return s2 if s2 > 0 else 1.0


def _default_nlist(n: int) -> int:
    # ~sqrt(n) lists, but >= 39 training points per centroid (faiss warns below that).
    return int(max(1, min(round(np.sqrt(n)), n // 39)))


@contextmanager
def _omp_threads(n: int):
    """Run faiss with ``n`` OpenMP threads (the setting is per calling thread), then restore."""
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def _train_centroids(vectors: np.ndarray, nlist: int, metric: str, seed: int) -> np.ndarray:
    """IVF coarse centroids by seeded k-means (spherical for cosine)."""
    kmeans = faiss.Kmeans(vectors.shape[1], int(min(nlist, len(vectors))), niter=20, seed=int(seed), spherical=metric == "cosine")
    # Small problems: thread start-up and barriers cost more than the work (x30 on a busy machine).
    threads = 1 if vectors.size < _CHUNK else faiss.omp_get_max_threads()
    with _omp_threads(threads):
        kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def _build_index(vectors: np.ndarray, metric: str, centroids: np.ndarray | None, nprobe: int):
    """Exact flat index, or IVF-flat over given centroids (no training: rebuilt bit-identically on restore).

    Exact cosine search over >= ``SCREEN_MIN_REFERENCES`` references runs as a
    :class:`~virtualst.heads.screened_search.BF16ScreenIndex` where the CPU
    has fast native bfloat16 products (same neighbours, up to float32 ties).
    """
    if metric == "cosine" and centroids is None and len(vectors) >= SCREEN_MIN_REFERENCES and bf16_screen_ok():
        return BF16ScreenIndex(vectors)
    d = vectors.shape[1]
    flat = faiss.IndexFlatIP if metric == "cosine" else faiss.IndexFlatL2
    if centroids is None:
        index = flat(d)
    else:
        quantizer = flat(d)
        quantizer.add(centroids)
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        index = faiss.IndexIVFFlat(quantizer, d, len(centroids), faiss_metric)
        index.nprobe = int(min(nprobe, len(centroids)))
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _rescore(queries: np.ndarray, vectors: np.ndarray, idx: np.ndarray, metric: str, scale: float) -> np.ndarray:
    """Similarity of each query to its candidate neighbours, pair by pair; ``-inf`` where ``idx < 0``.

    faiss rounds differently on its BLAS path (batches of >= 20 queries) and
    its SIMD path, so the search's own scores depend on how queries were
    batched; :func:`~virtualst.heads.screened_search.pair_scores` makes the
    weights independent of batching.
    """
    sims = pair_scores(queries, vectors, idx, l2=metric == "l2").astype(np.float64)
    if metric == "l2":
        sims /= -2.0 * scale
    sims[idx < 0] = -np.inf
    return sims


def _neighbours(index, queries: np.ndarray, vectors: np.ndarray, k: int, metric: str, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``(similarity, indices)`` of the ``k`` nearest references, most similar first."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores, idx = index.search(queries, int(k))
    if isinstance(index, BF16ScreenIndex):  # already _rescore's pairwise scores, best first
        return scores.astype(np.float64), idx
    sims = _rescore(queries, vectors, idx, metric, scale)
    order = np.lexsort((idx, -sims), axis=1)  # ties to the lower index, as the screen orders them
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _weighted_targets(sims: np.ndarray, idx: np.ndarray, targets: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax-weighted mean of the neighbours' targets, (n_queries, n_outputs) float64."""
    out = np.empty((len(idx), targets.shape[1]))
    step = max(1, _CHUNK // max(1, idx.shape[1] * targets.shape[1]))
    for s in range(0, len(idx), step):
        w = softmax_weights(sims[s : s + step], temperature)
        neigh = targets[np.maximum(idx[s : s + step], 0)]
        out[s : s + step] = np.einsum("ck,ckg->cg", w, neigh, dtype=np.float64)
    missing = ~np.isfinite(out).all(axis=1)
    if missing.any():  # IVF with too few probed lists can return no neighbour at all
        out[missing] = targets.mean(axis=0, dtype=np.float64)
    return out


def _candidate_scores(
    sims: np.ndarray, idx: np.ndarray, targets: np.ndarray, y_true: np.ndarray, ks: list[int], temperatures: list[float]
) -> np.ndarray:
    """Mean Pearson r over genes of every ``(k, temperature)`` prediction, ``(len(ks), len(temperatures))``.

    Each query's neighbours' targets are gathered once (for the largest
    ``k``) and every candidate's prediction comes from one batched product
    with zero-padded weights; Pearson r is taken from moments accumulated
    over query chunks, so no candidate's predictions are kept. Reference
    targets are centred on their mean first (r does not change, the moments
    stay well-conditioned) and true values on theirs; a query without any
    neighbour predicts the mean, as in :func:`_weighted_targets`.
    """
    n, kmax = idx.shape
    mean = targets.mean(axis=0, dtype=np.float64)
    centred = (targets - mean).astype(np.float32)
    y = np.asarray(y_true, dtype=np.float64)
    y = y - y.mean(axis=0)
    combos = [(min(k, kmax), t) for k in ks for t in temperatures]
    p_sum = np.zeros((len(combos), targets.shape[1]))
    p_sq, p_y = np.zeros_like(p_sum), np.zeros_like(p_sum)
    step = max(1, _CHUNK // max(1, kmax * targets.shape[1]))
    for s in range(0, n, step):
        rows = slice(s, s + step)
        weights = np.zeros((len(idx[rows]), len(combos), kmax), dtype=np.float32)
        for c, (k, t) in enumerate(combos):
            weights[:, c, :k] = softmax_weights(sims[rows, :k], t)
        np.nan_to_num(weights, copy=False, nan=0.0)
        pred = (weights @ centred[np.maximum(idx[rows], 0)]).astype(np.float64)  # (queries, combos, genes)
        p_sum += pred.sum(axis=0)
        p_sq += (pred * pred).sum(axis=0)
        p_y += (pred * y[rows, None, :]).sum(axis=0)
    var_p = p_sq - p_sum**2 / n  # p_y is already the covariance: y is centred
    # A prediction constant up to float32 rounding (~6e-8 relative) counts as constant.
    var_p = np.where(var_p > 1e-13 * p_sq, var_p, 0.0)
    var_y = np.where(np.ptp(y, axis=0) > 0, (y * y).sum(axis=0), 0.0)  # exactly 0 for a constant column
    denom = np.sqrt(var_p * var_y)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denom > 0, p_y / denom, 0.0)  # 0 where either side is constant, as pearson_per_gene
    return r.mean(axis=1).reshape(len(ks), len(temperatures))


# ----------------------------------------------------------------------- the head
class KNNHead(Head):
    """k-nearest-neighbour retrieval over the training spots' embeddings.

    Parameters
    ----------
    k_grid
        Candidate numbers of neighbours. A ``k`` larger than the reference
        set uses every reference.
    temperature_grid
        Candidate softmax temperatures over the similarities (see the module
        docstring for their scale).
    metric
        ``"cosine"`` (inner product of L2-normalised vectors) or ``"l2"``.
    index
        ``"flat"`` (exact) or ``"ivf"`` (inverted lists, approximate; for
        millions of references).
    nlist
        IVF lists; ``None`` -> about ``sqrt(n_references)`` (at least 39
        references per list).
    nprobe
        IVF lists searched per query (capped at ``nlist``; ``nprobe = nlist``
        is exact).
    standardize, n_components
        :class:`~virtualst.heads.features.FeatureTransform` applied before
        the search; ``standardize=False, n_components=None`` searches the
        raw embeddings.
    n_splits
        Inner CV folds (group-disjoint when ``groups`` has >= 2 labels).
    random_state
        Seed of the ungrouped folds and of the IVF k-means.

    Attributes
    ----------
    k_ : int
        Chosen number of neighbours (a ``k_grid`` value).
    temperature_ : float
        Chosen temperature.
    cv_score_ : float
        Inner-CV mean Pearson over genes of the choice (NaN when the grids
        hold a single candidate and no CV ran).
    cv_scores_ : ndarray (len(k_grid), len(temperature_grid)) or None
        Inner-CV score of every candidate.
    transform_ : FeatureTransform or None
    references_ : ndarray (n_references, n_dims) float32
        Reference vectors in the search space (unit rows for cosine).
    targets_ : ndarray (n_references, n_outputs) float32
    distance_scale_ : float
        ``s^2`` of the l2 similarity (1 for cosine).
    ivf_centroids_ : ndarray (nlist, n_dims) float32 or None
    n_features_in_ : int
    y_ndim_ : int
        1 when fitted on a 1-D ``y`` (predictions are then 1-D).
    """

    kind = "knn"

    def __init__(
        self,
        k_grid: tuple[int, ...] = (5, 10, 20, 50, 100),
        temperature_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0),
        metric: str = "cosine",
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 32,
        standardize: bool = False,
        n_components: int | None = None,
        n_splits: int = 5,
        random_state: int = 0,
    ) -> None:
        self.k_grid = k_grid
        self.temperature_grid = temperature_grid
        self.metric = metric
        self.index = index
        self.nlist = nlist
        self.nprobe = nprobe
        self.standardize = standardize
        self.n_components = n_components
        self.n_splits = n_splits
        self.random_state = random_state

    # The faiss index is a cache rebuilt from references_: never pickled.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_index", None)
        return state

    # ------------------------------------------------------------------ fit
    def _grids(self) -> tuple[list[int], list[float]]:
        ks = [int(k) for k in np.atleast_1d(self.k_grid)]
        temps = [float(t) for t in np.atleast_1d(self.temperature_grid)]
        if not ks or min(ks) < 1:
            raise ValueError(f"k_grid must hold integers >= 1, got {self.k_grid!r}")
        if not temps or not all(np.isfinite(t) and t > 0 for t in temps):
            raise ValueError(f"temperature_grid must hold positive finite floats, got {self.temperature_grid!r}")
        if self.metric not in ("cosine", "l2"):
            raise ValueError(f"metric must be 'cosine' or 'l2', got {self.metric!r}")
        if self.index not in ("flat", "ivf"):
            raise ValueError(f"index must be 'flat' or 'ivf', got {self.index!r}")
        if (self.nlist is not None and int(self.nlist) < 1) or int(self.nprobe) < 1:
            raise ValueError(f"nlist and nprobe must be >= 1, got {self.nlist!r}, {self.nprobe!r}")
        return ks, temps

    def _references(self, X: np.ndarray, Y: np.ndarray) -> dict[str, Any]:
        """Everything a search needs, fitted on ``X``/``Y`` (the whole training set or a fold)."""
        transform = None
        if self.standardize or self.n_components is not None:
            transform = FeatureTransform(standardize=self.standardize, n_components=self.n_components).fit(X)
        Z = X if transform is None else transform.transform(X)
        if self.metric == "cosine":
            Z = _unit_rows(Z)
        vectors = np.ascontiguousarray(Z, dtype=np.float32)
        centroids = None
        if self.index == "ivf":
            nlist = _default_nlist(len(vectors)) if self.nlist is None else int(self.nlist)
            centroids = _train_centroids(vectors, nlist, self.metric, self.random_state)
        return {
            "transform": transform,
            "vectors": vectors,
            "targets": np.ascontiguousarray(Y, dtype=np.float32),
            "scale": _distance_scale(vectors, self.metric),
            "centroids": centroids,
            "index": _build_index(vectors, self.metric, centroids, self.nprobe),
        }

    def _queries(self, X: np.ndarray, transform: FeatureTransform | None) -> np.ndarray:
        """Validated rows of ``X`` in the search space."""
        Z = X if transform is None else transform.transform(X)
        return _unit_rows(Z) if self.metric == "cosine" else Z

    def fit(self, X, y, groups=None) -> KNNHead:
        """Store the references and choose ``k`` and the temperature by inner CV.

        Parameters
        ----------
        X : array-like (n_spots, n_features)
            Embeddings.
        y : array-like (n_spots,) or (n_spots, n_genes)
            Targets.
        groups : array-like (n_spots,), optional
            Section or patient of each spot; inner folds never split a group.
        """
        X, Y, groups = self._fit_data(X, y, groups)
        ks, temps = self._grids()
        if len(X) < 2:
            raise ValueError(f"KNNHead needs at least 2 samples to choose k by cross-validation, got {len(X)} sample")

        self.cv_scores_ = None
        self.cv_score_ = float("nan")
        best = (0, 0)
        if len(ks) * len(temps) > 1:
            scores = np.zeros((len(ks), len(temps)))
            splits = inner_splits(len(X), groups, self.n_splits, self.random_state)
            for train, val in splits:
                ref = self._references(X[train], Y[train])
                kmax = min(max(ks), len(train))
                # One search per fold with the largest k; smaller k are prefixes of it.
                sims, idx = _neighbours(ref["index"], self._queries(X[val], ref["transform"]), ref["vectors"], kmax, self.metric, ref["scale"])
                scores += _candidate_scores(sims, idx, ref["targets"], Y[val], ks, temps)
            self.cv_scores_ = scores / len(splits)
            best = np.unravel_index(np.argmax(self.cv_scores_), self.cv_scores_.shape)
            self.cv_score_ = float(self.cv_scores_[best])
        self.k_, self.temperature_ = ks[best[0]], temps[best[1]]

        ref = self._references(X, Y)
        self.transform_ = ref["transform"]
        self.references_ = ref["vectors"]
        self.targets_ = ref["targets"]
        self.distance_scale_ = ref["scale"]
        self.ivf_centroids_ = ref["centroids"]
        self._index = ref["index"]
        return self

    # -------------------------------------------------------------- predict
    def _search_index(self):
        if getattr(self, "_index", None) is None:
            self._index = _build_index(self.references_, self.metric, self.ivf_centroids_, self.nprobe)
        return self._index

    def _search(self, X, k: int | None) -> tuple[np.ndarray, np.ndarray]:
        check_is_fitted(self)
        k = self.k_ if k is None else k
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        k = int(min(k, len(self.references_)))
        queries = self._queries(X, self.transform_)
        return _neighbours(self._search_index(), queries, self.references_, k, self.metric, self.distance_scale_)

    def kneighbors(self, X, n_neighbors: int | None = None, return_distance: bool = True):
        """The nearest references of each row of ``X``, nearest first (like scikit-learn's).

        Parameters
        ----------
        X : array-like (n_queries, n_features)
        n_neighbors
            Defaults to ``k_``; capped at the number of references.
        return_distance
            Also return the distances.

        Returns
        -------
        distances : ndarray (n_queries, k)
            In the search space, recomputed pair by pair in float32:
            ``1 - cos`` for cosine, Euclidean for l2; ``inf`` for a missing
            IVF neighbour.
        indices : ndarray (n_queries, k) int64
            Rows of ``references_`` / ``targets_``; -1 for a missing IVF
            neighbour.
        """
        sims, idx = self._search(X, n_neighbors)
        if not return_distance:
            return idx
        if self.metric == "cosine":
            dist = 1.0 - sims
        else:
            dist = np.sqrt(np.maximum(-sims * 2.0 * self.distance_scale_, 0.0))
        return dist, idx

    def predict(self, X) -> np.ndarray:
        """Softmax(similarity / ``temperature_``)-weighted mean of the ``k_`` nearest references' targets."""
        sims, idx = self._search(X, None)
        pred = _weighted_targets(sims, idx, self.targets_, self.temperature_)
        return self._as_fitted_shape(pred)

    # ---------------------------------------------------------------- state
    def _export(self):
        meta = {
            "k": self.k_,
            "temperature": self.temperature_,
            "cv_score": None if np.isnan(self.cv_score_) else self.cv_score_,
            "cv_scores": None if self.cv_scores_ is None else self.cv_scores_.tolist(),
            "distance_scale": self.distance_scale_,
            "y_ndim": self.y_ndim_,
            "n_features_in": self.n_features_in_,
        }
        arrays = {"references": self.references_, "targets": self.targets_}
        if self.ivf_centroids_ is not None:
            arrays["ivf_centroids"] = self.ivf_centroids_
        if self.transform_ is not None:
            arrays.update(self.transform_.export_arrays("transform."))
        return meta, arrays, {}, {}

    def _restore(self, meta, arrays, texts, children) -> None:
        self.k_ = int(meta["k"])
        self.temperature_ = float(meta["temperature"])
        self.cv_score_ = float("nan") if meta.get("cv_score") is None else float(meta["cv_score"])
        self.cv_scores_ = None if meta.get("cv_scores") is None else np.asarray(meta["cv_scores"], dtype=np.float64)
        self.distance_scale_ = float(meta["distance_scale"])
        self.y_ndim_ = int(meta["y_ndim"])
        self.n_features_in_ = int(meta["n_features_in"])
        self.references_ = np.ascontiguousarray(arrays["references"], dtype=np.float32)
        self.targets_ = np.ascontiguousarray(arrays["targets"], dtype=np.float32)
        centroids = arrays.get("ivf_centroids")
        self.ivf_centroids_ = None if centroids is None else np.ascontiguousarray(centroids, dtype=np.float32)
        self.transform_ = None
        if any(name.startswith("transform.") for name in arrays):
            self.transform_ = FeatureTransform(self.standardize, self.n_components).restore_arrays(arrays, "transform.")
        self._index = None  # rebuilt from references_ on first use
