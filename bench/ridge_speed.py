"""Ridge with per-gene leave-one-out alphas: :func:`virtualst.heads.ridge.ridge_loo` against scikit-learn.

Run ``python -m virtualst.bench.ridge_speed [--spots 20000 --dims 1024 --genes 2000 --repeats 1]``.

On deterministic synthetic data shaped like spot embeddings and expression
(features with a power-law spectrum and non-zero means; each gene a mix of
a low-rank signal in the features and noise, with signal-to-noise ratios
spread over four decades so that the chosen alphas spread over the grid),
it times, on the same ``X``, ``Y`` and alpha grid, with ``fit_intercept=True``:

* **ridge_loo**: the core of :class:`~virtualst.heads.ridge.RidgeHead`
  (no standardisation or PCA, so both solve the same problem);
* **sklearn**: ``RidgeCV(alphas, alpha_per_target=True)`` (its efficient
  leave-one-out, by default the ``X'X`` eigendecomposition when spots
  outnumber features).

It prints both times (best of ``--repeats``), their ratio (target >= 5),
the fraction of genes given the same alpha (target 1), the largest
prediction difference on held-out spots (target <= 1e-5), the achieved
GFLOP/s of the core against a float32 and a float64 numpy matmul, and the
machine: CPU, cores, BLAS libraries and threads, load average.
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np

from virtualst.bench.timing import best_time, cpu_model, load_average
from virtualst.heads.ridge import DEFAULT_ALPHAS, RidgeLOO, onednn_available, ridge_loo


def synthetic(n_spots: int, n_dims: int, n_genes: int, n_test: int = 1000, seed: int = 0):
    """Deterministic embedding-like features and expression-like targets.

    Returns ``(X, Y, X_test)``: ``n_spots`` training rows and ``n_test`` held-out rows.
    """
    rng = np.random.default_rng(seed)
    n = n_spots + n_test
    spectrum = np.arange(1, n_dims + 1, dtype=np.float64) ** -1.5
    spectrum *= n_dims / spectrum.sum()  # total variance ~ n_dims, as after standardisation
    rotation, _ = np.linalg.qr(rng.standard_normal((n_dims, n_dims)))
    X = (rng.standard_normal((n, n_dims)) * np.sqrt(spectrum)) @ rotation + rng.normal(0.0, 2.0, n_dims)
    # Signal: 32 latent programs read from the features, each gene a random mix of them.
    programs = (X - X.mean(axis=0)) @ rng.standard_normal((n_dims, 32))
    signal = programs @ rng.standard_normal((32, n_genes))
    signal /= signal.std(axis=0)
    snr = np.logspace(-3.0, 1.0, n_genes)
    rng.shuffle(snr)
    Y = signal * np.sqrt(snr) + rng.standard_normal((n, n_genes)) + rng.uniform(0.0, 5.0, n_genes)
    return X[:n_spots], Y[:n_spots], X[n_spots:]


def matmul_gflops(n: int, dtype, repeats: int = 3) -> float:
    """GFLOP/s of a square numpy matmul of size ``n``."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
    best, _ = best_time(lambda: a @ b, repeats)
    return 2.0 * n**3 / best / 1e9


def machine_info() -> list[str]:
    """Lines describing the CPU, thread pools and load."""
    import sklearn
    from threadpoolctl import threadpool_info

    lines = [
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        f"python {platform.python_version()}, numpy {np.__version__}, scikit-learn {sklearn.__version__}",
    ]
    for pool in threadpool_info():
        lines.append(
            f"thread pool: {pool['internal_api']} {pool.get('version')} ({pool.get('architecture', '-')}), {pool['num_threads']} threads"
        )
    try:
        import torch

        lines.append(f"torch {torch.__version__}: {torch.get_num_threads()} threads, oneDNN {torch.backends.mkldnn.is_available()}")
    except ImportError:
        lines.append("torch: not installed")
    return lines


def time_ridge_loo(
    X: np.ndarray, Y: np.ndarray, alphas=DEFAULT_ALPHAS, backend: str = "auto", repeats: int = 1, prune: bool = True
) -> tuple[float, RidgeLOO]:
    """Best-of-``repeats`` seconds of :func:`ridge_loo` (with intercept) and its result."""
    return best_time(lambda: ridge_loo(X, Y, alphas, fit_intercept=True, backend=backend, prune=prune), repeats)


def time_sklearn(X: np.ndarray, Y: np.ndarray, alphas=DEFAULT_ALPHAS, gcv_mode: str | None = None, repeats: int = 1):
    """Best-of-``repeats`` seconds of ``RidgeCV(alphas, alpha_per_target=True).fit`` and the fitted model."""
    from sklearn.linear_model import RidgeCV

    return best_time(lambda: RidgeCV(alphas=alphas, alpha_per_target=True, gcv_mode=gcv_mode).fit(X, Y), repeats)


def agreement(model, alpha: np.ndarray, predicted: np.ndarray, X_test: np.ndarray) -> tuple[float, float]:
    """``(fraction of genes given sklearn's alpha, max |prediction difference| on X_test)``."""
    same = float(np.mean(np.isclose(model.alpha_, alpha, rtol=1e-12)))
    return same, float(np.abs(model.predict(X_test) - predicted).max())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=20000)
    parser.add_argument("--dims", type=int, default=1024)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--backend", default="auto", choices=["auto", "onednn", "numpy"], help="float32 matmuls of ridge_loo")
    parser.add_argument("--gcv-mode", default=None, choices=["svd", "eigen"], help="sklearn's gcv_mode (default: its own choice)")
    parser.add_argument("--skip-sklearn", action="store_true", help="time ridge_loo alone")
    parser.add_argument("--no-prune", action="store_true", help="score every alpha (no bounds ruling alphas out)")
    args = parser.parse_args(argv)

    alphas = DEFAULT_ALPHAS
    X, Y, X_test = synthetic(args.spots, args.dims, args.genes)
    if args.backend != "numpy":
        onednn_available()  # import torch now, as sklearn was imported above: a one-off start-up cost
    print(f"data: {args.spots} spots x {args.dims} dims -> {args.genes} genes; {len(alphas)} alphas {alphas[0]:g}..{alphas[-1]:g}")
    print(load_average())

    ours_s, result = time_ridge_loo(X, Y, alphas, args.backend, args.repeats, prune=not args.no_prune)
    gflop = result.flops["total"] / 1e9
    print(
        f"ridge_loo: {ours_s:.2f} s ({result.backend} float32 loop; {gflop:.0f} GFLOP, {gflop / ours_s:.1f} GFLOP/s; "
        f"rank {result.rank}; {result.scored.mean():.1%} of alpha-gene pairs scored; {result.n_refined} genes re-scored in float64)"
    )
    report = {"ours_s": ours_s, "gflops": gflop / ours_s, "backend": result.backend}
    size = 2048
    print(f"numpy matmul {size}^3: float32 {matmul_gflops(size, np.float32):.1f} GFLOP/s, float64 {matmul_gflops(size, np.float64):.1f} GFLOP/s")
    chosen = np.bincount(result.alpha_index, minlength=len(alphas))
    print("genes per alpha: " + " ".join(str(c) for c in chosen))

    if not args.skip_sklearn:
        sk_s, model = time_sklearn(X, Y, alphas, args.gcv_mode, args.repeats)
        same, diff = agreement(model, result.alpha, X_test @ result.coef.T + result.intercept, X_test)
        print(f"sklearn RidgeCV(alpha_per_target=True, gcv_mode={args.gcv_mode}): {sk_s:.2f} s")
        print(f"speed ratio sklearn / ridge_loo: {sk_s / ours_s:.2f} (target >= 5)")
        print(f"same alpha: {same:.4f} of genes (target 1)")
        print(f"max |prediction difference| on {len(X_test)} held-out spots: {diff:.2e} (target <= 1e-5)")
        report.update(sklearn_s=sk_s, ratio=sk_s / ours_s, same_alpha=same, max_diff=diff)
    print(load_average())
    for line in machine_info():
        print(line)
    return report


if __name__ == "__main__":
    main()
