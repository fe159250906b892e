"""Spatial context for the heads: neighbour graphs, context features, prediction smoothing.

Spots of one section sit on a regular grid (ST: 200 µm square pitch; Visium:
100 µm hexagonal pitch), and expression varies smoothly across it. Two
optional ways to use that, each working on ONE sample at a time so no
information crosses sections:

* :class:`FeatureContext` widens each spot's embedding with the mean
  embedding of its first ring of neighbours and the section mean (the
  local / neighbour / global idea of TRIPLEX, at the embedding level).
* :class:`PredictionSmoother` blends each predicted spot with its
  neighbours, ``(1 - λ) P + λ W P``, choosing λ per gene on out-of-fold
  predictions scored against the raw ground truth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from virtualst.heads.cv import pearson_per_gene

#: Default neighbour radius, in spot pitches. The first ring sits at 1 pitch on
#: both grids, the next at sqrt(2) (square ST diagonals) or sqrt(3) (hex
#: Visium); 1.2 sits between them with room for the ~±12% jitter of detected
#: spot centres (1.5 would take the square-grid diagonals: 8 neighbours).
FIRST_RING_FACTOR = 1.2

#: Slack when comparing Pearson scores, so float noise never wins a tie.
_SCORE_TOL = 1e-12


def _as_coords(coords_um) -> np.ndarray:
    coords = np.asarray(coords_um, dtype=np.float64)
    if coords.ndim != 2:
        raise ValueError(f"coords_um must be (n_spots, n_dims), got shape {coords.shape}")
    if not np.isfinite(coords).all():
        raise ValueError("coords_um contains non-finite values")
    return coords


def _check_rows(name: str, values: np.ndarray, coords: np.ndarray) -> None:
    if values.ndim != 2:
        raise ValueError(f"{name} must be (n_spots, n_columns), got shape {values.shape}")
    if len(values) != len(coords):
        raise ValueError(f"{name} has {len(values)} rows but coords_um has {len(coords)} spots")


def spot_pitch_um(coords_um) -> float:
    """Median nearest-neighbour distance between spots.

    The median shrugs off a handful of stray or missing spots, so this is the
    grid pitch of a real section (ST ~200 µm, Visium ~100 µm).

    Parameters
    ----------
    coords_um
        Spot centres, shape ``(n_spots, n_dims)``.

    Returns
    -------
    float
        The pitch, in the units of ``coords_um``.

    Raises
    ------
    ValueError
        With fewer than 2 spots, or when most spots share their position.
    """
    coords = _as_coords(coords_um)
    if len(coords) < 2:
        raise ValueError(f"spot pitch needs at least 2 spots, got {len(coords)}")
    dist, _ = cKDTree(coords).query(coords, k=2)
    # Column 0 is the spot itself (or a duplicate of it, equally at distance 0).
    pitch = float(np.median(dist[:, 1]))
    if pitch <= 0:
        raise ValueError("spot pitch is 0: most spots share their coordinates")
    return pitch


def _gaussian_weights(coords: np.ndarray, radius_um: float | None, sigma_um: float | None, k: int | None) -> sparse.csr_matrix:
    """Unnormalised ``exp(-d²/2σ²)`` between neighbours (self excluded); symmetric for radius graphs."""
    n = len(coords)
    if n < 2:
        return sparse.csr_matrix((n, n))
    if sigma_um is None or (radius_um is None and k is None):
        pitch = spot_pitch_um(coords)
    sigma = pitch if sigma_um is None else float(sigma_um)
    if sigma <= 0:
        raise ValueError(f"sigma_um must be > 0, got {sigma_um}")
    tree = cKDTree(coords)
    if k is None:
        radius = FIRST_RING_FACTOR * pitch if radius_um is None else float(radius_um)
        if radius <= 0:
            raise ValueError(f"radius_um must be > 0, got {radius_um}")
        pairs = tree.query_pairs(radius, output_type="ndarray")
        rows = np.concatenate([pairs[:, 0], pairs[:, 1]])
        cols = np.concatenate([pairs[:, 1], pairs[:, 0]])
    else:
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k_eff = min(int(k), n - 1)
        _, idx = tree.query(coords, k=k_eff + 1)
        # Drop each spot itself; with duplicated positions it may not come first.
        not_self = idx != np.arange(n)[:, None]
        keep = not_self & (np.cumsum(not_self, axis=1) <= k_eff)
        rows = np.repeat(np.arange(n), k_eff)
        cols = idx[keep]
    d2 = ((coords[rows] - coords[cols]) ** 2).sum(axis=1)
    weights = sparse.csr_matrix((np.exp(-d2 / (2.0 * sigma**2)), (rows, cols)), shape=(n, n))
    weights.eliminate_zeros()  # underflowed far kNN neighbours
    return weights


def neighbour_graph(coords_um, radius_um: float | None = None, sigma_um: float | None = None, k: int | None = None) -> sparse.csr_matrix:
    """Row-normalised Gaussian-weighted graph between the spots of one sample.

    Parameters
    ----------
    coords_um
        Spot centres in µm, shape ``(n_spots, n_dims)``.
    radius_um
        Neighbours are the other spots within this distance. ``None``:
        :data:`FIRST_RING_FACTOR` × :func:`spot_pitch_um`, the first ring
        (4 spots on a square ST grid, 6 on a hex Visium grid).
    sigma_um
        Width of the Gaussian weights ``exp(-d² / 2σ²)``; ``None``: the pitch.
    k
        When given, each spot's ``k`` nearest other spots instead of a radius
        (``radius_um`` is then ignored); the graph is not symmetric.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n_spots, n_spots)``, no diagonal, each row summing to 1, or empty
        for a spot without neighbours.
    """
    weights = _gaussian_weights(_as_coords(coords_um), radius_um, sigma_um, k)
    sums = np.asarray(weights.sum(axis=1)).ravel()
    inv = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
    return sparse.csr_matrix(sparse.diags(inv) @ weights)


def _neighbour_average(graph: sparse.csr_matrix, values: np.ndarray) -> np.ndarray:
    """``graph @ values``, falling back to the spot's own row where it has no neighbours."""
    out = np.asarray(graph @ values, dtype=np.float64)
    isolated = np.diff(graph.indptr) == 0
    out[isolated] = values[isolated]
    return out


@dataclass(frozen=True)
class FeatureContext:
    """Spot embedding plus its neighbourhood and section context.

    Parameters
    ----------
    radius_um
        Neighbourhood radius; ``None``: the first ring of each sample
        (see :func:`neighbour_graph`). Neighbours are Gaussian-weighted
        (σ = pitch), which on a regular first ring is the plain mean.
    include_neighbours
        Append the weighted mean of the neighbours' features (the spot's own
        features where it has none).
    include_global
        Append the sample's mean features, the same on every spot.
    """

    radius_um: float | None = None
    include_neighbours: bool = True
    include_global: bool = True

    def __post_init__(self) -> None:
        if self.radius_um is not None and not self.radius_um > 0:
            raise ValueError(f"radius_um must be > 0 or None, got {self.radius_um}")

    def n_outputs(self, n_features: int) -> int:
        """Width of :meth:`transform`'s output for ``n_features`` inputs."""
        return int(n_features) * (1 + int(self.include_neighbours) + int(self.include_global))

    def transform(self, features, coords_um) -> np.ndarray:
        """Context features of ONE sample.

        Parameters
        ----------
        features
            ``(n_spots, n_features)`` embeddings.
        coords_um
            ``(n_spots, n_dims)`` spot centres in µm.

        Returns
        -------
        np.ndarray
            ``(n_spots, n_outputs(n_features))``: ``[features, neighbour mean,
            sample mean]`` (the optional blocks dropped when disabled), in the
            features' floating dtype.
        """
        features = np.asarray(features)
        coords = _as_coords(coords_um)
        _check_rows("features", features, coords)
        dtype = features.dtype if np.issubdtype(features.dtype, np.floating) else np.float64
        parts = [features.astype(dtype, copy=False)]
        if self.include_neighbours:
            graph = neighbour_graph(coords, radius_um=self.radius_um)
            parts.append(_neighbour_average(graph, features).astype(dtype))
        if self.include_global:
            mean = features.mean(axis=0, dtype=np.float64) if len(features) else np.zeros(features.shape[1])
            parts.append(np.broadcast_to(mean.astype(dtype), features.shape))
        return np.concatenate(parts, axis=1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able parameters."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureContext:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown FeatureContext keys: {', '.join(sorted(unknown))}")
        return cls(**d)


class PredictionSmoother:
    """Blend each predicted spot with its neighbours, with a strength chosen per gene.

    ``smoothed = (1 - λ) P + λ (W P)``, ``W`` the :func:`neighbour_graph` of
    the sample (spots without neighbours keep their prediction).

    Parameters
    ----------
    strengths
        Candidate λ values, each in ``[0, 1]`` (a convex blend; λ = 0 leaves
        predictions unchanged).
    radius_um, sigma_um
        Graph parameters, see :func:`neighbour_graph` (``None``: per-sample pitch).
    per_gene
        Choose λ per gene; otherwise one λ maximising the mean Pearson.

    Attributes
    ----------
    strength_ : ndarray (n_genes,)
        Chosen λ per gene.
    cv_pearson_before_, cv_pearson_after_ : ndarray (n_genes,)
        Pooled Pearson of the out-of-fold predictions without (λ = 0) and
        with the chosen smoothing.
    """

    def __init__(
        self,
        strengths=(0.0, 0.25, 0.5, 0.75, 1.0),
        radius_um: float | None = None,
        sigma_um: float | None = None,
        per_gene: bool = True,
    ) -> None:
        values = np.asarray(strengths, dtype=np.float64).ravel()
        if values.size == 0 or not np.all((values >= 0) & (values <= 1)):
            raise ValueError(f"strengths must be a non-empty list of values in [0, 1], got {strengths!r}")
        self.strengths = tuple(float(v) for v in values)
        self.radius_um = radius_um
        self.sigma_um = sigma_um
        self.per_gene = bool(per_gene)

    def _graph(self, coords: np.ndarray) -> sparse.csr_matrix:
        return neighbour_graph(coords, radius_um=self.radius_um, sigma_um=self.sigma_um)

    def fit(self, predictions_list, truths_list, coords_list) -> PredictionSmoother:
        """Choose λ from out-of-fold predictions of several samples.

        Parameters
        ----------
        predictions_list
            Per sample, ``(n_spots, n_genes)`` predictions made by models that
            did not see that sample (otherwise smoothing looks worse than it is).
        truths_list
            Per sample, the RAW ``(n_spots, n_genes)`` targets; never smoothed,
            never modified (a smoothed truth would reward smoothing for itself).
        coords_list
            Per sample, ``(n_spots, n_dims)`` spot centres in µm.

        Returns
        -------
        PredictionSmoother
            ``self``, with λ = the best candidate on the pooled spots (ties:
            the smallest λ).
        """
        if not (len(predictions_list) == len(truths_list) == len(coords_list)):
            raise ValueError(
                f"got {len(predictions_list)} predictions, {len(truths_list)} truths and {len(coords_list)} coords; one of each per sample"
            )
        if len(predictions_list) == 0:
            raise ValueError("fit needs at least one sample")
        preds, smooth, truths = [], [], []
        for i, (pred, truth, coords) in enumerate(zip(predictions_list, truths_list, coords_list)):
            coords = _as_coords(coords)
            pred = np.asarray(pred, dtype=np.float64)
            truth = np.asarray(truth)
            _check_rows(f"predictions[{i}]", pred, coords)
            _check_rows(f"truths[{i}]", truth, coords)
            if pred.shape != truth.shape or pred.shape[1] != np.shape(predictions_list[0])[1]:
                raise ValueError(f"sample {i}: predictions {pred.shape} and truths {truth.shape} must share one gene count across samples")
            preds.append(pred)
            smooth.append(_neighbour_average(self._graph(coords), pred))
            truths.append(truth)
        pred, smooth, truth = np.concatenate(preds), np.concatenate(smooth), np.concatenate(truths)
        grid = np.unique(self.strengths)  # ascending, so the first best is the smallest
        scores = np.stack([pearson_per_gene(truth, (1 - lam) * pred + lam * smooth) for lam in grid])
        if self.per_gene:
            best = np.argmax(scores >= scores.max(axis=0) - _SCORE_TOL, axis=0)
        else:
            mean = scores.mean(axis=1)
            best = np.full(scores.shape[1], np.argmax(mean >= mean.max() - _SCORE_TOL))
        self.strength_ = grid[best]
        self.cv_pearson_before_ = pearson_per_gene(truth, pred)
        self.cv_pearson_after_ = scores[best, np.arange(scores.shape[1])]
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "strength_"):
            raise RuntimeError("PredictionSmoother is not fitted; call fit() or restore() first")

    def transform(self, predictions, coords_um) -> np.ndarray:
        """Smoothed predictions of ONE sample, ``(n_spots, n_genes)``."""
        self._check_fitted()
        coords = _as_coords(coords_um)
        pred = np.asarray(predictions)
        _check_rows("predictions", pred, coords)
        if pred.shape[1] != len(self.strength_):
            raise ValueError(f"predictions have {pred.shape[1]} genes, the smoother was fitted on {len(self.strength_)}")
        dtype = pred.dtype if np.issubdtype(pred.dtype, np.floating) else np.float64
        if not self.strength_.any():  # nothing to blend: skip the graph (works for 1-spot samples too)
            return pred.astype(dtype, copy=True)
        pred64 = pred.astype(np.float64, copy=False)
        smooth = _neighbour_average(self._graph(coords), pred64)
        return ((1 - self.strength_) * pred64 + self.strength_ * smooth).astype(dtype)

    # ------------------------------------------------------------------ state
    def get_params(self) -> dict[str, Any]:
        """Constructor parameters, JSON-able."""
        return {"strengths": list(self.strengths), "radius_um": self.radius_um, "sigma_um": self.sigma_um, "per_gene": self.per_gene}

    def export(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Pickle-free state: ``(params, arrays)``, JSON-able params and float64 arrays."""
        self._check_fitted()
        arrays = {
            "strength": self.strength_,
            "cv_pearson_before": self.cv_pearson_before_,
            "cv_pearson_after": self.cv_pearson_after_,
        }
        return self.get_params(), {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}

    @classmethod
    def restore(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> PredictionSmoother:
        """A fitted smoother from :meth:`export` output."""
        smoother = cls(**params)
        missing = {"strength", "cv_pearson_before", "cv_pearson_after"} - set(arrays)
        if missing:
            raise ValueError(f"smoother arrays lack: {', '.join(sorted(missing))}")
        smoother.strength_ = np.asarray(arrays["strength"], dtype=np.float64)
        smoother.cv_pearson_before_ = np.asarray(arrays["cv_pearson_before"], dtype=np.float64)
        smoother.cv_pearson_after_ = np.asarray(arrays["cv_pearson_after"], dtype=np.float64)
        return smoother
