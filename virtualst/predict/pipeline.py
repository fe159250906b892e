"""From a slide to a report: predictions, gene maps, signature scores, hotspots, ``report.html``.

:func:`run_prediction` chains the stages and writes, in ``out_dir``::

    predictions.h5ad / .csv     spot predictions (see :mod:`virtualst.predict.slide`),
                                with signature scores and hotspot labels in ``obs``
    maps/{gene}.png             gene maps, best genes first (measured beside predicted when measured)
    maps/{gene}_scatter.png     predicted vs measured, when the slide has measured expression
    signatures.csv              per spot: score and hotspot label of every signature
    hotspots.csv                hot and cold spots of every signature (Gi*, FDR-controlled)
    signatures/{name}_score.png signature maps with hotspots outlined
    report.html                 the self-contained report
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from virtualst.errors import VirtualSTError
from virtualst.files import write_atomically
from virtualst.predict.grid import get_grid
from virtualst.predict.hotspots import hotspots_many, spot_coords_um
from virtualst.predict.maps import gene_maps, gene_scatters, score_maps, select_genes, tissue_mask_map
from virtualst.predict.report import Report, ReportFigure, ReportTable, SignatureSection, summarize_model, write_report
from virtualst.predict.signatures import BUILTIN_GENE_SETS, GeneSet, resolve_gene_sets, score_gene_sets
from virtualst.predict.slide import SlidePrediction, load_model, predict_slide


@dataclass
class PredictionOutputs:
    """Files written by :func:`run_prediction`, and the prediction itself."""

    prediction: SlidePrediction
    report: Path
    maps: dict[str, Path]
    signatures: Path | None = None
    hotspots: Path | None = None
    signature_maps: dict[str, Path] = field(default_factory=dict)


def score_signatures(adata, gene_sets: Iterable[str | Path | GeneSet] | Mapping[str, Sequence[str]], fdr: float = 0.05):
    """Signature scores, their report and hotspot tables; ``obs`` gains ``sig_{name}`` and ``sig_{name}_hotspot``.

    Returns
    -------
    scores, report, tables
        Spots × scored sets; one row per set (why a set was skipped); set -> hotspot table.
    """
    scores, report = score_gene_sets(adata, gene_sets)
    tables = hotspots_many(scores, spot_coords_um(adata), fdr=fdr) if scores.shape[1] else {}
    for name in scores.columns:
        adata.obs[f"sig_{name}"] = scores[name].to_numpy()
        adata.obs[f"sig_{name}_hotspot"] = tables[name]["hotspot"].to_numpy().astype(str)
    return scores, report, tables


def _signature_tables(adata, scores: pd.DataFrame, tables: Mapping[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Wide per-spot table and long table of hot/cold spots, with barcodes and coordinates."""
    xy = np.asarray(adata.obsm["spatial"])
    wide = pd.DataFrame({"barcode": adata.obs_names, "x": xy[:, 0], "y": xy[:, 1]})
    long = []
    for name in scores.columns:
        wide[f"{name}_score"] = scores[name].to_numpy()
        wide[f"{name}_hotspot"] = tables[name]["hotspot"].to_numpy()
        t = tables[name].reset_index(drop=True)
        t.insert(0, "barcode", adata.obs_names)
        t.insert(0, "signature", name)
        long.append(t[t["hotspot"] != ""])
    hot = pd.concat(long, ignore_index=True) if long else pd.DataFrame(columns=["signature", "barcode", "gi_z", "p", "q", "hotspot"])
    return wide, hot


def _thumbnail_figure(prediction: SlidePrediction) -> ReportFigure | None:
    adata = prediction.adata
    library = adata.uns.get("spatial", {}).get(prediction.sample.sample_id, {})
    hires = library.get("images", {}).get("hires")
    if hires is None:
        return None
    mask = adata.uns.get("virtualst", {}).get("tissue_mask")
    if mask is None:
        return ReportFigure.from_array("Slide", hires)
    png = tissue_mask_map(hires, np.asarray(mask) > 0, title=f"{prediction.sample.sample_id}: tissue")
    return ReportFigure("Slide and tissue mask", png, f"{prediction.adata.n_obs} spots predicted")


def run_prediction(
    slide: str | Path,
    model,
    out_dir: str | Path,
    *,
    top_genes: int = 12,
    genes: Sequence[str] | None = None,
    gene_sets: Iterable[str | Path | GeneSet] | Mapping[str, Sequence[str]] | None = None,
    fdr: float = 0.05,
    leaderboard: pd.DataFrame | None = None,
    title: str = "Virtual spatial transcriptomics report",
    **predict_options: Any,
) -> PredictionOutputs:
    """Predict a slide and write maps, signatures, hotspots and the report.

    Parameters
    ----------
    slide, model
        As :func:`virtualst.predict.slide.predict_slide` (model: directory, Hub id or ``GenePredictor``).
    out_dir
        Output folder.
    top_genes
        Gene maps drawn for the best genes by cross-validated Pearson (unless ``genes`` names them).
    gene_sets
        Signatures to score: built-in names, gene-set files (GMT/JSON/YAML), ``GeneSet`` objects
        or ``{name: genes}``; default: every built-in set.
    fdr
        False discovery rate of the hotspot calls.
    leaderboard
        A benchmark table shown in the report (the demo's).
    predict_options
        Passed to :func:`~virtualst.predict.slide.predict_slide` (``grid``, ``mpp``, ``device``...).
    """
    out_dir = Path(out_dir)
    # Every option is checked before the slide is embedded (minutes on a CPU).
    sets = resolve_gene_sets(list(BUILTIN_GENE_SETS) if gene_sets is None else gene_sets)
    if "grid" in predict_options:
        try:
            get_grid(predict_options["grid"])
        except ValueError as exc:
            raise VirtualSTError(str(exc)) from None
    predictor = load_model(model)
    unknown = sorted(set(genes or ()) - set(predictor.genes_))
    if unknown:
        raise VirtualSTError(f"gene(s) {', '.join(unknown)} not predicted by this model")
    scored: list[tuple] = []

    def add_signatures(adata) -> None:  # scored before the h5ad is written, so it carries them in obs
        scored.append(score_signatures(adata, sets, fdr=fdr))

    prediction = predict_slide(slide, predictor, out_dir, annotate=add_signatures, **predict_options)
    adata = prediction.adata

    chosen = select_genes(adata, genes, top=top_genes)
    maps = gene_maps(adata, chosen, out_dir=out_dir / "maps")
    gene_scatters(adata, chosen, out_dir=out_dir / "maps")  # measured slides only
    threshold = float(adata.uns["virtualst"]["reliable_pearson"])
    cv = adata.var["cv_pearson"]
    figures = [ReportFigure.for_gene(g, Path(maps[g]).read_bytes(), float(cv[g]) if np.isfinite(cv[g]) else None, threshold) for g in chosen]

    ((scores, sig_report, tables),) = scored
    report_warnings = [f"Signature {name} not scored: {row['reason']}" for name, row in sig_report.iterrows() if not row["scored"]]
    sig_maps: dict[str, Path] = {}
    sections = []
    sig_path = hot_path = None
    if scores.shape[1]:
        sig_maps = {k: Path(v) for k, v in score_maps(adata, scores, tables, sig_report, out_dir=out_dir / "signatures").items()}
        wide, hot = _signature_tables(adata, scores, tables)
        sig_path = write_atomically(out_dir / "signatures.csv", lambda tmp: wide.to_csv(tmp, index=False))
        hot_path = write_atomically(out_dir / "hotspots.csv", lambda tmp: hot.to_csv(tmp, index=False))
        by_name = {s.name: s for s in sets}
        for name in scores.columns:
            row = sig_report.loc[name]
            sections.append(
                SignatureSection.from_hotspots(
                    name,
                    sig_maps[name].read_bytes(),
                    tables[name].set_index(adata.obs_names),
                    source=by_name[name].source,
                    description=by_name[name].description,
                    genes_used=f"{int(row['n_genes_used'])} of {int(row['n_genes'])} genes used ({row['genes_used']})",
                )
            )

    n_unreliable = int((~adata.var["reliable"].astype(bool)).sum())
    if n_unreliable:
        report_warnings.append(
            f"{n_unreliable} of {adata.n_vars} genes are below the model's reliability threshold (CV r < {threshold:.2f}); "
            "their maps are flagged and they are left out of signature scores."
        )
    info = adata.uns["virtualst"]
    slide_info = {
        k: info[k] for k in ("sample_id", "um_per_px", "grid", "pitch_um", "mpp_source", "spot_diameter_um", "tissue_fraction") if k in info
    }
    slide_info["spots predicted"] = adata.n_obs
    slide_info["measured expression"] = "yes (shown beside predictions)" if "measured" in adata.layers else "no"
    config, _, _ = predictor.to_config()
    report = Report(
        slide_name=str(info.get("sample_id", Path(str(slide)).name)),
        title=title,
        thumbnail=_thumbnail_figure(prediction),
        slide_info=slide_info,
        model_summary=summarize_model(config),
        gene_maps=figures,
        signatures=sections,
        leaderboard=None if leaderboard is None else ReportTable("Benchmark", leaderboard),
        warnings=report_warnings,
    )
    path = write_report(report, out_dir / "report.html")
    return PredictionOutputs(prediction, path, {g: Path(p) for g, p in maps.items()}, sig_path, hot_path, sig_maps)
