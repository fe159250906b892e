"""Exact top-k inner-product search screened by a bfloat16 matrix product.

On CPUs with native bfloat16 dot products (AVX-512 BF16, AMX, Arm BF16) a
bfloat16 product runs 2-5x faster than a float32 one, but its scores are only
good to ~2-3 decimals. :class:`BF16ScreenIndex` uses it as a screen and stays
exact: every bfloat16 score comes with a rigorous error bound, a query's
``k``-th best lower bound rules out every reference whose upper bound falls
below it, and the few survivors are scored again pair by pair in float32.
Only one pass reads every bfloat16 score: the references are split into 16
slabs (padded with references that score lowest), and the element-wise
maximum over the slabs — one "stack" of 16 references per column — gives a
lower estimate of the k-th score (the k-th largest of k distinct stacks'
maxima), hence a safe threshold, and the few stacks that hold candidates.

The answer is, for each query, the ``k`` references with the largest
pairwise float32 inner products (faiss's ``fvec_inner_products_by_idx``, the
scores :mod:`virtualst.heads.knn` reports), ties to the lower index —
independent of how queries are batched or ordered. Where the screen would
leave more than 1/16 of the references to re-score, or candidates in half
the stacks (near-identical embeddings, or ``k`` above 1/16 of the
references), that chunk and the rest of the search go to faiss's float32
brute force instead (the same neighbours up to float32 ties).

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
#: bfloat16 scores per query chunk (16 MB, reused): the product stays in cache for the passes over it.
_CHUNK = 1 << 23
#: Chunks screened before their candidates are re-scored (candidate ids: ~16 x 2 MB at 1,000 per query).
_GROUP = 16
#: References sampled to set each query's shift (~0.6 % of the product at 20,000 references).
_PIVOTS = 128
#: Width of the shift column, the padding-flag column and zero padding (keeps rows a multiple of 32 bfloat16 values).
_PAD = 32
#: Slabs the references are split into (padded to a multiple): stack maxima are 1/16 of the scores.
_SLABS = 16
#: Re-scoring more than 1/_DENSE_SHARE of the references costs more than faiss's float32 search.
_DENSE_SHARE = 16
#: Score of a padding reference: the lowest finite bfloat16, below every real score.
_PADDING_SCORE = -3.3895313892515355e38


def pair_scores(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, l2: bool = False) -> np.ndarray:
    """Float32 inner products (squared L2 distances with ``l2``) of each query with the rows of ``vectors`` in its row of ``ids``.

    One product per pair, in C (faiss), so a pair's score does not depend on
    which other pairs are scored with it. ``ids`` (n_queries, m): row
    indices, or negative to skip the pair (its score is left undefined).
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
    (for the shift and padding-flag columns, then padding). The norms are
    taken in float32 and raised by their worst rounding error;
    ``v - bf16(v)`` is exact in float32.
    """
    import torch

    v32 = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    n, d = v32.shape
    rows = torch.empty((n, d + _PAD), dtype=torch.bfloat16)
    rows[:, :d] = v32
    rows[:, d:] = 0
    rounded = rows[:, :d].float()

    def norm(x) -> np.ndarray:
        # relative error < γ_{d+2}; squares below 2^-126 may flush: at most sqrt(d) 2^-63 in all
        return torch.linalg.vector_norm(x, dim=1).double().numpy() * (1 + _gamma(d + 2)) + np.sqrt(d) * 2.0**-63

    rounded_norm = norm(rounded)
    return rows, norm(v32), rounded_norm, norm(torch.sub(v32, rounded, out=rounded))


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
        query searched by faiss instead).

    Notes
    -----
    Offers faiss's ``search(queries, k) -> (scores, indices)``.
    """

    def __init__(self, vectors: np.ndarray) -> None:
        import torch

        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ntotal, self.d = self.vectors.shape
        rows, norm, bnorm, err = _bf16_rows(self.vectors)
        rows[:, self.d] = 1.0  # times the query's -shift
        padding = torch.zeros((-self.ntotal % _SLABS, rows.shape[1]), dtype=torch.bfloat16)
        padding[:, self.d + 1] = _PADDING_SCORE  # times the query's 1
        self._vb = torch.cat([rows, padding])
        self._r = (float(norm.max(initial=0.0)), float(bnorm.max(initial=0.0)), float(err.max(initial=0.0)))
        self._pivots = rows[:: max(1, self.ntotal // _PIVOTS), : self.d].contiguous()
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
        step = chunk or max(1, _CHUNK // len(self._vb))
        scores = np.empty((len(queries), k), dtype=np.float32)
        out = np.empty((len(queries), k), dtype=np.int64)
        for group in self._candidate_groups(queries, k, step):
            for chosen, ids in group:
                scores[chosen], out[chosen] = self._best(queries[chosen], ids, k)
        return scores, out

    def _candidate_groups(self, queries: np.ndarray, k: int, step: int):
        """Lists of ``(query rows, candidate ids)``, ``step`` queries per chunk and up to ``_GROUP`` chunks per list.

        torch's OpenMP threads spin for milliseconds after each product, and
        faiss's threads re-scoring meanwhile run at half speed: a group's
        products all come before its re-scoring. Queries nearest the same
        pivot share candidates, so they are screened (and re-scored)
        together: the references they need are found in cache.
        """
        import torch

        qb, _, nearest, a = self._shifted_queries(queries)
        order = np.argsort(nearest, kind="stable")
        buffer = torch.empty((min(step, len(queries)), len(self._vb)), dtype=torch.bfloat16)  # reused: no page faults per chunk
        group = []
        for s in range(0, len(queries), step):
            chosen = order[s : s + step]
            ids = self._screen(qb[chosen], a[chosen], k, buffer[: len(chosen)])
            if ids is None:  # too many survivors: faiss's float32 search, for this chunk and the rest at once
                chosen = order[s:]
                ids = np.sort(faiss.knn(queries[chosen], self.vectors, k, metric=faiss.METRIC_INNER_PRODUCT)[1], axis=1)
                self.candidates_ += ids.size
                yield [*group, (chosen, ids)]
                return
            group.append((chosen, ids))
            if len(group) == _GROUP:
                yield group
                group = []
        if group:
            yield group

    def shifted_scores(self, q: np.ndarray):
        """The screen for queries ``q``: ``(v, shift, a)``.

        ``v`` (m, n_references) bfloat16 estimates ``q·r - shift`` (shift:
        the best score against a few sampled references, float64 (m,));
        each pairwise float32 score lies within ``a + u |v| / (1 - u)`` of
        ``v + shift``.
        """
        qb, shift, _, a = self._shifted_queries(q)
        return (qb @ self._vb.T)[:, : self.ntotal], shift, a

    def _shifted_queries(self, q: np.ndarray):
        """``(rows, shift, nearest, a)`` for queries ``q``.

        ``rows``: bfloat16 rows whose product with the references' is ``v``
        (``_PADDING_SCORE`` for padding references); ``nearest``: each
        query's best pivot; ``shift`` and ``a`` as in :meth:`shifted_scores`.
        """
        qb, q_norm, qb_norm, q_err = _bf16_rows(q)
        # |scores|, shifts and bounds stay below 2^127, and so above every padding score and threshold.
        if not q_norm.max(initial=0.0) * self._r[0] < 2.0**125:  # also false for inf and nan
            raise ValueError("BF16ScreenIndex needs finite vectors whose norms multiply to < 2^125 (float32 scores)")
        shift, nearest = (qb[:, : self.d] @ self._pivots.T).max(dim=1)  # bfloat16: exact in the shift column
        qb[:, self.d] = -shift
        qb[:, self.d + 1] = 1.0
        shift = shift.double().numpy()
        return qb, shift, nearest.numpy(), screen_error_bound(self.d, q_norm, qb_norm, q_err, *self._r, shift=shift)

    def _screen(self, qb, a: np.ndarray, k: int, v) -> np.ndarray | None:
        """Each query's candidates, a row of ``ids`` each: ascending, then -1s.

        ``v`` receives the product. ``None`` when more than 1/``_DENSE_SHARE``
        of all pairs or half the stacks survive.
        """
        import torch

        m, width = len(v), v.shape[1] // _SLABS
        if k > width:  # no estimate from the stacks, and k alone is more than 1/_DENSE_SHARE of the references: dense
            return None
        torch.matmul(qb, self._vb.T, out=v)  # float32 accumulation, bfloat16 output
        tops = v.view(m, _SLABS, width).amax(dim=1)  # column c: the best of references c, c + width, ...
        # k distinct stacks' maxima are k distinct scores: their k-th largest is at most v's k-th, which keeps the
        # threshold below the exact one (more candidates, none lost).
        kth = np.partition(tops.float().numpy(), -k, axis=1)[:, -k].astype(np.float64)
        # The shift cancels: the threshold on v follows from v's k-th value and the bound alone.
        threshold = _bf16_floor(candidate_threshold(kth, a))
        rows, stacks = torch.nonzero(tops >= threshold[:, None], as_tuple=True)
        if 2 * len(rows) > m * width:  # most stacks hold candidates: dense, whatever their count (spares gathering them)
            return None
        cols = stacks[:, None] + torch.arange(0, v.shape[1], width)
        flat = rows[:, None] * v.shape[1] + cols
        flat = torch.sort(flat[torch.take(v, flat) >= threshold[rows, None]]).values  # by query, then reference
        if len(flat) > m * self.ntotal // _DENSE_SHARE:
            return None
        rows, cols = flat // v.shape[1], flat % v.shape[1]
        counts = torch.bincount(rows, minlength=m)
        self.candidates_ += len(rows)
        start = torch.cumsum(counts, 0) - counts
        ids = torch.full((m, int(counts.max())), -1, dtype=torch.int64)  # faiss skips negative ids
        ids[rows, torch.arange(len(rows)) - start[rows]] = cols
        return ids.numpy()

    def _best(self, q: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the ``k`` candidates with the largest pairwise float32 scores, best first, ties to the lower index."""
        scores = pair_scores(q, self.vectors, ids)
        scores[ids < 0] = -np.inf  # padding
        best = _top_k_columns(scores, k)  # candidates are in index order: ties to the lower column are ties to the lower index
        return np.take_along_axis(scores, best, axis=1), np.take_along_axis(ids, best, axis=1)


def _top_k_columns(scores: np.ndarray, k: int) -> np.ndarray:
    """Columns of each row's ``k`` largest scores (float32), largest first, ties to the lower column.

    Sorts one 64-bit key per score — the score's bits mapped to an unsigned
    integer in descending order, then the column — so that a fast unstable
    partial sort gives the stable order.
    """
    bits = (scores + np.float32(0)).view(np.uint32)  # + 0: -0.0 ties +0.0
    ascending = np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))  # negatives reversed, above them the positives
    keys = (~ascending).astype(np.uint64) << np.uint64(32) | np.arange(scores.shape[1], dtype=np.uint64)
    best = np.partition(keys, k - 1, axis=1)[:, :k]
    best.sort(axis=1)
    return (best & np.uint64(0xFFFFFFFF)).astype(np.int64)


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
