"""Neighbour-search speed: KNNHead's exact search against scikit-learn brute force.

Run ``python -m virtualst.bench.knn_speed [--references 20000 --queries 5000
--dims 1024 --k 50 --data mixture]``. On deterministic synthetic embeddings
(float32; ``--data``: ``mixture``, a Gaussian mixture around 64 centres;
``crowded``, the ridge benchmark's features, whose cosines crowd around 0.9;
``near-duplicates``, one centre plus 2 % noise, cosines ~0.9996) and for each
metric it measures, best of ``--repeats``:

* **KNNHead**: ``KNNHead.kneighbors`` with its exact index and no feature
  transform — input validation, L2 normalisation (cosine), the search (faiss
  flat, or for cosine the bfloat16-screened exact search where the CPU has
  fast bfloat16 products; ``--no-screen``: always faiss) and the re-scoring of
  the ``k`` neighbours included;
* **sklearn**: ``NearestNeighbors(algorithm="brute", metric=...).kneighbors``
  on the same vectors (``cosine`` / ``euclidean``);
* **GEMM floor**: one float32 ``queries @ references.T`` with numpy's BLAS,
  the arithmetic both must do at least once;

prints the times and the sklearn/KNNHead ratio (target >= 3), the machine and
the thread counts (``--threads`` caps both sides alike), and checks that
both return the same neighbour sets. Where they differ it tells whether the
swapped neighbours are ties at float32 precision (their exact float64
distances within ``--tie-rtol`` of each other) and which side matches the
exact float64 top k.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import faiss
import numpy as np
from sklearn.neighbors import NearestNeighbors

from virtualst.bench.timing import best_time, cpu_model, load_average
from virtualst.heads import knn
from virtualst.heads.knn import KNNHead
from virtualst.heads.screened_search import BF16ScreenIndex

SKLEARN_METRIC = {"cosine": "cosine", "l2": "euclidean"}


def synthetic(n_references: int, n_queries: int, dims: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """References and queries drawn around 64 shared centres (embedding-like clusters), float32."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dims)).astype(np.float32)

    def draw(n: int) -> np.ndarray:
        return centres[rng.integers(0, 64, n)] + rng.normal(scale=0.8, size=(n, dims)).astype(np.float32)

    return draw(n_references), draw(n_queries)


def crowded(n_references: int, n_queries: int, dims: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ridge benchmark's features (a shared offset: cosines crowd around 0.9), float32."""
    from virtualst.bench.ridge_speed import synthetic as ridge_features

    X, _, X_test = ridge_features(n_references, dims, 1, n_test=n_queries, seed=seed)
    return X.astype(np.float32), X_test.astype(np.float32)


def near_duplicates(n_references: int, n_queries: int, dims: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One centre plus 2 % noise (cosines ~0.9996, like blank background tiles), float32."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=dims)

    def draw(n: int) -> np.ndarray:
        return (centre + rng.normal(scale=0.02, size=(n, dims))).astype(np.float32)

    return draw(n_references), draw(n_queries)


#: ``--data`` choices.
DATASETS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "mixture": synthetic,
    "crowded": crowded,
    "near-duplicates": near_duplicates,
}


def exact_distances(R: np.ndarray, Q: np.ndarray, idx: np.ndarray, metric: str) -> np.ndarray:
    """Float64 distances of each query to the references in ``idx`` (same shape as ``idx``)."""
    r = R[idx].astype(np.float64)
    q = Q.astype(np.float64)[:, None, :]
    if metric == "cosine":
        r /= np.linalg.norm(r, axis=2, keepdims=True)
        q = q / np.linalg.norm(q, axis=2, keepdims=True)
        return 1.0 - np.einsum("qkd,qkd->qk", r, np.broadcast_to(q, r.shape))
    return np.sqrt(((r - q) ** 2).sum(axis=2))


def compare(R: np.ndarray, Q: np.ndarray, ours: np.ndarray, theirs: np.ndarray, metric: str, tie_rtol: float) -> dict[str, float]:
    """Agreement of two (n_queries, k) neighbour tables, and why they differ.

    A differing query is a *tie* when every neighbour only one side returned
    lies within ``tie_rtol`` (relative) of the k-th exact distance; the side
    *matching exact* returns the float64 top-k set.
    """
    k = ours.shape[1]
    same = np.array([set(a) == set(b) for a, b in zip(ours, theirs)])
    stats = {"identical": float(same.mean()), "same_order": float((ours == theirs).all(axis=1).mean()), "differ": int((~same).sum())}
    ties = ours_exact = theirs_exact = 0
    for q in np.flatnonzero(~same):
        union = np.union1d(ours[q], theirs[q])
        d = exact_distances(R, Q[q : q + 1], union[None, :], metric)[0]
        truth = set(union[np.argsort(d, kind="stable")[:k]])
        kth = np.sort(d)[k - 1]
        swapped = np.setxor1d(ours[q], theirs[q])
        ties += bool(np.all(np.abs(d[np.searchsorted(union, swapped)] - kth) <= tie_rtol * abs(kth)))
        ours_exact += set(ours[q]) == truth
        theirs_exact += set(theirs[q]) == truth
    stats.update(ties=ties, ours_exact=ours_exact, theirs_exact=theirs_exact)
    return stats


def machine() -> str:
    """CPU model, cores and the thread counts faiss and the BLAS libraries use."""
    blas = ""
    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(f"{i['internal_api']} {i.get('version')} x{i['num_threads']}" for i in threadpool_info() if i["user_api"] == "blas")
    except ImportError:
        pass
    threads = f"faiss {faiss.__version__} OpenMP x{faiss.omp_get_max_threads()}; BLAS: {blas}"
    return f"{cpu_model()}; {os.cpu_count()} CPUs, {load_average()}; {threads}"


def measure(
    references: int = 20000,
    queries: int = 5000,
    dims: int = 1024,
    k: int = 50,
    metrics: tuple[str, ...] = ("cosine", "l2"),
    repeats: int = 3,
    seed: int = 0,
    tie_rtol: float = 1e-5,
    echo: Callable[[str], object] | None = print,
    data: str = "mixture",
) -> list[dict[str, float]]:
    """Time and compare KNNHead and sklearn for every metric; one dict per metric.

    Each dict holds ``metric``, ``knnhead_s``, ``sklearn_s``, ``gemm_s`` (best
    of ``repeats``) and the agreement statistics of :func:`compare`. ``echo``
    prints one block per metric (``None``: silent).
    """
    say = echo or (lambda _: None)
    R, Q = DATASETS[data](references, queries, dims, seed)
    say(f"{data}: references {len(R)} x {dims}, queries {len(Q)}, k {k}, best of {repeats}")
    say(f"machine: {machine()}")
    gemm, _ = best_time(lambda: Q @ R.T, repeats)
    say(f"GEMM floor (float32 Q @ R.T, numpy): {gemm:.3f} s")
    rows = []
    for metric in metrics:
        head = KNNHead(k_grid=(k,), temperature_grid=(1.0,), metric=metric, standardize=False, n_components=None)
        head.fit(R, np.zeros(len(R)))  # a single (k, temperature): no inner CV
        nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=SKLEARN_METRIC[metric]).fit(R)
        index = head._search_index()
        t_head, (_, ours) = best_time(lambda: head.kneighbors(Q, k), repeats)
        t_sk, (_, theirs) = best_time(lambda: nn.kneighbors(Q), repeats)
        stats = compare(R, Q, ours, theirs, metric, tie_rtol)
        stats["search"] = type(index).__name__
        screened = ""
        if isinstance(index, BF16ScreenIndex):
            stats["candidates_per_query"] = index.candidates_ / (repeats * len(Q))
            screened = f", {stats['candidates_per_query']:.0f} candidates re-scored per query"
        say(
            f"{metric:>6}: KNNHead {t_head:.3f} s  sklearn {t_sk:.3f} s  ratio {t_sk / t_head:.2f}x  "
            f"(KNNHead/GEMM {t_head / gemm:.2f}, sklearn/GEMM {t_sk / gemm:.2f}; search: {stats['search']}{screened})"
        )
        say(
            f"        identical neighbour sets {stats['identical']:.4%} (same order {stats['same_order']:.4%}); "
            f"{stats['differ']} queries differ: {stats['ties']} float32 ties (rtol {tie_rtol:g}), "
            f"exact float64 top-k matched by KNNHead {stats['ours_exact']}, sklearn {stats['theirs_exact']}"
        )
        rows.append({"metric": metric, "knnhead_s": t_head, "sklearn_s": t_sk, "gemm_s": gemm, **stats})
    return rows


def run(args: argparse.Namespace) -> list[dict[str, float]]:
    """:func:`measure` with the command line's arguments."""
    floor = knn.SCREEN_MIN_REFERENCES
    if args.no_screen:
        knn.SCREEN_MIN_REFERENCES = sys.maxsize
    try:
        return measure(
            args.references, args.queries, args.dims, args.k, tuple(args.metrics), args.repeats, args.seed, args.tie_rtol, data=args.data
        )
    finally:
        knn.SCREEN_MIN_REFERENCES = floor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m virtualst.bench.knn_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--references", type=int, default=20000)
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--dims", type=int, default=1024)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--metrics", nargs="+", choices=sorted(SKLEARN_METRIC), default=["cosine", "l2"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="cap faiss, BLAS and OpenMP threads of both sides (default: library defaults)")
    parser.add_argument("--data", choices=sorted(DATASETS), default="mixture", help="synthetic embeddings (see above)")
    parser.add_argument("--no-screen", action="store_true", help="cosine through faiss's float32 search, not the bfloat16 screen")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tie-rtol", type=float, default=1e-5, help="relative distance gap counted as a float32 tie")
    args = parser.parse_args(argv)
    if args.threads is None:
        run(args)
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=args.threads):
        run(args)


if __name__ == "__main__":
    main()
