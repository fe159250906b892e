"""Benchmark figures: measured vs predicted maps over the H&E, and scatter plots, for the best row.

For each task and normalisation the best image-based row
(:func:`~virtualst.bench.leaderboard.best_image_row`) is drawn fold by fold:
its best genes on the fold's first test section (measured and predicted side
by side on one colour scale, over the slide thumbnail when the task has
slides), and predicted-vs-measured scatter plots over all test spots. Each
map carries the gene's held-out Pearson of that fold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from virtualst.bench.data import SampleData
from virtualst.bench.leaderboard import best_image_row
from virtualst.bench.protocols import FoldResult
from virtualst.bench.tasks import DirectorySource, Task
from virtualst.heads.smoothing import spot_pitch_um
from virtualst.predict.maps import SlideCanvas, gene_map, safe_filename, scatter_plot

#: Longest side of the slide thumbnails drawn under the maps.
THUMBNAIL_PX = 1200


def _canvas(data: SampleData, task: Task) -> SlideCanvas:
    """The section's spots over its slide thumbnail; a blank canvas in µm when the task has no slides."""
    if isinstance(task.source, DirectorySource):
        sample = next((s for s in task.samples() if s.sample_id == data.sample_id), None)
        if sample is not None and sample.image is not None:
            thumb = sample.image.thumbnail(THUMBNAIL_PX)
            return SlideCanvas(
                coords_px=data.coords_um / sample.um_per_px,
                spot_diameter_px=sample.spot_diameter_um / sample.um_per_px,
                image=thumb,
                scalef=thumb.shape[1] / sample.image.extent[0],
                um_per_px=sample.um_per_px,
            )
    # Pre-cut patches only: draw in µm, spots half a pitch wide (ST 100/200 µm, Visium 55/100 µm).
    pitch = spot_pitch_um(data.coords_um) if data.n_spots > 1 else 100.0
    return SlideCanvas(coords_px=data.coords_um, spot_diameter_px=0.5 * pitch, um_per_px=1.0)


def _best_genes(result: FoldResult, n: int) -> pd.DataFrame:
    table = result.gene_table()
    return table.dropna(subset=["pearson"]).sort_values("pearson", ascending=False, kind="stable").head(n)


def plot_fold(result: FoldResult, data: Mapping[str, SampleData], task: Task, out_dir: Path, units: str, n_genes: int = 3) -> list[Path]:
    """Maps of the ``n_genes`` best genes on the first test section, and one scatter per gene over all test spots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    best = _best_genes(result, n_genes)
    sid = next(iter(result.predictions))
    canvas = _canvas(data[sid], task)
    pooled_pred, pooled_truth = result.pooled()
    paths = []
    for gene, r in zip(best["gene"], best["pearson"]):
        j = result.genes.index(gene)
        path = out_dir / f"{safe_filename(sid)}_{safe_filename(gene)}_map.png"
        gene_map(canvas, result.predictions[sid][:, j], gene, measured=result.truths[sid][:, j], cv_pearson=r, units=units, out=path)
        paths.append(path)
        path = out_dir / f"{safe_filename(gene)}_scatter.png"
        scatter_plot(pooled_truth[:, j], pooled_pred[:, j], gene, cv_pearson=r, units=units, out=path)
        paths.append(path)
    return paths


def plot_best_rows(
    leaderboard: pd.DataFrame,
    results: Mapping[tuple[str, str, str, str, str], FoldResult],
    data_by_run: Mapping[tuple[str, str], Sequence[SampleData]],
    tasks: Sequence[Task],
    out: Path,
    n_genes: int = 3,
) -> dict[tuple[str, str], list[str]]:
    """Draw every fold of the best row of each task × normalisation under ``out/plots``.

    Returns
    -------
    dict
        ``(task, normalization)`` -> paths relative to ``out`` of the first
        fold's figures, for the leaderboard to show.
    """
    by_name = {t.name: t for t in tasks}
    shown: dict[tuple[str, str], list[str]] = {}
    for (task, norm), part in leaderboard.groupby(["task", "normalization"], sort=False):
        best = best_image_row(part)
        if best is None:
            continue
        data = {d.sample_id: d for d in data_by_run[task, best.encoder]}
        folds = [(key[4], r) for key, r in results.items() if key[:4] == (task, best.encoder, norm, best.row)]
        for k, (fold, result) in enumerate(folds):
            out_dir = out / "plots" / safe_filename(task) / safe_filename(norm) / safe_filename(best.row) / safe_filename(fold)
            paths = plot_fold(result, data, by_name[task], out_dir, units=norm, n_genes=n_genes)
            if k == 0:
                shown[task, norm] = [str(p.relative_to(out)) for p in paths[:2]]
    return shown
