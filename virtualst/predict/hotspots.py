"""Spatial hotspots of one value per spot: Getis-Ord Gi* with Benjamini-Hochberg FDR.

Gi* (Getis & Ord 1992; Ord & Getis 1995) compares the sum of the values in
each spot's neighbourhood -- the spot itself included -- with what a random
arrangement of the same values would give. With binary distance-band weights
``w_ij`` (1 within ``radius_um``, the spot itself included) and ``n`` spots::

    W_i  = sum_j w_ij            S1_i = sum_j w_ij**2   (= W_i for binary weights)
    xbar = mean(x)               s    = sqrt(mean(x**2) - xbar**2)
    Gi*  = (sum_j w_ij x_j - xbar W_i) / (s sqrt((n S1_i - W_i**2) / (n - 1)))

which is already a z-score under the randomisation null (Ord & Getis 1995,
eq. 14). Two-sided p-values come from the standard normal; q-values are
Benjamini-Hochberg adjusted over the tested spots of the sample.

A spot with no neighbour within the radius has a one-spot "neighbourhood":
its Gi* is just its own standardised value, not evidence of a cluster, so it
is not tested (``gi_z``, ``p`` and ``q`` are NaN, ``hotspot`` is empty).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.spatial import cKDTree
from scipy.stats import norm

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

#: Default neighbourhood radius in spot pitches. 1.5 reaches the first ring on
#: both grids (Visium hex: 6 neighbours at 1 pitch; ST square: 4 at 1 pitch and
#: 4 diagonals at sqrt(2)), with slack for jittered spot centres.
DEFAULT_RADIUS_PITCHES = 1.5

#: Labels of the ``hotspot`` column.
HOT, COLD, NOT_SIGNIFICANT = "hot", "cold", ""

#: Columns of :func:`hotspots`' result, in order.
COLUMNS = ("gi_z", "p", "q", "hotspot", "n_neighbours")


def _coords(coords_um, n: int | None = None) -> np.ndarray:
    coords = np.asarray(coords_um, dtype=np.float64)
    if coords.ndim != 2:
        raise ValueError(f"coords_um must be (n_spots, n_dims), got shape {coords.shape}")
    if n is not None and len(coords) != n:
        raise ValueError(f"coords_um has {len(coords)} spots but there are {n} values")
    if not np.isfinite(coords).all():
        raise ValueError("coords_um contains non-finite values")
    return coords


def default_radius_um(coords_um) -> float:
    """:data:`DEFAULT_RADIUS_PITCHES` × the spot pitch (median nearest-neighbour distance)."""
    from virtualst.heads.smoothing import spot_pitch_um  # lazy: keeps this module light to import

    return DEFAULT_RADIUS_PITCHES * spot_pitch_um(coords_um)


def distance_band_weights(coords_um, radius_um: float) -> sparse.csr_matrix:
    """Binary spatial weights: 1 between spots at most ``radius_um`` apart, self included.

    Parameters
    ----------
    coords_um
        Spot centres, ``(n_spots, n_dims)``.
    radius_um
        Neighbourhood radius, in the units of ``coords_um``.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n_spots, n_spots)`` float64, symmetric, with ones on the diagonal.
    """
    coords = _coords(coords_um)
    if not radius_um > 0:
        raise ValueError(f"radius_um must be > 0, got {radius_um}")
    n = len(coords)
    pairs = cKDTree(coords).query_pairs(float(radius_um), output_type="ndarray") if n > 1 else np.empty((0, 2), dtype=int)
    rows = np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(n)])
    cols = np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(n)])
    return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))


def gi_star(values, weights: sparse.spmatrix) -> np.ndarray:
    """Getis-Ord Gi* z-scores (see the module docstring for the formula).

    Parameters
    ----------
    values
        One finite value per spot, ``(n_spots,)``.
    weights
        ``(n_spots, n_spots)`` spatial weights INCLUDING the self-weight on the
        diagonal (e.g. :func:`distance_band_weights`).

    Returns
    -------
    np.ndarray
        ``(n_spots,)`` z-scores. 0 where the statistic is undefined: constant
        values (``s = 0``) or a neighbourhood that holds every spot.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    w = sparse.csr_matrix(weights, dtype=np.float64)
    n = len(x)
    if w.shape != (n, n):
        raise ValueError(f"weights have shape {w.shape}, expected ({n}, {n})")
    if n < 2:
        return np.zeros(n)
    mean = x.mean()
    # Centring first keeps s and the numerator exact for large offsets (sum(x²)/n - mean² cancels badly).
    centred = x - mean
    s = np.sqrt(np.mean(centred**2))
    w_sum = np.asarray(w.sum(axis=1)).ravel()
    s1 = np.asarray(w.multiply(w).sum(axis=1)).ravel()
    numerator = w @ centred  # = sum_j w_ij x_j - xbar W_i
    spread = (n * s1 - w_sum**2) / (n - 1)
    scale = s * np.sqrt(np.clip(spread, 0.0, None))
    # Relative tolerance: float noise must not turn a constant sample into hotspots.
    defined = (scale > 0) & (s > 1e-12 * max(1.0, float(np.abs(x).max())))
    return np.divide(numerator, scale, out=np.zeros(n), where=defined)


def bh_qvalues(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values); NaN entries stay NaN and are not counted.

    Parameters
    ----------
    p
        p-values in ``[0, 1]``, any shape.

    Returns
    -------
    np.ndarray
        Same shape; ``q_(i) = min_{j >= i} m p_(j) / j`` over the ``m`` finite
        p-values sorted ascending, capped at 1.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    flat_p, flat_q = p.ravel(), q.reshape(-1)
    tested = np.flatnonzero(np.isfinite(flat_p))
    m = len(tested)
    if m == 0:
        return q
    order = tested[np.argsort(flat_p[tested], kind="stable")]
    ranked = flat_p[order] * m / np.arange(1, m + 1)
    flat_q[order] = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    return q


def _table(values: np.ndarray, index: pd.Index, weights: sparse.csr_matrix, fdr: float, radius_um: float) -> pd.DataFrame:
    """The hotspot table of one value column, given precomputed weights."""
    n_neighbours = np.diff(weights.indptr) - 1  # minus the self-weight
    tested = n_neighbours > 0
    # Mean and spread come from every spot; isolated spots are just not tested.
    z = np.where(tested, gi_star(values, weights), np.nan)
    p = np.where(tested, 2.0 * norm.sf(np.abs(z)), np.nan)
    q = bh_qvalues(p)
    significant = np.isfinite(q) & (q <= fdr)
    label = np.full(len(values), NOT_SIGNIFICANT, dtype=object)
    label[significant & (z > 0)] = HOT
    label[significant & (z < 0)] = COLD
    table = pd.DataFrame({"gi_z": z, "p": p, "q": q, "hotspot": label, "n_neighbours": n_neighbours.astype(np.int64)}, index=index)
    table.attrs.update({"radius_um": float(radius_um), "fdr": float(fdr)})
    return table


def _check_fdr(fdr: float) -> float:
    if not 0 < fdr <= 1:
        raise ValueError(f"fdr must be in (0, 1], got {fdr}")
    return float(fdr)


def _weights_for(coords: np.ndarray, radius_um: float | None) -> tuple[sparse.csr_matrix, float]:
    if radius_um is None:
        radius_um = default_radius_um(coords) if len(coords) > 1 else 1.0  # one spot: any radius isolates it
    return distance_band_weights(coords, radius_um), float(radius_um)


def hotspots(values, coords_um, radius_um: float | None = None, fdr: float = 0.05) -> pd.DataFrame:
    """Hot and cold spots of one value per spot (Getis-Ord Gi*, BH FDR).

    Parameters
    ----------
    values
        One value per spot (a signature score, a gene's expression):
        array-like or a :class:`pandas.Series` whose index names the spots.
    coords_um
        Spot centres in µm, ``(n_spots, 2)``, in the order of ``values``.
    radius_um
        Neighbourhood radius (binary weights, the spot itself included).
        ``None``: :data:`DEFAULT_RADIUS_PITCHES` × the spot pitch.
    fdr
        Benjamini-Hochberg false discovery rate for calling hot/cold spots.

    Returns
    -------
    pandas.DataFrame
        Index: the spots (the Series' index, else ``0..n-1``). Columns
        ``gi_z`` (Gi* z-score), ``p`` (two-sided), ``q`` (BH), ``hotspot``
        (``"hot"``, ``"cold"`` or ``""``) and ``n_neighbours`` (other spots
        within the radius). Isolated spots get NaN ``gi_z``/``p``/``q``.
        ``attrs`` holds ``radius_um`` and ``fdr``.

    Raises
    ------
    ValueError
        On non-finite values, mismatched lengths or a bad radius / fdr.

    Examples
    --------
    >>> table = hotspots(adata.obs["score"], spot_coords_um(adata))  # doctest: +SKIP
    >>> (table["hotspot"] == "hot").sum()  # doctest: +SKIP
    """
    fdr = _check_fdr(fdr)
    index = values.index if isinstance(values, pd.Series) else pd.RangeIndex(len(np.ravel(values)))
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise ValueError(f"values contain {int((~np.isfinite(x)).sum())} non-finite entries")
    coords = _coords(coords_um, len(x))
    weights, radius = _weights_for(coords, radius_um)
    return _table(x, index, weights, fdr, radius)


def hotspots_many(
    scores: pd.DataFrame | Mapping[str, object], coords_um, radius_um: float | None = None, fdr: float = 0.05
) -> dict[str, pd.DataFrame]:
    """:func:`hotspots` for every column of ``scores``, sharing one weight matrix.

    Parameters
    ----------
    scores
        Spots × columns (e.g. :func:`virtualst.predict.signatures.score_gene_sets`'
        scores), or a mapping of name -> values.
    coords_um, radius_um, fdr
        As in :func:`hotspots`; each column is corrected for FDR on its own.

    Returns
    -------
    dict[str, pandas.DataFrame]
        Column name -> hotspot table.
    """
    fdr = _check_fdr(fdr)
    frame = scores if isinstance(scores, pd.DataFrame) else pd.DataFrame(dict(scores))
    coords = _coords(coords_um, len(frame))
    weights, radius = _weights_for(coords, radius_um)
    out = {}
    for name in frame.columns:
        x = frame[name].to_numpy(dtype=np.float64)
        if not np.isfinite(x).all():
            raise ValueError(f"column {name!r} contains non-finite values")
        out[str(name)] = _table(x, frame.index, weights, fdr, radius)
    return out


def spot_coords_um(adata: ad.AnnData) -> np.ndarray:
    """Spot centres in µm: ``obsm['spatial']`` (level-0 px) × ``uns['virtualst']['um_per_px']``.

    Raises
    ------
    KeyError
        When ``obsm['spatial']`` or ``uns['virtualst']['um_per_px']`` is missing.
    """
    um_per_px = adata.uns.get("virtualst", {}).get("um_per_px")
    if um_per_px is None:
        raise KeyError("uns['virtualst']['um_per_px'] is missing: cannot convert spot pixels to µm")
    return np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2] * float(um_per_px)
