"""Exact top-k inner-product search screened by a bfloat16 matrix product.

On CPUs with native bfloat16 dot products (AVX-512 BF16, AMX, Arm BF16) a
bfloat16 product runs 2-5x faster than a float32 one, but its scores are only
good to ~2-3 decimals. :class:`BF16ScreenIndex` uses it as a screen and stays
exact: every bfloat16 score comes with a rigorous error bound, a query's
``k``-th best lower bound rules out every reference whose upper bound falls
below it, and the few survivors are scored again pair by pair in float32.

The answer is, for each query, the ``k`` references with the largest
pairwise float32 inner products (faiss's ``fvec_inner_products_by_idx``, the
scores :mod:`virtualst.heads.knn` reports), ties to the lower index —
independent of how queries are batched. Where the screen would leave more
than 1/16 of the references to re-score (near-identical embeddings), that
chunk and the rest of the search go to faiss's float32 brute force instead
(the same neighbours up to float32 ties).

The bound. With ``q̂ = bf16(q)``, ``δq = q - q̂`` (same for a reference
``r``), ``c`` a shift per query (a bfloat16 number, subtracted inside the
product through an extra column so that scores near the k-th come out near
0, where bfloat16's rounding is finest) and ``v`` the product's bfloat16
output, an estimate of ``q·r - c``::

    q·r = q̂·r̂ + δq·r + q̂·δr                             |δq·r| + |q̂·δr| <= ‖δq‖‖r‖ + ‖q̂‖‖δr‖
    |float32 accumulation of q̂·r̂ - c - (q̂·r̂ - c)| <= γ (‖q̂‖‖r̂‖ + |c|)   (bfloat16 products are exact in float32)
    |v - float32 accumulation|               <= u |v| / (1 - u),  u = 2^-8 (round to nearest)
    |pairwise float32 score - q·r|          <= γ ‖q‖‖r‖

with ``γ = n 2^-24 / (1 - n 2^-24)`` for ``n = d + 1`` terms, plus ``2^-126``
terms for flushed subnormals. :func:`bf16_screen_ok` checks on a probe
product that this machine's bfloat16 product obeys that arithmetic (and is
fast) before :mod:`virtualst.heads.knn` uses the screen.
"""

from __future__ import annotations

import functools

import faiss
import numpy as np

from virtualst.bench.timing import best_time

__all__ = ["BF16ScreenIndex", "bf16_model_holds", "bf16_screen_ok", "candidate_threshold", "pair_scores", "screen_error_bound"]

#: Unit roundoff of bfloat16 (8 significant bits, round to nearest even).
BF16_UNIT = 2.0**-8
_F32_UNIT = 2.0**-24
_TINY = 2.0**-126  # smallest normal float32: what flushing a subnormal can lose
#: bfloat16 scores per query chunk: the product, mask and top-k temporaries stay ~50 MB.
_CHUNK = 1 << 23
#: Chunks screened before their candidates are re-scored (candidate ids: ~16 x 2 MB at 1,000 per query).
_GROUP = 16
#: References sampled to set each query's shift (~0.6 % of the product at 20,000 references).
_PIVOTS = 128
#: Re-scoring more than 1/_DENSE_SHARE of the references costs more than faiss's float32 search.
_DENSE_SHARE = 16
#: Width of the shift column plus zero padding (keeps rows a multiple of 32 bfloat16 values).
_PAD = 32


def pair_scores(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, l2: bool = False) -> np.ndarray:
    """Float32 inner products (squared L2 distances with ``l2``) of each query with the rows of ``vectors`` in its row of ``ids``.

    One product per pair, in C (faiss), so a pair's score does not depend on
    which other pairs are scored with it. ``ids`` (n_queries, m) must be valid
    row indices.
    """
    queries, vectors = (np.ascontiguousarray(a, dtype=np.float32) for a in (queries, vectors))  # no copy when already so
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = np.empty(ids.shape, dtype=np.float32)
    by_idx = faiss.fvec_L2sqr_by_idx if l2 else faiss.fvec_inner_products_by_idx
    by_idx(faiss.swig_ptr(out), faiss.swig_ptr(queries), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), vectors.shape[1], *ids.shape)
    return out


def _gamma(d: int) -> float:
    return d * _F32_UNIT / (1.0 - d * _F32_UNIT)


def _bf16_rows(vectors: np.ndarray):
    """``(rows, ‖v‖, ‖bf16(v)‖, ‖v - bf16(v)‖)``: the norms as float64 upper bounds.

    ``rows`` (n, d + _PAD) bfloat16 holds ``bf16(v)`` then ``_PAD`` zeros
    (the shift column and padding). The norms are taken in float32 and raised
    by their worst rounding error; ``v - bf16(v)`` is exact in float32.
    """
    import torch

    v32 = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    n, d = v32.shape
    rows = torch.zeros((n, d + _PAD), dtype=torch.bfloat16)
    rows[:, :d] = v32
    rounded = rows[:, :d].float()

    def norm(x) -> np.ndarray:
        # relative error < γ_{d+2}; squares below 2^-126 may flush: at most sqrt(d) 2^-63 in all
        return torch.linalg.vector_norm(x, dim=1).double().numpy() * (1 + _gamma(d + 2)) + np.sqrt(d) * 2.0**-63

    return rows, norm(v32), norm(rounded), norm(v32 - rounded)


def screen_error_bound(d: int, q_norm, qb_norm, q_err, r_norm: float, rb_norm: float, r_err: float, shift=0.0) -> np.ndarray:
    """Bound on ``|v + c - s|`` without the output rounding term, per query (float64).

    ``v`` is the bfloat16 product's score before its output rounding, ``c``
    the query's ``shift``, ``s`` the pairwise float32 score. ``q_*`` are
    per-query norms (``‖q‖``, ``‖bf16(q)‖``, ``‖q - bf16(q)‖``); ``r_*`` the
    largest of each over the references. Add ``u |v| / (1 - u)`` for the
    output rounding.
    """
    q_norm, qb_norm, q_err, shift = (np.asarray(a, dtype=np.float64) for a in (q_norm, qb_norm, q_err, shift))
    gamma = _gamma(d + 1)
    bound = q_err * r_norm + qb_norm * r_err + gamma * (qb_norm * rb_norm + np.abs(shift) + q_norm * r_norm)
    # Flushed subnormal inputs/partial sums: < 2^-126 per term, per input element (‖x‖_1 <= sqrt(d) ‖x‖).
    bound += _TINY * (2 * d + 2 + np.sqrt(d) * (qb_norm + rb_norm))
    return bound * (1 + 1e-6)  # this sum's own float64 rounding


def candidate_threshold(kth: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Smallest bfloat16 score that can still belong to the top k, per query.

    A score ``v`` bounds the float32 score within ``v ± (a + u|v|/(1-u))``;
    both ends grow with ``v``, so the k-th largest lower bound is that of
    ``kth`` (the k-th largest ``v``), and a reference is a candidate exactly
    when its upper bound reaches it: ``v >= threshold``.
    """
    rel = BF16_UNIT / (1 - BF16_UNIT)
    w = kth - a - rel * np.abs(kth) - a  # the k-th lower bound, less the upper bound's ``a``
    return np.where(w >= 0, w / (1 + rel), w / (1 - rel))


def _bf16_floor(x: np.ndarray):
    """Largest bfloat16 values <= ``x`` (float64), as a torch bfloat16 tensor."""
    import torch

    x32 = x.astype(np.float32)
    x32 = np.where(x32 > x, np.nextafter(x32, np.float32(-np.inf)), x32)
    bits = x32.view(np.uint32)
    high = bits & np.uint32(0xFFFF0000)  # dropping low bits rounds toward zero
    down = (x32 < 0) & (high != bits)  # toward zero is up for negatives: one bfloat16 step further down
    high = np.where(down, high + np.uint32(0x10000), high)
    return torch.from_numpy((high >> np.uint32(16)).astype(np.uint16).view(np.int16)).view(torch.bfloat16)


class BF16ScreenIndex:
    """Exact maximum-inner-product search over fixed references, screened in bfloat16.

    Parameters
    ----------
    vectors
        (n_references, d) float32, kept by reference (not copied) for the
        float32 re-scoring; a bfloat16 copy (half the size) is made.

    Attributes
    ----------
    candidates_ : int
        References re-scored, summed over every query searched (``k`` per
        query of a chunk searched by faiss instead).

    Notes
    -----
    Offers faiss's ``search(queries, k) -> (scores, indices)``.
    """

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ntotal, self.d = self.vectors.shape
        self._vb, norm, bnorm, err = _bf16_rows(self.vectors)
        self._vb[:, self.d] = 1.0  # times the query's -shift
        self._r = (float(norm.max(initial=0.0)), float(bnorm.max(initial=0.0)), float(err.max(initial=0.0)))
        self._pivots = self._vb[:: max(1, self.ntotal // _PIVOTS), : self.d].contiguous()
        self.candidates_ = 0

    def search(self, queries: np.ndarray, k: int, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each query's ``k`` best references, best first: ``(scores, indices)``, both ``(n_queries, k)``.

        Parameters
        ----------
        queries
            (n_queries, d) float32.
        k
            ``1 <= k <= n_references``.
        chunk
            Queries per bfloat16 product (default: ~8 M scores per chunk);
            the answer does not depend on it (up to float32 ties once a
            chunk falls back to faiss).

        Returns
        -------
        scores : ndarray float32
            Pairwise float32 inner products.
        indices : ndarray int64
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be in [1, {self.ntotal}], got {k}")
        step = chunk or max(1, _CHUNK // max(1, self.ntotal))
        scores = np.empty((len(queries), k), dtype=np.float32)
        out = np.empty((len(queries), k), dtype=np.int64)
        dense = False
        for g in range(0, len(queries), step * _GROUP):
            # torch's OpenMP threads spin for milliseconds after each product, and faiss's threads
            # re-scoring meanwhile run at half speed: a group's products all come first.
            screened = []
            for s in range(g, min(g + step * _GROUP, len(queries)), step):
                q = queries[s : s + step]
                found = None if dense else self._screen(q, k)
                if found is None:  # too many survivors: faiss's float32 search, here and for the rest
                    dense = True
                    found = np.sort(faiss.knn(q, self.vectors, k, metric=faiss.METRIC_INNER_PRODUCT)[1], axis=1), np.full(len(q), k)
                    self.candidates_ += found[0].size
                screened.append((s, *found))
            for s, ids, counts in screened:
                rows = slice(s, s + len(ids))
                scores[rows], out[rows] = self._best(queries[rows], ids, counts, k)
        return scores, out

    def shifted_scores(self, q: np.ndarray):
        """The screen for queries ``q``: ``(v, shift, a)``.

        ``v`` (m, n) bfloat16 estimates ``q·r - shift`` (shift: the best
        score against a few sampled references, float64 (m,)); each pairwise
        float32 score lies within ``a + u |v| / (1 - u)`` of ``v + shift``.
        """
        qb, q_norm, qb_norm, q_err = _bf16_rows(q)
        shift = (qb[:, : self.d] @ self._pivots.T).amax(dim=1)  # bfloat16: exact in the shift column
        qb[:, self.d] = -shift
        v = qb @ self._vb.T  # float32 accumulation, bfloat16 output
        shift = shift.double().numpy()
        return v, shift, screen_error_bound(self.d, q_norm, qb_norm, q_err, *self._r, shift=shift)

    def _screen(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Each query's candidates ``(ids, counts)``: ``ids[i, :counts[i]]`` ascending, the rest 0.

        ``None`` when more than 1/``_DENSE_SHARE`` of all pairs survive.
        """
        import torch

        v, _, a = self.shifted_scores(q)
        kth = torch.topk(v, k, dim=1, sorted=False).values.min(dim=1).values.double().numpy()
        # The shift cancels: the threshold on v follows from v's k-th value and the bound alone.
        rows, cols = torch.nonzero(v >= _bf16_floor(candidate_threshold(kth, a))[:, None], as_tuple=True)
        if len(rows) > len(q) * self.ntotal // _DENSE_SHARE:
            return None
        counts = torch.bincount(rows, minlength=len(q))
        self.candidates_ += len(rows)
        start = torch.cumsum(counts, 0) - counts
        ids = torch.zeros((len(q), int(counts.max())), dtype=torch.int64)
        ids[rows, torch.arange(len(rows)) - start[rows]] = cols
        return ids.numpy(), counts.numpy()

    def _best(self, q: np.ndarray, ids: np.ndarray, counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the ``k`` candidates with the largest pairwise float32 scores, best first, ties to the lower index."""
        scores = pair_scores(q, self.vectors, ids)
        scores[np.arange(ids.shape[1]) >= counts[:, None]] = -np.inf  # padding
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # stable: candidates are in index order
        return np.take_along_axis(scores, best, axis=1), np.take_along_axis(ids, best, axis=1)


def _probe_operands():
    """The probes' float32 operands: (256, 1024) and (4096, 1024) standard normal tensors."""
    import torch

    rng = np.random.default_rng(0)
    return tuple(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for shape in ((256, 1024), (4096, 1024)))


@functools.cache
def bf16_model_holds() -> bool:
    """Whether torch's bfloat16 products here obey the error model of the module docstring (cached).

    False without torch, or when a probe product's output strays from the
    float64 product of its bfloat16 inputs by more than float32 accumulation
    and one rounding to nearest allow.
    """
    try:
        import torch
    except ImportError:
        return False
    a, b = (x.to(torch.bfloat16) for x in _probe_operands())
    return obeys_error_model(a, b, a @ b.T)


def obeys_error_model(a, b, v) -> bool:
    """Whether ``v`` (bfloat16) is ``a @ b.T`` (bfloat16 tensors) up to float32 accumulation and one rounding to nearest."""
    a, b, v = a.double(), b.double(), v.double()
    allowed = BF16_UNIT / (1 - BF16_UNIT) * v.abs() + _gamma(a.shape[1]) * (a.abs() @ b.abs().T)
    return bool(((v - a @ b.T).abs() <= allowed).all())


@functools.cache
def bf16_screen_ok() -> bool:
    """Whether :class:`BF16ScreenIndex` is sound and worthwhile here (cached per process).

    True when :func:`bf16_model_holds` and a bfloat16 product runs in at most
    half the time of the same float32 product — i.e. the CPU has native
    bfloat16 dot products.
    """
    if not bf16_model_holds():
        return False
    import torch

    a, b = _probe_operands()
    ab, bb = a.to(torch.bfloat16), b.to(torch.bfloat16)
    return best_time(lambda: ab @ bb.T, 3)[0] <= 0.5 * best_time(lambda: a @ b.T, 3)[0]
