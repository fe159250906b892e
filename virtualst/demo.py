"""``virtualst demo``: the whole product end to end, offline, with the bundled encoder.

1. Data: ``--data`` (any folder the readers understand, e.g. her2st), or a
   deterministic synthetic data set whose expression is a known function of
   its morphology (:mod:`virtualst.predict.synthetic`).
2. The last section is held out; the others are benchmarked (leave-one-patient-out
   within them, or leave-one-section-out when they share one patient: HEST's
   probe, baselines, our heads) and the leaderboard printed.
3. The best image-based row is refitted on all training sections, saved as a
   model directory (Hub-ready, model card included).
4. The held-out section is predicted at its spots: maps (measured beside
   predicted), signature hotspots, ``predictions.h5ad`` and ``report.html``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from virtualst.bench.tasks import DirectorySource, Task
from virtualst.errors import InputError

#: Rows of the demo's leaderboard besides the reference rows.
DEMO_HEADS = ("ridge", "knn")
DEMO_SMOOTHINGS = ("none", "context")


@dataclass
class DemoResult:
    """Where the demo put things, and the numbers it printed."""

    data: Path
    leaderboard: pd.DataFrame
    best_row: str
    model_dir: Path
    report: Path
    held_out: str
    held_out_pearson: float
    by_group: dict[str, float]


def synthetic_data(root: Path, n_sections: int = 4, size_um: float = 4000.0, seed: int = 0) -> Path:
    """The synthetic data set under ``root`` (generated once, then reused)."""
    from virtualst.predict.synthetic import TRUTH_FILE, make_synthetic_dataset

    if not (root / TRUTH_FILE).is_file():
        make_synthetic_dataset(root, n_sections=n_sections, seed=seed, size_um=size_um, overwrite=True)
    return root


def recovered_by_group(root: Path, adata) -> dict[str, float]:
    """Mean held-out Pearson of the synthetic strong / weak / noise genes (the known ground truth)."""
    from virtualst.bench.metrics import pearson_per_gene
    from virtualst.predict.synthetic import read_truth

    r = pd.Series(pearson_per_gene(adata.layers["measured"], adata.X), index=adata.var_names)
    return {group: float(r.reindex(genes).mean()) for group, genes in read_truth(root)["groups"].items()}


def synthetic_gene_sets(root: Path) -> dict[str, list[str]]:
    """One signature per morphology feature: the strongly driven genes that rise with it (from the ground truth)."""
    from virtualst.predict.synthetic import GeneModel, read_truth

    model = GeneModel.from_dict(read_truth(root)["gene_model"])
    sets: dict[str, list[str]] = {}
    for gene in model.genes:
        main = max(gene.weights, key=lambda f: abs(gene.weights[f]), default=None)
        if gene.group == "strong" and main is not None and gene.weights[main] > 0:
            sets.setdefault(f"{main}_programme", []).append(gene.name)
    return sets


def demo_task(data: Path, train: list, genes: str, normalization: str) -> Task:
    """The benchmark over the training sections (the held-out one is predicted afterwards)."""
    # Patient-disjoint folds when the training sections come from two or more patients (her2st's four are one patient's).
    split = "leave-one-patient-out" if len({s.patient_id or s.sample_id for s in train}) > 1 else "leave-one-sample-out"
    source = DirectorySource(path=data.resolve(), sample_ids=tuple(s.sample_id for s in train))
    description = "demo: training sections only, the held-out section is predicted afterwards"
    return Task("demo", source, genes, (normalization,), split, description)


def run_demo(
    out: str | Path,
    data: str | Path | None = None,
    genes: str = "hvg:50",
    normalization: str = "cpm-log1p",
    device: str = "auto",
    show_progress: bool = True,
    echo=print,
    synthetic_sections: int = 4,
    synthetic_size_um: float = 4000.0,
) -> DemoResult:
    """Run the demo; see the module docstring.

    Parameters
    ----------
    out
        Output folder: ``synthetic/``, ``cache/``, ``bench/``, ``model/``, ``prediction/``.
    data
        Samples to use (>= 3 sections with counts); ``None``: synthetic.
    genes, normalization
        Targets.
    device
        Embedding device.
    echo
        Where progress lines go.
    synthetic_sections, synthetic_size_um
        Size of the synthetic data set (sections, side of each in µm).
    """
    from virtualst.bench.benchmark import BenchmarkConfig, run_benchmark
    from virtualst.bench.leaderboard import best_image_row, score_text
    from virtualst.bench.metrics import pearson_per_gene
    from virtualst.bench.protocols import HeadRow, get_protocol
    from virtualst.embed.readers import read_all
    from virtualst.embed.runner import EmbedSettings, embed_samples
    from virtualst.heads.predictor import GenePredictor
    from virtualst.heads.targets import TargetSpec
    from virtualst.predict.pipeline import run_prediction

    out = Path(out)
    synthetic = data is None
    root = synthetic_data(out / "synthetic", synthetic_sections, synthetic_size_um) if synthetic else Path(data)
    samples = [s.in_tissue() for s in read_all(root)]
    if len(samples) < 3:
        raise InputError(root, f"the demo needs at least 3 sections with counts (2 to benchmark, 1 to predict), found {len(samples)}")
    train, held_out = samples[:-1], samples[-1]
    echo(f"data: {root} — training on {', '.join(s.sample_id for s in train)}; predicting {held_out.sample_id}")

    settings = EmbedSettings(device=device)
    task = demo_task(root, train, genes, normalization)
    task_yaml = out / "bench" / "task.yaml"
    task_yaml.parent.mkdir(parents=True, exist_ok=True)
    task.to_yaml(task_yaml)
    config = BenchmarkConfig(
        tasks=(str(task_yaml),),
        data_root=root,
        out=out / "bench",
        cache=out / "cache",
        heads=DEMO_HEADS,
        smoothings=DEMO_SMOOTHINGS,
        embed=settings,
        plots=False,
        n_boot=200,
    )
    bench = run_benchmark(config, show_progress=show_progress, command="virtualst demo")
    board = bench.leaderboard
    echo(f"\nleaderboard (training sections, {task.split}, {normalization} targets, {genes}):")
    for r in board.itertuples():
        echo(f"  {r.rank:>2}. {r.row:<16} {score_text(r)}")
    best = best_image_row(board)
    protocol = get_protocol(best.row)
    if not isinstance(protocol, HeadRow):  # hest-ridge won: refit as our ridge, the nearest saveable head
        protocol = get_protocol("ridge")
    echo(f"best image-based row: {best.row}")

    caches = embed_samples(train, out / "cache", settings, show_progress=show_progress)
    predictor = GenePredictor(
        head=protocol.head,
        head_params=dict(protocol.row_params),
        target=TargetSpec(normalization, genes),
        context=protocol.context,
        smoothing=protocol.smooth,
    ).fit(caches, train)
    model_dir = predictor.save_pretrained(out / "model")
    echo(f"model: {model_dir} (CV mean Pearson {predictor.cv_.get('mean_pearson', float('nan')):.3f})")

    gene_sets = synthetic_gene_sets(root) if synthetic else None
    table = board[["rank", "row", "pearson", "pearson_std", "pearson_top"]].rename(columns={"pearson_top": "top-50 pearson"})
    outputs = run_prediction(
        root,
        predictor,
        out / "prediction",
        sample_id=held_out.sample_id,
        gene_sets=gene_sets,
        leaderboard=table,
        cache_dir=out / "cache",
        device=device,
        show_progress=show_progress,
        title=f"virtualst demo: {held_out.sample_id} predicted from H&E",
    )
    adata = outputs.prediction.adata
    held = float(np.nanmean(pearson_per_gene(adata.layers["measured"], adata.X)))
    echo(f"held-out {held_out.sample_id}: mean Pearson over {adata.n_vars} genes {held:.3f} (measured vs predicted)")
    groups = recovered_by_group(root, adata) if synthetic else {}
    if groups:
        echo("  by ground-truth group: " + ", ".join(f"{g} genes {r:.3f}" for g, r in groups.items()))
    echo(f"report: {outputs.report}")
    return DemoResult(root, board, best.row, Path(model_dir), outputs.report, held_out.sample_id, held, groups)
