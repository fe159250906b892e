"""Ridge head: one ridge regression per gene, each with its own alpha chosen by exact leave-one-out.

The core, :func:`ridge_loo`, computes what scikit-learn's ``RidgeCV(alphas,
alpha_per_target=True)`` computes (its "GCV" mode, which is exact
leave-one-out for ridge) from one eigendecomposition shared by every gene
and every alpha.

With ``Xc``/``Yc`` the centred data and ``Xc = U diag(s) V'`` (from the
eigendecomposition of ``Xc' Xc`` when ``n > p``, of ``Xc Xc'`` otherwise),
``lam = s**2``, ``Q = U' Yc`` and ``f = lam / (lam + alpha)``:

* residuals ``R = Yc - U diag(f) Q``;
* leverages ``h_i = sum_k U_ik**2 f_k`` (plus ``1/n`` for the intercept);
* leave-one-out errors ``R_ig / (1 - h_i)``, scored by their mean square per gene;
* coefficients ``V diag(s / (lam + alpha_g)) Q_g`` at each gene's best alpha.

Only the residuals cost ``n x rank x n_genes`` per alpha; they are formed in
float32, gene chunk by gene chunk, and reduced while still in cache (through
torch's oneDNN when available: about twice numpy's OpenBLAS, whose AVX2
kernels it picks on AVX-512 CPUs such as Zen 5). Most alphas need not be
scored at all: the residual sum of squares has a closed form, so cheap
bounds on every score (:class:`_LooBounds`) rule out the alphas that cannot
beat a gene's best (28 % of the pairs left on the benchmark's 20,000 spots,
~35 % on her2st). The decomposition, ``Xc' Y`` and the final coefficients
stay in float64, so predictions match scikit-learn to ~1e-10; alphas whose
float32 scores are within float32 error of a gene's best are re-scored in
float64 before choosing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import linalg
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from virtualst.heads.base import Head
from virtualst.heads.features import FeatureTransform

#: Default grid: after standardisation (+PCA) the squared singular values are
#: ``n_spots x`` per-component variances (summing to ~``n_features``), so
#: 0.1 is almost unpenalised and 1e7 shrinks everything to the mean for the
#: spot counts of a few Visium sections; half-decade steps.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-1, 7, 17))

#: Safety factor on the float32 error proxy of :func:`_f32_tolerance`.
_F32_ERROR_MARGIN = 16.0

#: High-leverage spots whose residuals :class:`_LooBounds` computes exactly (the rest are bounded).
_EXACT_ROWS = 64

#: Residual block size in bytes (float32): fits the L3 cache, large enough for efficient matmuls
#: (~200 genes at 20,000 spots; on 2 Zen 5 cores 128-256 genes ran 5-10% faster than 512, 52 genes 15-25% slower).
_BLOCK_BYTES = 16 << 20

#: Below this many float32 loop flops ``backend="auto"`` stays with numpy: importing torch costs
#: seconds (once torch is imported the bar drops to 1e9, under which oneDNN's set-up dominates).
_ONEDNN_MIN_FLOPS = 5e10


@dataclass
class RidgeLOO:
    """Result of :func:`ridge_loo` for ``t`` targets and ``A`` alphas.

    Attributes
    ----------
    alpha : ndarray (t,)
        Chosen alpha per target (the first of the grid's order on exact ties, as scikit-learn).
    alpha_index : ndarray (t,)
        Its position in the grid.
    coef : ndarray (t, n_features)
    intercept : ndarray (t,)
    mse : ndarray (A, t)
        Leave-one-out mean squared error of every alpha (rows in grid order) and target:
        float32 accuracy, float64 where a near-tie was re-scored; NaN where the alpha was
        ruled out by its bound without being scored (see ``scored``).
    scored : ndarray (A, t) bool
        Which alpha-target pairs were scored (all of them with ``prune=False``).
    rank : int
        Numerical rank of the (centred) design kept in the decomposition.
    flops : dict[str, float]
        Estimated floating-point operations per stage (``"total"`` included).
    backend : str
        Float32 matrix-product backend of the LOO loop (``"onednn"`` or ``"numpy"``).
    n_refined : int
        Targets re-scored in float64 because two alphas were within float32 noise.
    """

    alpha: np.ndarray
    alpha_index: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    mse: np.ndarray
    scored: np.ndarray
    rank: int
    flops: dict[str, float]
    backend: str
    n_refined: int


@dataclass
class _Spectrum:
    """Thin SVD of the centred design, ``Xc = u diag(sqrt(lam)) v'``, and ``q = u' Yc``."""

    u: np.ndarray  # (n, r) float64
    lam: np.ndarray  # (r,)
    v: np.ndarray  # (p, r)
    q: np.ndarray  # (r, t) float64


def check_alphas(alphas) -> np.ndarray:
    """The alpha grid as a 1-D float array; ``ValueError`` unless non-empty, finite and positive."""
    grid = np.atleast_1d(np.asarray(alphas, dtype=np.float64)).ravel()
    if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
        raise ValueError(f"alphas must be a non-empty grid of finite positive numbers, got {alphas!r}")
    return grid


def ridge_loo(
    X: np.ndarray,
    Y: np.ndarray,
    alphas=DEFAULT_ALPHAS,
    fit_intercept: bool = True,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    prune: bool = True,
) -> RidgeLOO:
    """Ridge regression of every column of ``Y`` with its own alpha, chosen by exact leave-one-out.

    Same alphas, scores and coefficients as
    ``sklearn.linear_model.RidgeCV(alphas, fit_intercept=fit_intercept, alpha_per_target=True)``.

    Parameters
    ----------
    X : array (n_samples, n_features)
    Y : array (n_samples, n_targets)
    alphas : sequence of float
        Positive penalties; ties go to the first in this order.
    fit_intercept
        Centre ``X`` and ``Y`` (the leave-one-out leverage then includes ``1/n``).
    backend
        Float32 matrix products of the LOO loop: ``"onednn"`` (through torch; ~2x numpy's
        OpenBLAS on AVX-512 CPUs), ``"numpy"``, or ``"auto"`` (oneDNN for large problems
        when torch provides it).
    chunk_size
        Targets per block of residuals (default: a block of about 16 MiB).
    prune
        Skip the alphas that cheap bounds on their score rule out (:class:`_LooBounds`);
        the choice, scores kept and coefficients are those of scoring every alpha.

    Returns
    -------
    RidgeLOO
    """
    grid = check_alphas(alphas)
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
        raise ValueError(f"X and Y must be 2-D with the same rows, got {X.shape} and {Y.shape}")
    n, p = X.shape
    t = Y.shape[1]
    x_mean = X.mean(axis=0) if fit_intercept else np.zeros(p)
    y_mean = Y.mean(axis=0) if fit_intercept else np.zeros(t)
    Xc = X - x_mean if fit_intercept else X

    spec, flops = _spectrum(Xc, Y, y_mean)
    r = len(spec.lam)
    shrink = spec.lam[:, None] / (spec.lam[:, None] + grid[None, :])  # f, (r, A)
    # Leverage per spot and alpha, accumulated in float64 from exact u.
    h = (spec.u * spec.u) @ shrink + (1.0 / n if fit_intercept else 0.0)
    with np.errstate(divide="ignore"):
        dinv = np.ascontiguousarray((1.0 / (1.0 - h)).T)  # (A, n)
    flops["leverage"] = 3.0 * n * r * len(grid)

    loop_flops = 2.0 * n * r * t * len(grid)
    gemm = _F32Gemm(spec.u.astype(np.float32), _pick_backend(backend, loop_flops))
    chunk = chunk_size or int(np.clip(_BLOCK_BYTES // (4 * max(n, 1)), 32, 1024))
    mse, y_ss, scored = _loo_mse_f32(gemm, spec, shrink, dinv, Y, y_mean, chunk, prune)
    flops["loo_f32"] = float(scored.sum()) * (2.0 * n * r + 4.0 * n + r)
    if prune:  # closed forms (3 products) and the exact rows' residuals
        flops["bounds"] = (6.0 + 2.0 * min(_EXACT_ROWS, n)) * r * t * len(grid)

    tol = _f32_tolerance(mse, y_ss, spec, shrink, dinv)
    best, refined = _choose(mse, tol, Y, y_mean, spec, shrink, dinv)
    flops["refine_f64"] = 2.0 * n * r * refined[1]

    # Coefficients in float64 in feature space: V diag(s / (lam + alpha_g)) Q_g.
    s = np.sqrt(spec.lam)
    scale = s[:, None] / (spec.lam[:, None] + grid[best][None, :])  # (r, t)
    coef = (spec.v @ (scale * spec.q)).T
    intercept = y_mean - coef @ x_mean
    flops["coef"] = 2.0 * p * r * t
    flops["total"] = float(sum(flops.values()))
    return RidgeLOO(
        alpha=grid[best],
        alpha_index=best,
        coef=coef,
        intercept=intercept,
        mse=mse,
        scored=scored,
        rank=r,
        flops=flops,
        backend=gemm.backend,
        n_refined=refined[0],
    )


# ----------------------------------------------------------------------------- decomposition
def _spectrum(Xc: np.ndarray, Y: np.ndarray, y_mean: np.ndarray) -> tuple[_Spectrum, dict[str, float]]:
    """Thin SVD of ``Xc`` from the smaller of its two Gram matrices, and ``U' Yc``, all float64."""
    n, p = Xc.shape
    t = Y.shape[1]
    flops: dict[str, float] = {}
    if n > p:
        gram = Xc.T @ Xc  # syrk
        flops["gram"] = float(n) * p * p
    else:
        gram = Xc @ Xc.T
        flops["gram"] = float(p) * n * n
    m = len(gram)
    # One thread: LAPACK's eigensolver makes many small BLAS calls, and threaded OpenBLAS
    # spins badly when the cores are shared (20x slower measured on a busy 2-core box).
    with threadpool_limits(limits=1, user_api="blas"):
        lam, vecs = linalg.eigh(gram, driver="evd", overwrite_a=True, check_finite=False)
    flops["eigh"] = 9.0 * m**3
    # Drop numerically-zero directions (rank deficiency; the constant direction removed by centring).
    keep = lam > max(n, p) * np.finfo(np.float64).eps * max(float(lam[-1]) if m else 0.0, 0.0)
    keep &= lam > 0
    lam, vecs = lam[keep][::-1], vecs[:, keep][:, ::-1]
    s = np.sqrt(lam)
    if n > p:
        v = vecs
        xty = Xc.T @ Y  # == Xc' Yc: centred columns of Xc sum to zero (and y_mean = 0 otherwise)
        u = (Xc @ v) / s
        q = (v.T @ xty) / s[:, None]
        flops["xty"] = 2.0 * n * p * t
        flops["u"] = 2.0 * n * p * len(lam)
        flops["q"] = 2.0 * p * len(lam) * t
    else:
        u = vecs
        q = u.T @ Y - np.outer(u.sum(axis=0), y_mean)  # u' (Y - y_mean) without copying Y
        v = (Xc.T @ u) / s
        flops["q"] = 2.0 * n * len(lam) * t
        flops["v"] = 2.0 * n * p * len(lam)
    return _Spectrum(u=u, lam=lam, v=v, q=q), flops


# ----------------------------------------------------------------------------- float32 LOO loop
@lru_cache(maxsize=1)
def _onednn_linear():
    """torch's oneDNN matmul ``(a, b) -> a @ b.T`` (float32), or ``None`` when unavailable or wrong."""
    try:
        import torch

        op = torch.ops.mkldnn._linear_pointwise
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((33, 17), dtype=np.float32), rng.standard_normal((5, 17), dtype=np.float32)
        got = op(torch.from_numpy(a), torch.from_numpy(b), None, "none", [], "").numpy()
        if not np.allclose(got, a @ b.T, rtol=1e-4, atol=1e-4):
            return None
    except Exception:  # no torch, a build without oneDNN, or a changed private op
        return None

    def linear(a: np.ndarray, b):
        return op(torch.from_numpy(a), b, None, "none", [], "").numpy()

    return linear


def onednn_available() -> bool:
    """Whether the ``"onednn"`` backend works here (imports torch: call it early to keep that out of timings)."""
    return _onednn_linear() is not None


def _full_fp32_precision() -> bool:
    """False when torch was told to trade float32 matmul precision for speed (TF32/bf16 would spoil the scores)."""
    import torch

    precision = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")
    return torch.get_float32_matmul_precision() == "highest" and precision in ("none", "ieee")


def _pick_backend(backend: str, flops: float) -> str:
    if backend not in ("auto", "onednn", "numpy"):
        raise ValueError(f"unknown backend {backend!r}; known: auto, onednn, numpy")
    if backend == "numpy":
        return "numpy"
    # oneDNN wins ~2x on large products but costs a torch import (seconds) and per-shape set-up.
    if backend == "auto" and flops < (_ONEDNN_MIN_FLOPS if "torch" not in sys.modules else 1e9):
        return "numpy"
    return "onednn" if onednn_available() and _full_fp32_precision() else "numpy"


class _F32Gemm:
    """``b (c, r) -> b @ u.T`` in float32 for a fixed tall ``u (n, r)``, as a writable ``(c, n)`` array."""

    def __init__(self, u32: np.ndarray, backend: str) -> None:
        self.backend = backend
        self.rank = u32.shape[1]
        self.n = u32.shape[0]
        if backend == "onednn":
            import torch

            self._weight = torch.from_numpy(np.ascontiguousarray(u32))
            self._linear = _onednn_linear()
        else:
            self._ut = np.ascontiguousarray(u32).T  # (r, n) view

    def __call__(self, b: np.ndarray) -> np.ndarray:
        if self.rank == 0:
            return np.zeros((len(b), self.n), dtype=np.float32)
        if self.backend == "onednn":
            return self._linear(b, self._weight)
        return b @ self._ut


class _LooBounds:
    """Bounds on the LOO mean squared error of every alpha, from the spectrum and a few spots' residuals.

    With ``U`` orthonormal, the residual sum of squares has a closed form,
    ``||R||**2 = ||Yc||**2 - sum_k (2 f_k - f_k**2) Q_k**2``, and each spot's
    leave-one-out error is its residual times ``1/(1 - h_i)``. The
    ``_EXACT_ROWS`` spots of highest leverage (real sections have a few with
    ``h`` near 1, which would make the bounds useless) get their residuals
    computed in float64; the other spots' share of the RSS is bounded by the
    smallest and largest ``1/(1 - h_i)**2`` among them. Every term carries a
    bound on its float64 error, the closed form's including ``U``'s departure
    from orthonormality (``~(m + n) eps lam_max / sqrt(lam_k lam_l)`` from
    the decomposition). On the benchmark's problem (50 genes checked at three
    alphas) the bound was at least 380x the closed form's actual error, yet a
    median 3.8e-7 of the RSS (at most 4.1e-5).
    """

    def __init__(self, spec: _Spectrum, shrink: np.ndarray, dinv: np.ndarray) -> None:
        n = dinv.shape[1]
        self.n = n
        self.shrink = shrink  # (r, A)
        self.keep = (2.0 * shrink - shrink**2).T  # (A, r): what each direction removes from ||Yc||**2
        self.shrink_sq = (shrink**2).T  # (A, r)
        self.reach = (shrink / np.sqrt(spec.lam)[:, None]).T  # (A, r)
        d2 = dinv.astype(np.float64) ** 2  # (A, n)
        self.rows = np.sort(np.argsort(-d2.max(axis=0), kind="stable")[:_EXACT_ROWS])
        rest = np.delete(d2, self.rows, axis=1)
        self.d2_rows = d2[:, self.rows]  # (A, m)
        self.d2_min = rest.min(axis=1) if rest.shape[1] else np.zeros(len(d2))
        self.d2_max = rest.max(axis=1) if rest.shape[1] else np.zeros(len(d2))
        self.d2_top = d2.max(axis=1)
        self.u_rows = spec.u[self.rows]  # (m, r)
        eps = np.finfo(np.float64).eps
        self.rounding = eps * (len(spec.lam) + n)
        self.row_rounding = 2.0 * eps * (len(spec.lam) + 2)
        self.lam_max = float(spec.lam[0]) if len(spec.lam) else 0.0

    def of(self, q: np.ndarray, y_ss: np.ndarray, yc_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(lower, upper, size)`` (A, c) for targets with ``Q`` columns ``q (r, c)``, ``||Yc||**2`` ``y_ss (c,)``.

        ``yc_rows`` (m, c): the centred targets at :attr:`rows`. ``size`` is what
        :func:`_f32_error` scales the float32 error by.
        """
        with np.errstate(invalid="ignore", over="ignore"):  # 1/(1-h) is inf for interpolated spots: NaN bounds rule nothing out
            return self._bounds(q, y_ss, yc_rows)

    def _bounds(self, q: np.ndarray, y_ss: np.ndarray, yc_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q_sq = q**2
        fq_ss = self.shrink_sq @ q_sq  # ||f * Q||**2
        rss = y_ss[None, :] - self.keep @ q_sq
        slack = self.rounding * ((y_ss[None, :] + fq_ss) + self.lam_max * (self.reach @ np.abs(q)) ** 2)
        # Residuals of the high-leverage spots, as intervals: |error| <= (r + 2) eps (|Yc_i| + ||f * Q||) (rows of U have norm <= 1).
        fitted = np.stack([self.u_rows @ (self.shrink[:, a, None] * q) for a in range(self.shrink.shape[1])])  # (A, m, c)
        res = np.abs(yc_rows[None] - fitted)
        err = self.row_rounding * (np.abs(yc_rows)[None] + np.sqrt(fq_ss)[:, None, :])
        sq_lo, sq_hi = np.maximum(res - err, 0.0) ** 2, (res + err) ** 2
        rest_lo = np.maximum(rss - slack - sq_hi.sum(axis=1), 0.0)
        rest_hi = np.maximum(rss + slack - sq_lo.sum(axis=1), 0.0)
        d2_rows = self.d2_rows[:, :, None]
        lower = ((sq_lo * d2_rows).sum(axis=1) + rest_lo * self.d2_min[:, None]) / self.n
        upper = ((sq_hi * d2_rows).sum(axis=1) + rest_hi * self.d2_max[:, None]) / self.n
        return lower, upper, _error_size(self.d2_top, y_ss, fq_ss, self.n)


def _error_size(d2_max: np.ndarray, y_ss: np.ndarray, fq_ss: np.ndarray, n: int) -> np.ndarray:
    """``(A, t)`` scale of the float32 error of the LOO scores (see :func:`_f32_tolerance`).

    ``d2_max`` (A,): largest ``1/(1 - h)**2``; ``y_ss`` (t,): ``||Yc||**2``; ``fq_ss`` (A, t): ``||f * Q||**2``.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        return d2_max[:, None] * (y_ss[None, :] + fq_ss) / n


def _f32_error(mse: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Bound on the float32 error of LOO scores ``mse`` (see :func:`_f32_tolerance`)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _F32_ERROR_MARGIN * np.finfo(np.float32).eps * np.sqrt(np.abs(mse) * size)


def _next_round(
    mse: np.ndarray, done: np.ndarray, bounds: tuple[np.ndarray, np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """The next ``(targets, alphas)`` to score, at most one alpha per target; ``None`` when done.

    ``mse`` and ``done`` (A, c): the scores so far and which pairs have one.

    Without bounds every alpha is scored, in grid order. With bounds, a
    target first gets the alpha with the smallest upper bound, then, one per
    round and smallest lower bound first, the alphas whose lower bound does
    not exceed its best score so far by more than float32 error: an alpha
    left out is worse than the best by more than both scores' errors, so it
    could neither be chosen nor tie (the choice is the same as scoring all).
    """
    pending = ~done
    if bounds is None:
        rows = np.flatnonzero(pending.any(axis=1))
        if len(rows) == 0:
            return None
        targets = np.flatnonzero(pending[rows[0]])
        return targets, np.full(len(targets), rows[0])
    lower, upper, size = bounds
    if pending.all():
        targets = np.arange(mse.shape[1])
        return targets, np.argmin(np.where(np.isnan(upper), np.inf, upper), axis=0)
    scores = np.where(np.isnan(mse), np.inf, mse)
    best_at = np.argmin(scores, axis=0)
    columns = np.arange(mse.shape[1])
    best = scores[best_at, columns]
    ceiling = (best + _f32_error(best, size[best_at, columns])) * (1.0 + 1e-6)  # 1e-6: margin on the margins
    ruled_out = lower - _f32_error(upper, size) > ceiling[None, :]  # False where anything is NaN
    candidate = pending & ~ruled_out
    targets = np.flatnonzero(candidate.any(axis=0))
    if len(targets) == 0:
        return None
    ranked = np.where(candidate[:, targets], np.nan_to_num(lower[:, targets], nan=-np.inf), np.inf)
    return targets, np.argmin(ranked, axis=0)


def _loo_mse_f32(
    gemm: _F32Gemm, spec: _Spectrum, shrink: np.ndarray, dinv: np.ndarray, Y: np.ndarray, y_mean: np.ndarray, chunk: int, prune: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LOO mean squared errors ``(A, t)`` from float32 residual blocks, ``||Yc||**2`` per target, and which were scored.

    Unscored entries (ruled out by :class:`_LooBounds` when ``prune``) are NaN.
    """
    n, t = Y.shape
    n_alphas = shrink.shape[1]
    mse = np.full((n_alphas, t), np.nan)
    scored = np.zeros((n_alphas, t), dtype=bool)
    y_ss = np.empty(t)
    q32 = spec.q.astype(np.float32)
    f32 = shrink.T.astype(np.float32)  # (A, r)
    dinv32 = dinv.astype(np.float32)
    bounds = _LooBounds(spec, shrink, dinv) if prune else None
    for j0 in range(0, t, chunk):
        j1 = min(t, j0 + chunk)
        yc = Y[:, j0:j1] - y_mean[j0:j1]
        y_ss[j0:j1] = np.einsum("ij,ij->j", yc, yc)
        yc_t = yc.T.astype(np.float32, order="C")  # (c, n)
        qt = np.ascontiguousarray(q32[:, j0:j1].T)  # (c, r)
        block, done = mse[:, j0:j1], scored[:, j0:j1]  # views
        limits = bounds.of(spec.q[:, j0:j1], y_ss[j0:j1], yc[bounds.rows]) if bounds else None
        while (todo := _next_round(block, done, limits)) is not None:
            targets, alphas = todo
            block[alphas, targets] = _score_round(gemm, qt, yc_t, f32, dinv32, targets, alphas)
            done[alphas, targets] = True
    return mse, y_ss, scored


def _score_round(
    gemm: _F32Gemm, qt: np.ndarray, yc_t: np.ndarray, f32: np.ndarray, dinv32: np.ndarray, targets: np.ndarray, alphas: np.ndarray
) -> np.ndarray:
    """Mean squared LOO error of each target at its own alpha, summed in float32 (one matrix product)."""
    order = np.argsort(alphas, kind="stable")  # targets sharing an alpha side by side: one 1/(1-h) row each
    targets, alphas = targets[order], alphas[order]
    res = gemm(qt[targets] * f32[alphas])  # U diag(f) Q, transposed: (c, n)
    whole = len(targets) == len(yc_t) and bool(np.all(targets == np.arange(len(targets))))
    np.subtract(res, yc_t if whole else yc_t[targets], out=res)  # -R'
    starts = np.flatnonzero(np.r_[True, alphas[1:] != alphas[:-1]])
    for s, e in zip(starts, np.r_[starts[1:], len(alphas)]):
        np.multiply(res[s:e], dinv32[alphas[s]], out=res[s:e])
    np.square(res, out=res)
    # Along the contiguous axis numpy sums pairwise: ~1e-7 relative error in float32.
    sums = np.add.reduce(res, axis=1, dtype=np.float32)
    out = np.empty(len(sums))
    out[order] = sums
    return out / res.shape[1]


def _f32_tolerance(mse: np.ndarray, y_ss: np.ndarray, spec: _Spectrum, shrink: np.ndarray, dinv: np.ndarray) -> np.ndarray:
    """Bound on the float32 error of each LOO score ``(A, t)``.

    The residual's rounding error scales with the size of the two terms it is
    the difference of, ``||Yc||`` and ``||U diag(f) Q|| = ||f * Q||`` (U is
    orthonormal), weighted by the largest ``1/(1 - h)``: this proxy bounded
    the measured error within 3.5x on random designs (interpolating ``n < p``
    fits included), hence the 16x margin.
    """
    n = dinv.shape[1]
    fq_ss = (shrink.T**2) @ (spec.q**2)  # (A, t)
    with np.errstate(over="ignore"):
        d2_max = np.max(dinv, axis=1) ** 2
    return _f32_error(mse, _error_size(d2_max, y_ss, fq_ss, n))


# ----------------------------------------------------------------------------- choice
def _choose(
    mse: np.ndarray, tol: np.ndarray, Y: np.ndarray, y_mean: np.ndarray, spec: _Spectrum, shrink: np.ndarray, dinv: np.ndarray
) -> tuple[np.ndarray, tuple[int, int]]:
    """Best alpha per target; alphas within float32 error of the best are re-scored in float64 first.

    ``mse`` is updated in place. Returns the best indices and
    ``(targets re-scored, alpha-target pairs re-scored)``.
    """
    n, t = Y.shape
    scores = np.where(np.isnan(mse), np.inf, mse)
    best = np.argmin(scores, axis=0)
    columns = np.arange(t)
    close = scores - tol <= (scores + tol)[best, columns]
    genes = np.flatnonzero(close.sum(axis=0) > 1)
    n_pairs = 0
    for a in np.flatnonzero(close[:, genes].any(axis=1)):
        g = genes[close[a, genes]]
        resid = (Y[:, g] - y_mean[g]) - spec.u @ (shrink[:, a, None] * spec.q[:, g])
        resid *= dinv[a][:, None]
        mse[a, g] = np.einsum("ij,ij->j", resid, resid) / n
        n_pairs += len(g)
    if len(genes):
        scores = np.where(np.isnan(mse), np.inf, mse)
        best[genes] = np.argmin(scores[:, genes], axis=0)
    return best, (len(genes), n_pairs)


# ----------------------------------------------------------------------------- group CV
def ridge_group_cv(X: np.ndarray, Y: np.ndarray, groups, alphas=DEFAULT_ALPHAS, fit_intercept: bool = True, n_splits: int = 5):
    """Per-target alpha by group k-fold (whole sections held out), then coefficients on all rows.

    Leave-one-out scores a spot with its spatial neighbours in the training
    set, which favours too little shrinkage on tissue sections. Holding out
    whole groups measures transfer to a new section instead, and each gene's
    alpha maximises its held-out Pearson r averaged over folds: the
    per-section mean shifts that dominate the squared error on new sections
    do not decide the penalty (her2st, 50 HVGs, leave-one-section-out: mean
    r 0.337 against 0.323 for LOO; choosing by held-out MSE gave 0.322).
    Each fold costs one eigendecomposition; every alpha is then a small
    product on the held-out rows.

    Returns
    -------
    alpha, coef, intercept, mse
        Chosen alpha ``(t,)``, coefficients ``(t, p)``, intercepts ``(t,)``
        and the held-out mean squared error ``(A, t)`` of every alpha.
    """
    from virtualst.heads.cv import inner_splits, pearson_per_gene

    grid = check_alphas(alphas)
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    sse = np.zeros((len(grid), Y.shape[1]))
    pearson = np.zeros_like(sse)
    for train, test in inner_splits(len(X), groups, n_splits):
        spec, x_mean, y_mean = _centred_spectrum(X[train], Y[train], fit_intercept)
        s = np.sqrt(spec.lam)
        projected = (X[test] - x_mean) @ spec.v  # (n_test, r)
        for a, alpha in enumerate(grid):
            pred = (projected * (s / (spec.lam + alpha))) @ spec.q + y_mean
            sse[a] += ((Y[test] - pred) ** 2).sum(axis=0)
            pearson[a] += pearson_per_gene(Y[test], pred)
    best = np.argmax(pearson, axis=0)  # ties: first alpha in grid order
    spec, x_mean, y_mean = _centred_spectrum(X, Y, fit_intercept)
    scale = np.sqrt(spec.lam)[:, None] / (spec.lam[:, None] + grid[best][None, :])
    coef = (spec.v @ (scale * spec.q)).T
    return grid[best], coef, y_mean - coef @ x_mean, sse / len(X)


def _centred_spectrum(X: np.ndarray, Y: np.ndarray, fit_intercept: bool) -> tuple[_Spectrum, np.ndarray, np.ndarray]:
    x_mean = X.mean(axis=0) if fit_intercept else np.zeros(X.shape[1])
    y_mean = Y.mean(axis=0) if fit_intercept else np.zeros(Y.shape[1])
    spec, _ = _spectrum(X - x_mean, Y, y_mean)
    return spec, x_mean, y_mean


# ----------------------------------------------------------------------------- head
class RidgeHead(Head):
    """Standardise (+PCA) the embeddings, then one ridge per gene with its own LOO-chosen alpha.

    Parameters
    ----------
    alphas : tuple of float
        Penalty grid (see :data:`DEFAULT_ALPHAS`).
    standardize, n_components
        Passed to :class:`~virtualst.heads.features.FeatureTransform`
        (``n_components=None``: no PCA).
    fit_intercept
        Fit an intercept per gene.
    cv
        How each gene's alpha is chosen: ``"loo"`` (exact leave-one-out, as
        ``RidgeCV``) or ``"group"`` (group k-fold over the ``groups`` given to
        :meth:`fit`, i.e. whole sections held out; falls back to LOO with
        fewer than two groups). See :func:`ridge_group_cv` for why.
    n_splits
        Folds of ``cv="group"``.

    Attributes
    ----------
    transform_ : FeatureTransform
    alpha_ : ndarray (n_targets,)
        Chosen alpha per gene (length 1 for a 1-D ``y``).
    coef_ : ndarray (n_targets, n_features_out) or (n_features_out,) for a 1-D ``y``
    intercept_ : ndarray (n_targets,) or float
    cv_mse_ : ndarray (n_targets,)
        Cross-validated mean squared error at the chosen alpha (LOO: float32 accuracy, ~1e-6
        relative, unless it was re-scored in float64 to break a near-tie).
    cv_used_ : str
        ``"loo"`` or ``"group"``: what actually chose the alphas.
    cv_scored_ : float
        Share of the alpha-gene pairs whose CV score was computed: below 1 when
        bounds ruled alphas out (LOO, see :func:`ridge_loo`), 1 for group CV.
    n_features_in_ : int
    """

    kind = "ridge"

    def __init__(
        self,
        alphas: tuple[float, ...] = DEFAULT_ALPHAS,
        standardize: bool = True,
        n_components: int | None = 256,
        fit_intercept: bool = True,
        cv: str = "loo",
        n_splits: int = 5,
    ) -> None:
        self.alphas = alphas
        self.standardize = standardize
        self.n_components = n_components
        self.fit_intercept = fit_intercept
        self.cv = cv
        self.n_splits = n_splits

    def fit(self, X, Y, groups=None):
        """Fit on embeddings ``X (n_spots, n_features)`` and targets ``Y``; ``groups`` (section ids) serve ``cv="group"``."""
        X, Y = validate_data(self, X, Y, multi_output=True, y_numeric=True, dtype=[np.float64, np.float32])
        check_alphas(self.alphas)
        if self.cv not in ("loo", "group"):
            raise ValueError(f"cv must be 'loo' or 'group', got {self.cv!r}")
        self.transform_ = FeatureTransform(standardize=self.standardize, n_components=self.n_components).fit(X)
        Z = self.transform_.transform(X)
        Y2 = np.asarray(Y, dtype=np.float64).reshape(len(Y), -1)
        by_group = self.cv == "group" and groups is not None and len(np.unique(groups)) >= 2
        with np.errstate(invalid="ignore", divide="ignore"):  # degenerate fits (one spot) score NaN
            if by_group:
                alpha, coef, intercept, mse = ridge_group_cv(Z, Y2, groups, self.alphas, self.fit_intercept, self.n_splits)
                chosen = np.argmax(check_alphas(self.alphas)[:, None] == alpha[None, :], axis=0)
                self.cv_mse_ = mse[chosen, np.arange(Y2.shape[1])]
                self.cv_scored_ = 1.0
            else:
                result = ridge_loo(Z, Y2, self.alphas, self.fit_intercept)
                alpha, coef, intercept = result.alpha, result.coef, result.intercept
                self.cv_mse_ = result.mse[result.alpha_index, np.arange(Y2.shape[1])]
                self.cv_scored_ = float(result.scored.mean())
        single = np.ndim(Y) == 1
        self.cv_used_ = "group" if by_group else "loo"
        self.alpha_ = alpha
        self.coef_ = coef[0] if single else coef
        self.intercept_ = float(intercept[0]) if single else intercept
        return self

    def predict(self, X) -> np.ndarray:
        """Predicted expression ``(n_spots, n_targets)`` (1-D when fitted on a 1-D ``y``)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self.transform_.transform(X) @ self.coef_.T + self.intercept_

    # ------------------------------------------------------------------ state
    def _export(self) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str], dict[str, Head]]:
        meta = {
            "n_features_in": int(self.n_features_in_),
            "single_target": bool(np.ndim(self.coef_) == 1),
            "cv_used": self.cv_used_,
            "cv_scored": self.cv_scored_,
        }
        arrays = {
            "alpha": np.asarray(self.alpha_, dtype=np.float64),
            "coef": np.atleast_2d(self.coef_),
            "intercept": np.atleast_1d(np.asarray(self.intercept_, dtype=np.float64)),
            "cv_mse": np.asarray(self.cv_mse_, dtype=np.float64),
            **self.transform_.export_arrays("features."),
        }
        return meta, arrays, {}, {}

    def _restore(
        self, meta: dict[str, Any], arrays: dict[str, np.ndarray], texts: dict[str, str], children: dict[str, Head]
    ) -> None:
        self.transform_ = FeatureTransform(standardize=self.standardize, n_components=self.n_components)
        self.transform_.restore_arrays(arrays, "features.")
        self.n_features_in_ = int(meta["n_features_in"])
        self.cv_used_ = meta.get("cv_used", "loo")
        self.cv_scored_ = float(meta.get("cv_scored", 1.0))  # saved before LOO pruning: every pair scored
        self.alpha_ = np.asarray(arrays["alpha"], dtype=np.float64)
        self.cv_mse_ = np.asarray(arrays["cv_mse"], dtype=np.float64)
        coef = np.asarray(arrays["coef"], dtype=np.float64)
        intercept = np.asarray(arrays["intercept"], dtype=np.float64)
        single = bool(meta["single_target"])
        self.coef_ = coef[0] if single else coef
        self.intercept_ = float(intercept[0]) if single else intercept
