"""``virtualst perf``: side-by-side speed and memory comparisons, one table.

Every row runs in this process on this machine, against a reference measured
here too, so the ratios travel between machines better than the raw figures:

1. embedding pipeline tiles/s over the encoder's forward-only tiles/s
   (target >= 0.9 on CPU, >= 0.8 on GPU) — :mod:`virtualst.bench.embed_throughput`;
2. :class:`~virtualst.heads.ridge.RidgeHead` fit against scikit-learn's
   ``RidgeCV(alpha_per_target=True)`` on the same data and alpha grid
   (>= 5x) — :mod:`virtualst.bench.ridge_speed`;
3. RidgeHead's achieved GFLOP/s (:func:`ridge_fit_flops` over the fit time of
   row 2) over a float32 numpy matmul's on this machine (>= 0.5);
4. KNNHead's neighbour search against scikit-learn's brute-force
   ``NearestNeighbors`` (>= 3x, every metric) — :mod:`virtualst.bench.knn_speed`;
5. peak RSS of embedding a generated Visium-grid slide of 50,000 spots, in a
   fresh process (< 2 GB) — :mod:`virtualst.bench.predict_memory`;
6. time to fit every head virtualst ships for 2,000 genes on 20,000 spots of
   synthetic embeddings (a figure, no target).

Rows are a registry (:data:`ROWS`); :class:`PerfConfig` holds every size, so
tests run a tiny version and ``--quick`` a one-minute smoke run. Speed is only
measured here, never asserted in unit tests.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from virtualst.bench.embed_throughput import DEFAULT_SAMPLES, SHARED_DATA
from virtualst.bench.timing import best_time, cpu_model, load_average
from virtualst.files import write_text_atomically

#: Genes of LightGBM fitted in row 6 at full size; the time for every gene is extrapolated linearly from them.
LGBM_MEASURED_GENES = 100


@dataclass(frozen=True)
class PerfConfig:
    """Sizes and options of every row; the defaults are the issue's sizes.

    Parameters
    ----------
    rows
        Row keys to run (``"1"``..``"6"`` or their names, see :data:`ROWS`).
    device
        ``auto``, ``cpu``, ``cuda``...: the encoder's device (rows 1 and 5).
    embed_samples, encoder, embed_batch_size, embed_repeats
        Row 1: sample folders, encoder, batch size (``None``: the default
        for the device) and how many times the two rates alternate.
    ridge_spots, ridge_dims, ridge_genes, ridge_repeats
        Rows 2-3: the synthetic ridge problem and best-of repeats.
    matmul_size
        Row 3: side of the square float32 numpy matmul taken as reference.
    knn_references, knn_queries, knn_dims, knn_k, knn_metrics, knn_repeats
        Row 4.
    memory_spots, memory_tile_px, memory_work
        Row 5: spots wanted on the generated slide, encoder tile side, and a
        folder to keep (and reuse) the slide in (``None``: temporary).
    heads_spots, heads_genes, heads_dims, heads_sections
        Row 6: the synthetic problem (spots split into equal sections, given
        to the heads as groups).
    heads
        Head kinds of row 6 (default: the four that virtualst ships; not the
        registry, which may hold user-registered heads).
    heads_measured_genes
        ``(kind, genes)`` pairs: fit only that many genes of ``kind`` and
        extrapolate linearly to ``heads_genes`` (labelled in the table).
    seed
        Seed of the synthetic data.
    """

    rows: tuple[str, ...] = ("1", "2", "3", "4", "5", "6")
    device: str = "auto"
    embed_samples: tuple[Path, ...] = tuple(DEFAULT_SAMPLES)
    encoder: str = "efficientnet_lite0"
    embed_batch_size: int | None = None
    embed_repeats: int = 5
    ridge_spots: int = 20_000
    ridge_dims: int = 1024
    ridge_genes: int = 2000
    ridge_repeats: int = 1
    matmul_size: int = 2048
    knn_references: int = 20_000
    knn_queries: int = 5000
    knn_dims: int = 1024
    knn_k: int = 50
    knn_metrics: tuple[str, ...] = ("cosine", "l2")
    knn_repeats: int = 3
    memory_spots: int = 50_000
    memory_tile_px: int = 224
    memory_work: Path | None = None
    heads_spots: int = 20_000
    heads_genes: int = 2000
    heads_dims: int = 1024
    heads_sections: int = 4
    heads: tuple[str, ...] = ("ridge", "knn", "lgbm", "ensemble")
    heads_measured_genes: tuple[tuple[str, int], ...] = (("lgbm", LGBM_MEASURED_GENES),)
    seed: int = 0

    @classmethod
    def quick(cls, **changes: Any) -> PerfConfig:
        """Small sizes for a smoke run of every row in about a minute (ratios are then only indicative)."""
        small = {
            "embed_samples": (SHARED_DATA / "visium_tiny",),
            "embed_repeats": 1,
            "ridge_spots": 3000,
            "ridge_dims": 256,
            "ridge_genes": 200,
            "matmul_size": 1024,
            "knn_references": 4000,
            "knn_queries": 1000,
            "knn_dims": 256,
            "knn_repeats": 1,
            "memory_spots": 200,
            "memory_tile_px": 64,
            "heads_spots": 1000,
            "heads_genes": 20,
            "heads_dims": 64,
            "heads_measured_genes": (),
        }
        return cls(**{**small, **changes})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (paths as strings)."""
        return json.loads(json.dumps(asdict(self), default=str))


@dataclass
class PerfResult:
    """One measured row.

    Attributes
    ----------
    key, name
        The row's registry key and description.
    value
        The ratio or figure (``nan`` when the row failed).
    unit
        ``"x"`` (speed-up), ``""`` (plain ratio), ``"GB"`` or ``"s"``.
    target
        The target as text (``"-"`` for a figure without target).
    passed
        Whether the target is met; ``None`` without a target.
    detail
        Sizes actually used, the raw figures behind the ratio, assumptions.
    seconds
        Wall time the row took.
    error
        ``"Type: message"`` when the measurement raised, else ``None``.
    """

    key: str
    name: str
    value: float
    unit: str
    target: str
    passed: bool | None
    detail: str
    seconds: float = 0.0
    error: str | None = None

    def value_text(self) -> str:
        """The value with its unit, as the table shows it."""
        if not math.isfinite(self.value):
            return "failed"
        if self.unit == "s":
            return f"{self.value:,.0f} s" if self.value >= 100 else f"{self.value:.1f} s"
        return f"{self.value:.2f}{' ' if self.unit == 'GB' else ''}{self.unit}"


Measure = Callable[[PerfConfig, "Shared"], PerfResult]


@dataclass(frozen=True)
class PerfRow:
    """A registered row: its key, name, target text and the function measuring it."""

    key: str
    slug: str
    name: str
    target: str
    measure: Measure


class Shared:
    """Measurements several rows use (rows 2 and 3 share one RidgeHead fit), computed once per run."""

    def __init__(self, config: PerfConfig) -> None:
        self.config = config
        self._memo: dict[str, Any] = {}

    def get(self, name: str, compute: Callable[[PerfConfig], Any]) -> Any:
        """``compute(config)``, cached under ``name``."""
        if name not in self._memo:
            self._memo[name] = compute(self.config)
        return self._memo[name]


# ---------------------------------------------------------------------------- FLOP count (row 3)
def ridge_fit_flops(n: int, p: int, t: int, n_alphas: int, fit_intercept: bool = True, scored: int | None = None) -> dict[str, float]:
    """Floating-point operations of :func:`~virtualst.heads.ridge.ridge_loo` for ``n`` spots, ``p`` features, ``t`` genes.

    Derived from the algorithm in :mod:`virtualst.heads.ridge`, counting a
    multiply-add as 2 FLOPs. With ``r`` the rank kept (``min(p, n - 1)`` with
    an intercept, as centring removes one direction; ``min(n, p)`` without),
    ``m = min(n, p)`` and ``A = n_alphas``:

    ============  ==========================  ================================================
    stage         FLOPs                       what
    ============  ==========================  ================================================
    gram          ``n p (p + 1)`` (n > p)     ``Xc' Xc`` by syrk: ``p (p + 1) / 2`` dot
                  ``p n (n + 1)`` (n <= p)    products of length ``n`` (``Xc Xc'`` when n <= p)
    eigh          ``14 m**3 / 3``             LAPACK ``dsyevd`` (scipy ``driver="evd"``), the
                                              standard estimates of its stages: tridiagonal
                                              reduction ``4/3 m**3``, divide-and-conquer
                                              eigenvectors ``4/3 m**3`` (worst case; deflation
                                              makes it less), back-transformation ``2 m**3`` —
                                              an estimate, not a count
    xty           ``2 n p t`` (n > p)         ``Xc' Y``
    u             ``2 n p r`` (n > p)         ``U = Xc V / s``
    q             ``2 p r t`` (n > p)         ``Q = V' Xc' Y / s``
                  ``2 n r t`` (n <= p)        ``Q = U' Yc``
    v             ``2 n p r`` (n <= p)        ``V = Xc' U / s``
    leverage      ``n r (1 + 2 A)``           ``(U * U) @ f`` for every alpha
    bounds        ``(6 + 2 e) A r t``         bounds on every alpha's score (``scored``
                  (pruned)                    given): closed-form residual sums of squares
                                              and the residuals of the ``e = min(64, n)``
                                              highest-leverage spots
    loo_f32       ``S (2 n r + 4 n + r)``     per alpha-gene pair scored (``S = scored``, or
                                              ``A t`` without pruning): ``f * Q`` (``r``),
                                              the residual product ``U diag(f) Q`` (``2 n r``),
                                              then subtract, scale by ``1/(1-h)``, square,
                                              sum (``4 n``), in float32
    coef          ``2 p r t``                 ``V diag(s / (lam + alpha)) Q``
    ============  ==========================  ================================================

    Not counted (each under ~0.5 % of the total at the issue's sizes):
    means and centring (``O(n (p + t))``), dtype casts, the float32 error
    bound (``2 A r t``) and the float64 re-scoring of near-tied alphas
    (``2 n r`` per re-scored alpha-gene pair; the number of pairs is data
    dependent), so the total is a slight undercount. RidgeHead's feature
    transform (standardisation, PCA) is not counted either: row 3 fits
    without it.

    Returns
    -------
    dict
        FLOPs per stage and ``"total"``.
    """
    from virtualst.heads.ridge import _EXACT_ROWS

    r = min(p, n - 1) if fit_intercept else min(n, p)
    m = min(n, p)
    a = n_alphas
    if n > p:
        flops = {"gram": n * p * (p + 1), "eigh": 14 * m**3 / 3, "xty": 2 * n * p * t, "u": 2 * n * p * r, "q": 2 * p * r * t}
    else:
        flops = {"gram": p * n * (n + 1), "eigh": 14 * m**3 / 3, "q": 2 * n * r * t, "v": 2 * n * p * r}
    flops["leverage"] = n * r * (1 + 2 * a)
    if scored is not None:
        flops["bounds"] = (6 + 2 * min(_EXACT_ROWS, n)) * a * r * t
    flops["loo_f32"] = (a * t if scored is None else scored) * (2 * n * r + 4 * n + r)
    flops["coef"] = 2 * p * r * t
    out = {k: float(v) for k, v in flops.items()}
    out["total"] = float(sum(out.values()))
    return out


# ---------------------------------------------------------------------------- rows 2 and 3
def _ridge_fit(config: PerfConfig) -> dict[str, Any]:
    """RidgeHead without feature transform (the problem RidgeCV solves), fitted and timed on synthetic data."""
    from virtualst.bench.ridge_speed import synthetic
    from virtualst.heads.ridge import RidgeHead, onednn_available

    X, Y, X_test = synthetic(config.ridge_spots, config.ridge_dims, config.ridge_genes, n_test=200, seed=config.seed)
    onednn_available()  # imports torch now: a one-off start-up cost, not the fit's
    seconds, head = best_time(lambda: RidgeHead(standardize=False, n_components=None).fit(X, Y), config.ridge_repeats)
    scored = round(head.cv_scored_ * len(head.alphas) * Y.shape[1])  # alpha-gene pairs the bounds left to score
    return {"X": X, "Y": Y, "X_test": X_test, "seconds": seconds, "head": head, "onednn": onednn_available(), "scored": scored}


def _ridge_shape(config: PerfConfig) -> str:
    from virtualst.heads.ridge import DEFAULT_ALPHAS

    return f"{config.ridge_spots:,} spots x {config.ridge_dims:,} dims x {config.ridge_genes:,} genes, {len(DEFAULT_ALPHAS)} alphas"


def measure_ridge_vs_sklearn(config: PerfConfig, shared: Shared) -> PerfResult:
    """Row 2: sklearn ``RidgeCV(alpha_per_target=True)`` fit time over RidgeHead's, same data and grid."""
    from virtualst.bench.ridge_speed import agreement, time_sklearn
    from virtualst.heads.ridge import DEFAULT_ALPHAS

    fit = shared.get("ridge_fit", _ridge_fit)
    sk_s, model = time_sklearn(fit["X"], fit["Y"], DEFAULT_ALPHAS, repeats=config.ridge_repeats)
    same, diff = agreement(model, fit["head"].alpha_, fit["head"].predict(fit["X_test"]), fit["X_test"])
    ratio = sk_s / fit["seconds"]
    detail = (
        f"{_ridge_shape(config)}: RidgeHead(standardize=False, n_components=None) {fit['seconds']:.2f} s, "
        f"RidgeCV {sk_s:.2f} s; same alpha {same:.2%} of genes, max prediction diff {diff:.1e}"
    )
    return _result("2", ratio, ratio >= 5.0, detail)


def measure_ridge_gflops(config: PerfConfig, shared: Shared) -> PerfResult:
    """Row 3: RidgeHead's achieved GFLOP/s (counted FLOPs / fit time) over numpy float32 matmul GFLOP/s."""
    from virtualst.bench.ridge_speed import matmul_gflops
    from virtualst.heads.ridge import DEFAULT_ALPHAS

    fit = shared.get("ridge_fit", _ridge_fit)
    n_alphas = len(DEFAULT_ALPHAS)
    flops = ridge_fit_flops(config.ridge_spots, config.ridge_dims, config.ridge_genes, n_alphas, scored=fit["scored"])
    achieved = flops["total"] / fit["seconds"] / 1e9
    reference = matmul_gflops(config.matmul_size, np.float32)
    share = flops["loo_f32"] / flops["total"]
    pairs = fit["scored"] / (n_alphas * config.ridge_genes)
    detail = (
        f"{_ridge_shape(config)}: {flops['total'] / 1e9:,.4g} GFLOP counted ({share:.0%} in the float32 LOO products "
        f"of the {pairs:.0%} of alpha-gene pairs left by the bounds; "
        f"eigh by the 14/3 m^3 dsyevd estimate; re-scoring and O(n(p+t)) terms not counted) in {fit['seconds']:.2f} s = "
        f"{achieved:.1f} GFLOP/s (oneDNN {'on' if fit['onednn'] else 'off'}); numpy float32 matmul "
        f"{config.matmul_size}^3 {reference:.1f} GFLOP/s"
    )
    return _result("3", achieved / reference, achieved / reference >= 0.5, detail)


# ---------------------------------------------------------------------------- the other rows
def measure_embedding(config: PerfConfig, shared: Shared) -> PerfResult:
    """Row 1: pipeline tiles/s over forward-only tiles/s on the configured samples (median of alternated runs)."""
    from virtualst.bench.embed_throughput import measure

    r = measure(config.embed_samples, config.encoder, config.embed_batch_size, None, config.device, config.embed_repeats)
    gpu = r["device"].startswith("cuda")
    target = 0.8 if gpu else 0.9
    names = ", ".join(Path(p).name for p in config.embed_samples)
    engine = f"{r['replicas']} process(es) x {r['threads']} thread(s)"
    replicated = f", forward-only in {r['replicas']} replicas {_runs(r['forward_replicas'])}" if r["forward_replicas"] else ""
    detail = (
        f"{r['n_tiles']:,} tiles of {r['n_samples']} section(s) ({names}), {r['encoder']} batch {r['batch_size']} on {r['device']}, "
        f"{engine}: pipeline {r['pipeline_median']:.1f} vs the faster forward-only {r['forward_median']:.1f} tiles/s "
        f"(medians of alternated runs: pipeline {_runs(r['pipeline'])}, forward-only in one process {_runs(r['forward_single'])}{replicated})"
    )
    return _result("1", r["ratio"], r["ratio"] >= target, detail, target=f">= {target} ({'GPU' if gpu else 'CPU'})")


def _runs(rates: list[float]) -> str:
    return "/".join(f"{x:.0f}" for x in rates)


def measure_knn(config: PerfConfig, shared: Shared) -> PerfResult:
    """Row 4: sklearn brute-force search time over KNNHead's; the value is the worst metric's."""
    from virtualst.bench.knn_speed import measure

    rows = measure(
        config.knn_references, config.knn_queries, config.knn_dims, config.knn_k, config.knn_metrics, config.knn_repeats, config.seed, echo=None
    )
    ratios = {r["metric"]: r["sklearn_s"] / r["knnhead_s"] for r in rows}
    worst = min(ratios, key=ratios.get)
    per_metric = "; ".join(
        f"{r['metric']} {ratios[r['metric']]:.2f}x ({r['knnhead_s']:.2f} vs {r['sklearn_s']:.2f} s, {r['search']}, "
        f"same sets {r['identical']:.2%})"
        for r in rows
    )
    detail = (
        f"{config.knn_references:,} references x {config.knn_dims:,} dims, {config.knn_queries:,} queries, k {config.knn_k}, "
        f"exact search: {per_metric}; value = worst ({worst})"
    )
    return _result("4", ratios[worst], ratios[worst] >= 3.0, detail)


def measure_embedding_memory(config: PerfConfig, shared: Shared) -> PerfResult:
    """Row 5: peak RSS (``ru_maxrss`` of a fresh child process) while embedding the generated slide."""
    from virtualst.bench.predict_memory import TARGET_PEAK_GB, embedding_memory

    r = embedding_memory(config.memory_spots, config.memory_tile_px, config.memory_work, device=config.device)
    generated = "reused" if r["generate_s"] is None else f"written in {r['generate_s']:.0f} s"
    detail = (
        f"{r['n_spots']:,} Visium-grid spots (asked {config.memory_spots:,}) on a {r['slide_px']:,}^2 px pyramidal TIFF "
        f"({r['slide_gb']:.2f} GB, {generated}), {config.encoder} at {r['tile_px']} px: {r['seconds']:.0f} s, "
        f"{r['tiles_per_s']:.1f} tiles/s; sampled peak {r['sampled_peak_rss_gb']:.2f} GB, {r['rss_at_start_gb']:.2f} GB at the child's start"
    )
    return _result("5", r["peak_rss_gb"], r["peak_rss_gb"] < TARGET_PEAK_GB, detail)


def head_fit_times(config: PerfConfig) -> list[dict[str, Any]]:
    """Row 6's measurements: per head kind, the genes fitted, the seconds, and the time for every gene.

    Each head is built with its defaults (what ``virtualst fit --head KIND``
    trains) and fitted with the sections as groups. Kinds listed in
    ``config.heads_measured_genes`` fit their first genes only; their
    ``all_genes_s`` is the measured time scaled linearly (``extrapolated``).
    """
    from virtualst.bench.ridge_speed import synthetic
    from virtualst.heads import make_head

    X, Y, _ = synthetic(config.heads_spots, config.heads_dims, config.heads_genes, n_test=0, seed=config.seed)
    groups = np.arange(config.heads_spots) * config.heads_sections // config.heads_spots
    subset = dict(config.heads_measured_genes)
    out = []
    for kind in config.heads:
        genes = min(subset.get(kind, config.heads_genes), config.heads_genes)
        seconds, _ = best_time(lambda: make_head(kind).fit(X, Y[:, :genes], groups=groups), 1)
        scale = config.heads_genes / genes
        out.append({"head": kind, "genes": genes, "seconds": seconds, "all_genes_s": seconds * scale, "extrapolated": scale > 1})
    return out


def _extrapolated(t: dict[str, Any]) -> str:
    return f" EXTRAPOLATED linearly from {t['genes']} genes measured in {t['seconds']:.1f} s"


def measure_head_fits(config: PerfConfig, shared: Shared) -> PerfResult:
    """Row 6: total time to fit every head kind for all genes (a figure)."""
    times = head_fit_times(config)
    parts = [f"{t['head']} {t['all_genes_s']:,.1f} s" + (_extrapolated(t) if t["extrapolated"] else "") for t in times]
    detail = (
        f"{config.heads_genes:,} genes on {config.heads_spots:,} spots x {config.heads_dims:,} dims "
        f"({config.heads_sections} sections as groups), default parameters (`virtualst fit` trains ridge by default): " + "; ".join(parts)
    )
    return _result("6", float(sum(t["all_genes_s"] for t in times)), None, detail)


#: The rows, in table order.
ROWS: tuple[PerfRow, ...] = (
    PerfRow("1", "embed", "embedding pipeline / forward-only (tiles/s)", ">= 0.9 CPU, >= 0.8 GPU", measure_embedding),
    PerfRow("2", "ridge", "RidgeHead fit vs sklearn RidgeCV (speed-up)", ">= 5x", measure_ridge_vs_sklearn),
    PerfRow("3", "gflops", "RidgeHead GFLOP/s / numpy float32 matmul GFLOP/s", ">= 0.5", measure_ridge_gflops),
    PerfRow("4", "knn", "KNNHead search vs sklearn brute force (speed-up)", ">= 3x", measure_knn),
    PerfRow("5", "memory", "peak RSS embedding a generated slide", "< 2 GB", measure_embedding_memory),
    PerfRow("6", "heads", "fit every head (total)", "-", measure_head_fits),
)
_BY_KEY = {key: row for row in ROWS for key in (row.key, row.slug)}
_UNITS = {"1": "", "2": "x", "3": "", "4": "x", "5": "GB", "6": "s"}


def _result(key: str, value: float, passed: bool | None, detail: str, target: str | None = None) -> PerfResult:
    row = _BY_KEY[key]
    return PerfResult(key, row.name, float(value), _UNITS[key], target or row.target, None if passed is None else bool(passed), detail)


def select_rows(keys: tuple[str, ...] | list[str]) -> list[PerfRow]:
    """Rows by key (``"3"``) or slug (``"gflops"``), in table order; ``ValueError`` for unknown keys."""
    unknown = [k for k in keys if k not in _BY_KEY]
    if unknown:
        known = ", ".join(f"{r.key}/{r.slug}" for r in ROWS)
        raise ValueError(f"unknown perf row(s) {', '.join(unknown)}; known: {known}")
    wanted = {_BY_KEY[k].key for k in keys}
    return [row for row in ROWS if row.key in wanted]


# ---------------------------------------------------------------------------- running and the table
def run_perf(config: PerfConfig, echo: Callable[[str], object] | None = None) -> list[PerfResult]:
    """Measure the configured rows in order; a row that raises is reported as failed, the others still run.

    ``echo`` (e.g. ``print``) receives one progress line per row.
    """
    shared = Shared(config)
    results = []
    for row in select_rows(config.rows):
        if echo:
            echo(f"perf row {row.key} ({row.slug}): {row.name} ...")
        start = time.perf_counter()
        try:
            result = row.measure(config, shared)
        except Exception as exc:  # one broken row (missing data, no GPU) must not lose an hour of other rows
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            result = PerfResult(row.key, row.name, math.nan, _UNITS[row.key], row.target, False, detail, error=detail)
        result.seconds = time.perf_counter() - start
        if echo:
            echo(f"perf row {row.key}: {result.value_text()} ({result.seconds:.0f} s)")
        results.append(result)
    return results


def describe_machine(device: str = "auto") -> str:
    """CPU model, logical CPUs, torch threads, the device used and the GPU's name on CUDA."""
    import torch

    from virtualst.embed.runner import resolve_device

    resolved = resolve_device(device)
    gpu = f" ({torch.cuda.get_device_name(resolved)})" if resolved.type == "cuda" else ""
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, device {resolved}{gpu}; {load_average()}"


def format_table(results: list[PerfResult], machine: str) -> str:
    """One markdown table, columns padded so it also reads as plain text, under a ``machine:`` line."""
    header = ("#", "measure", "value", "target", "met", "detail")
    met = {True: "yes", False: "**no**", None: "-"}
    rows = [(r.key, r.name, r.value_text(), r.target, met[r.passed], r.detail) for r in results]
    widths = [max(len(str(cells[i])) for cells in (header, *rows)) for i in range(len(header))]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"machine: {machine}", "", line(header), rule, *(line(r) for r in rows)])


def write_report(path: Path, results: list[PerfResult], machine: str, config: PerfConfig, command: str = "") -> tuple[Path, Path]:
    """Write the table to ``path`` (markdown) and everything as JSON beside it (``path`` with ``.json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = format_table(results, machine)
    if command:
        text = f"`{command}`\n\n{text}"
    write_text_atomically(path, text + "\n")
    data = {"machine": machine, "command": command, "config": config.to_dict(), "results": [asdict(r) for r in results]}
    json_path = path.with_suffix(".json") if path.suffix != ".json" else path.with_suffix(".perf.json")
    write_text_atomically(json_path, json.dumps(data, indent=2, default=str) + "\n")
    return path, json_path


def with_changes(config: PerfConfig, **changes: Any) -> PerfConfig:
    """``config`` with the non-``None`` ``changes`` applied."""
    return replace(config, **{k: v for k, v in changes.items() if v is not None})


__all__ = [
    "ROWS",
    "PerfConfig",
    "PerfResult",
    "PerfRow",
    "describe_machine",
    "format_table",
    "head_fit_times",
    "ridge_fit_flops",
    "run_perf",
    "select_rows",
    "write_report",
]

if __name__ == "__main__":  # pragma: no cover
    print(format_table(run_perf(PerfConfig.quick(), echo=print), describe_machine()))
