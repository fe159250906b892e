"""The ``virtualst`` command line.

Every user error (bad file, unknown encoder, missing weights) ends as one
line on stderr and exit code 2; an interrupted run exits 130 and resumes
when re-run.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from virtualst._version import __version__
from virtualst.errors import VirtualSTError

app = typer.Typer(
    name="virtualst",
    help="Virtual spatial transcriptomics: gene expression from H&E slides.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

USER_ERROR = 2


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn :class:`VirtualSTError` into a one-line message and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except VirtualSTError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(USER_ERROR) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished batches are kept; run the same command again to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
    """Warnings as ``warning: message`` lines: the source line that raised one means nothing to a CLI user."""
    kind = "" if category is UserWarning else f" ({category.__name__})"
    return f"warning{kind}: {message}\n"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"virtualst {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = None,
) -> None:
    """Virtual spatial transcriptomics: gene expression from H&E slides."""
    warnings.formatwarning = one_line_warning


@app.command()
@user_errors
def embed(
    samples: Annotated[list[Path], typer.Argument(help="Sample files or directories (ST, Visium outs, HEST, .h5ad).")],
    cache: Annotated[Path, typer.Option(help="Root directory of the embedding cache.")] = Path("cache"),
    encoder: Annotated[str, typer.Option(help="Registry name, hf-hub:org/name or local-dir:/path.")] = "efficientnet_lite0",
    weights: Annotated[Optional[str], typer.Option(help="Local weight file/directory overriding the source.")] = None,
    tile_um: Annotated[float, typer.Option(help="Tile side in µm (default 112 = 224 px at 0.5 µm/px).")] = 112.0,
    tile_px: Annotated[int, typer.Option(help="Tile side in pixels fed to the encoder.")] = 224,
    spot_factor: Annotated[
        Optional[float], typer.Option(help="Spot-diameter-matched tiles: side = spot diameter x this (overrides --tile-um).")
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option(min=1, help="Tiles per forward pass (default: 16 CPU, 256 GPU, halved on out-of-memory).")
    ] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Tile-reading processes (default: auto).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    tta: Annotated[bool, typer.Option("--tta", help="Average over the 8 dihedral transforms.")] = False,
    float16: Annotated[bool, typer.Option("--float16", help="Store features as float16.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Recompute existing caches.")] = False,
    all_spots: Annotated[bool, typer.Option("--all-spots", help="Also embed spots outside the tissue (default: in-tissue only).")] = False,
    compile_encoder: Annotated[bool, typer.Option("--compile", help="torch.compile the encoder (long GPU runs).")] = False,
    cpu_replicas: Annotated[
        Optional[int], typer.Option(min=1, help="Encoder processes sharing the cores on CPU (default: auto, up to 4; 1 = one process).")
    ] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Distribute samples over Ray (a local instance unless --ray-address).")] = False,
    ray_address: Annotated[
        Optional[str], typer.Option(help="Ray cluster to join (auto, host:port, ray://host:10001); implies --ray.")
    ] = None,
    ray_gpus_per_task: Annotated[
        Optional[float], typer.Option(min=0, help="GPUs per Ray worker (default: 1 when the device resolves to CUDA, else 0).")
    ] = None,
    ray_cpus_per_task: Annotated[
        Optional[float], typer.Option(min=0, help="CPUs (torch threads) per Ray worker (default: 1; GPU workers their share, up to 8).")
    ] = None,
    ray_shard_spots: Annotated[
        Optional[int],
        typer.Option(min=0, help="Spots per shard of a large sample over Ray (default: only when workers outnumber samples; 0: never)."),
    ] = None,
) -> None:
    """Embed the spot tiles of samples into the HDF5 cache (resumable), locally or over Ray."""
    from virtualst.embed.readers import read_all
    from virtualst.embed.runner import EmbedSettings, embed_samples
    from virtualst.embed.tiling import TileSpec

    use_ray = ray or ray_address is not None
    if not use_ray and (ray_gpus_per_task is not None or ray_cpus_per_task is not None or ray_shard_spots is not None):
        raise VirtualSTError("--ray-gpus-per-task, --ray-cpus-per-task and --ray-shard-spots need --ray")
    if use_ray:
        from virtualst.embed.distributed import embed_samples_ray, import_ray

        import_ray()  # before reading the samples

    tile = TileSpec(px=tile_px, um=None, spot_factor=spot_factor) if spot_factor else TileSpec(px=tile_px, um=tile_um)
    settings = EmbedSettings(
        encoder=encoder,
        tile=tile,
        batch_size=batch_size,
        num_workers=workers,
        device=device,
        tta=tta,
        storage_dtype="float16" if float16 else "float32",
        weights=weights,
        overwrite=overwrite,
        compile_encoder=compile_encoder,
        cpu_replicas=cpu_replicas,
    )
    loaded = [sample for path in samples for sample in read_all(path)]
    if not all_spots:
        loaded = [sample.in_tissue() for sample in loaded]
    if use_ray:
        report = embed_samples_ray(
            loaded, cache, settings, ray_address, ray_gpus_per_task, ray_cpus_per_task,
            show_progress=sys.stderr.isatty(), shard_spots=ray_shard_spots,
        )
        paths = report.paths
        typer.echo(report.summary(), err=True)  # stdout stays the list of caches
    else:
        paths = embed_samples(loaded, cache, settings, show_progress=sys.stderr.isatty())
    for path in paths:
        typer.echo(str(path))


@app.command()
@user_errors
def encoders(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the registered encoders."""
    from virtualst.embed.encoders import list_encoders

    rows = [
        {
            "name": c.name,
            "dim": c.dim,
            "weights": c.weights,
            "gated": c.gated,
            "precision": c.precision,
            "pooling": c.pooling,
            "license": c.license,
        }
        for c in list_encoders()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    typer.echo("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        typer.echo("  ".join(str(row[c]).ljust(widths[c]) for c in columns))


@app.command()
@user_errors
def info(path: Annotated[Path, typer.Argument(help="A sample (file or directory) or an embedding cache .h5.")]) -> None:
    """Summarise a sample or an embedding cache file."""
    from virtualst.embed.summary import describe

    typer.echo(describe(path))


SMOOTHING_CHOICES = ("none", "context", "predictions", "both")


@app.command()
@user_errors
def fit(
    samples: Annotated[list[Path], typer.Option("--samples", help="Training samples (files or directories; repeat the option).")],
    out: Annotated[Path, typer.Option(help="Directory to save the model to (a Hub-ready folder).")],
    cache: Annotated[Path, typer.Option(help="Root of the embedding cache (missing embeddings are computed).")] = Path("cache"),
    encoder: Annotated[str, typer.Option(help="Encoder the embeddings come from.")] = "efficientnet_lite0",
    head: Annotated[str, typer.Option(help="ridge, lgbm, knn or ensemble.")] = "ridge",
    genes: Annotated[str, typer.Option(help="hvg:K, heg:K, list:A,B,... or a gene-list file.")] = "hvg:50",
    normalization: Annotated[str, typer.Option(help="log1p or cpm-log1p.")] = "log1p",
    smooth: Annotated[str, typer.Option(help="Spatial context: none, context (neighbour features), predictions, both.")] = "none",
    cv_splits: Annotated[int, typer.Option(min=2, help="Held-out folds (by patient, else by section) for the metrics.")] = 5,
    all_spots: Annotated[bool, typer.Option("--all-spots", help="Also train on spots outside the tissue.")] = False,
) -> None:
    """Fit a gene-expression predictor on embedded samples and save it (no pickle)."""
    from virtualst.embed.readers import read_all
    from virtualst.embed.runner import EmbedSettings, embed_samples
    from virtualst.heads.base import head_class
    from virtualst.heads.predictor import GenePredictor
    from virtualst.heads.smoothing import FeatureContext, PredictionSmoother
    from virtualst.heads.targets import TargetSpec

    if smooth not in SMOOTHING_CHOICES:
        raise VirtualSTError(f"--smooth must be one of {', '.join(SMOOTHING_CHOICES)}, not {smooth!r}")
    try:
        target = TargetSpec(normalization=normalization, genes=genes)
        head_class(head)
    except ValueError as exc:
        raise VirtualSTError(str(exc)) from None
    loaded = [sample for path in samples for sample in read_all(path)]
    if not all_spots:
        loaded = [sample.in_tissue() for sample in loaded]
    caches = embed_samples(loaded, cache, EmbedSettings(encoder=encoder), show_progress=sys.stderr.isatty())
    predictor = GenePredictor(
        head=head,
        target=target,
        context=FeatureContext() if smooth in ("context", "both") else None,
        smoothing=PredictionSmoother() if smooth in ("predictions", "both") else None,
        cv_splits=cv_splits,
    )
    predictor.fit(caches, loaded)
    predictor.save_pretrained(out)
    cv = predictor.cv_
    score = f"CV mean Pearson {cv['mean_pearson']:.3f} ({cv['scheme']})" if cv.get("folds") else "not cross-validated"
    typer.echo(f"{out}: {head} head, {len(predictor.genes_)} genes, {predictor.training_['n_spots']} spots; {score}")


def _names(text: str | None) -> tuple[str, ...] | None:
    """``"a,b, c"`` -> ``("a", "b", "c")``; ``None`` stays ``None``."""
    return None if text is None else tuple(t.strip() for t in text.split(",") if t.strip())


@app.command()
@user_errors
def bench(
    out: Annotated[Path, typer.Option(help="Output folder (leaderboard.md/.csv, results.json, per_gene.csv, config.yaml, plots/).")],
    task: Annotated[Optional[list[str]], typer.Option(help="Built-in task (her2st, stutility-mob, IDC...) or a task .yaml; repeatable.")] = None,
    suite: Annotated[Optional[str], typer.Option(help="Run a suite instead: 'hest' = every HEST-Benchmark task under --data.")] = None,
    data: Annotated[Path, typer.Option(help="Folder holding the built-in tasks' data ({data}/her2st, {data}/IDC...).")] = Path("data"),
    encoders: Annotated[str, typer.Option(help="Comma-separated encoders to compare.")] = "efficientnet_lite0",
    heads: Annotated[
        str, typer.Option(help="Comma-separated heads: ridge, ridge-group, lgbm, knn, ensemble.")
    ] = "ridge,ridge-group,lgbm,knn,ensemble",
    smoothing: Annotated[
        str, typer.Option(help="Comma-separated spatial options: none, context, smooth, context+smooth.")
    ] = "none,context,smooth,context+smooth",
    normalization: Annotated[Optional[str], typer.Option(help="Comma-separated targets (default: the task's, log1p and cpm-log1p).")] = None,
    genes: Annotated[Optional[str], typer.Option(help="Override the task's genes: hvg:K, heg:K, list:A,B or a file.")] = None,
    split: Annotated[
        Optional[str], typer.Option(help="Override the split: leave-one-patient-out, patient-kfold:K, leave-one-sample-out, official.")
    ] = None,
    cache: Annotated[Path, typer.Option(help="Root of the embedding cache (reused; missing embeddings are computed).")] = Path("cache"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Tiles per forward pass.")] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Draw maps and scatter plots of the best row.")] = True,
) -> None:
    """Benchmark encoders and heads on tasks; write a leaderboard (re-runs reuse caches and fitted folds)."""
    from virtualst.bench.benchmark import BenchmarkConfig, run_benchmark, suite_tasks
    from virtualst.bench.leaderboard import score_text
    from virtualst.embed.runner import EmbedSettings

    if bool(task) == bool(suite):
        raise VirtualSTError("give --task (repeatable) or --suite, not both or neither")
    tasks = tuple(task) if task else suite_tasks(suite, data)
    config = BenchmarkConfig(
        tasks=tasks,
        data_root=data,
        out=out,
        cache=cache,
        encoders=_names(encoders),
        heads=_names(heads),
        smoothings=_names(smoothing),
        normalizations=_names(normalization),
        genes=genes,
        split=split,
        embed=EmbedSettings(device=device, batch_size=batch_size),
        plots=plots,
    )
    result = run_benchmark(config, show_progress=sys.stderr.isatty(), command=" ".join(["virtualst", *sys.argv[1:]]))
    for (name, norm), part in result.leaderboard.groupby(["task", "normalization"], sort=False):
        typer.echo(f"\n{name} — {norm}")
        for r in part.head(8).itertuples():
            typer.echo(f"  {r.rank:>2}. {r.row:<28} {r.encoder:<20} {score_text(r)}")
    typer.echo(f"\n{result.paths['leaderboard_md']}")


@app.command()
@user_errors
def predict(
    slide: Annotated[Path, typer.Argument(help="H&E image (JPEG/PNG/TIFF/pyramidal WSI) or a measured sample (ST, Visium, HEST, .h5ad).")],
    model: Annotated[str, typer.Option(help="Saved model directory or Hugging Face Hub repo id.")],
    out: Annotated[Path, typer.Option(help="Output folder (predictions.h5ad/.csv, maps/, signatures, hotspots, report.html).")],
    grid: Annotated[str, typer.Option(help="Spot grid over the tissue: visium (hex, 55 µm spots, 100 µm pitch), st, square.")] = "visium",
    pitch_um: Annotated[Optional[float], typer.Option(help="Spot pitch in µm, overriding the grid's.")] = None,
    mpp: Annotated[Optional[float], typer.Option(help="µm per pixel, for images whose metadata has none (JPEG/PNG).")] = None,
    sample_id: Annotated[Optional[str], typer.Option(help="Which section of a multi-section folder (e.g. C5 of her2st).")] = None,
    genes: Annotated[Optional[str], typer.Option(help="Comma-separated genes to map (default: the best by CV Pearson).")] = None,
    top_genes: Annotated[int, typer.Option(min=1, help="How many of the best genes to map.")] = 12,
    gene_sets: Annotated[
        Optional[list[str]],
        typer.Option("--gene-sets", help="Built-in gene set name or GMT/JSON/YAML file; repeatable (default: all built-ins)."),
    ] = None,
    fdr: Annotated[float, typer.Option(min=0.0, max=1.0, help="False discovery rate of the hotspot calls.")] = 0.05,
    cache: Annotated[Optional[Path], typer.Option(help="Embedding cache root (default: OUT/cache).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Tiles per forward pass.")] = None,
) -> None:
    """Predict gene expression over a slide: maps, signature hotspots, .h5ad and an HTML report."""
    from virtualst.predict.pipeline import run_prediction

    outputs = run_prediction(
        slide,
        model,
        out,
        top_genes=top_genes,
        genes=_names(genes),
        gene_sets=gene_sets,
        fdr=fdr,
        grid=grid,
        pitch_um=pitch_um,
        mpp=mpp,
        sample_id=sample_id,
        cache_dir=cache,
        device=device,
        batch_size=batch_size,
        show_progress=sys.stderr.isatty(),
    )
    adata = outputs.prediction.adata
    typer.echo(f"{adata.n_obs} spots x {adata.n_vars} genes -> {outputs.prediction.h5ad}")
    typer.echo(f"report: {outputs.report}")


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Output folder (data, cache, bench, model, prediction with report.html).")] = Path("demo"),
    data: Annotated[
        Optional[Path], typer.Option(help="Sections with counts (e.g. ../shared/data/her2st); default: a synthetic data set.")
    ] = None,
    genes: Annotated[str, typer.Option(help="hvg:K, heg:K, list:A,B or a gene-list file.")] = "hvg:50",
    normalization: Annotated[str, typer.Option(help="log1p or cpm-log1p.")] = "cpm-log1p",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """End to end, offline: embed, benchmark, fit, predict a held-out section, write the report."""
    from virtualst.demo import run_demo

    run_demo(out, data, genes=genes, normalization=normalization, device=device, show_progress=sys.stderr.isatty(), echo=typer.echo)


@app.command()
@user_errors
def push(
    model: Annotated[Path, typer.Argument(help="A saved model directory.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repository, org/name.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to push to (created when missing).")] = None,
) -> None:
    """Upload a saved model to the Hugging Face Hub (verified first)."""
    from virtualst.heads.hub import push_model_dir

    typer.echo(push_model_dir(model, repo_id, private=private, revision=revision))


@app.command()
@user_errors
def pull(
    repo_id: Annotated[str, typer.Argument(help="Hub repository (org/name) or a model directory.")],
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag or commit.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Also copy the verified files here.")] = None,
) -> None:
    """Download (or find in the HF cache) a model and verify it; prints where it is."""
    import shutil

    from virtualst.heads.hub import resolve_model_dir
    from virtualst.heads.persistence import read_model_dir

    folder = resolve_model_dir(repo_id, revision=revision)
    config, _, _ = read_model_dir(folder)
    if out is not None:
        shutil.copytree(folder, out, dirs_exist_ok=True)
        folder = out
    cv = config.get("cv", {})
    score = f", CV mean Pearson {cv['mean_pearson']:.3f}" if cv.get("folds") else ""
    typer.echo(f"{folder}: {config['head']['kind']} head on {config['encoder']['name']}, {len(config['target']['genes'])} genes{score}")


@app.command()
@user_errors
def perf(
    rows: Annotated[str, typer.Option(help="Comma-separated rows: 1 embed, 2 ridge, 3 gflops, 4 knn, 5 memory, 6 heads.")] = "1,2,3,4,5,6",
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes: a smoke run of about a minute (ratios only indicative).")] = False,
    device: Annotated[str, typer.Option(help="Encoder device of rows 1 and 5: auto, cpu, cuda, cuda:N.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Also write the table to this markdown file, and JSON beside it (.json).")] = None,
    embed_samples: Annotated[
        Optional[list[Path]], typer.Option("--embed-samples", help="Row 1: sample folders (repeatable; default her2st + stutility_mob).")
    ] = None,
    ridge_spots: Annotated[Optional[int], typer.Option(min=2, help="Rows 2-3: spots (default 20000).")] = None,
    ridge_dims: Annotated[Optional[int], typer.Option(min=1, help="Rows 2-3: embedding dimensions (default 1024).")] = None,
    ridge_genes: Annotated[Optional[int], typer.Option(min=1, help="Rows 2-3: genes (default 2000).")] = None,
    knn_references: Annotated[Optional[int], typer.Option(min=1, help="Row 4: reference spots (default 20000).")] = None,
    knn_queries: Annotated[Optional[int], typer.Option(min=1, help="Row 4: query spots (default 5000).")] = None,
    memory_spots: Annotated[Optional[int], typer.Option(min=1, help="Row 5: spots of the generated slide (default 50000).")] = None,
    memory_tile_px: Annotated[Optional[int], typer.Option(min=8, help="Row 5: encoder tile side in pixels (default 224).")] = None,
    memory_work: Annotated[Optional[Path], typer.Option(help="Row 5: keep the generated slide here and reuse it (default: temporary).")] = None,
    heads_spots: Annotated[Optional[int], typer.Option(min=10, help="Row 6: spots (default 20000).")] = None,
    heads_genes: Annotated[Optional[int], typer.Option(min=1, help="Row 6: genes (default 2000).")] = None,
    lgbm_genes: Annotated[
        Optional[int], typer.Option(min=0, help="Row 6: LightGBM genes actually fitted, extrapolated to all (default 100; 0 = all).")
    ] = None,
) -> None:
    """Side-by-side speed and memory comparisons on this machine, printed as one table."""
    from virtualst.bench.perf import PerfConfig, describe_machine, format_table, run_perf, select_rows, with_changes, write_report

    config = PerfConfig.quick() if quick else PerfConfig()
    measured = None if lgbm_genes is None else (() if lgbm_genes == 0 else (("lgbm", lgbm_genes),))
    try:
        config = with_changes(
            config,
            rows=tuple(_names(rows) or ()),
            device=device,
            embed_samples=tuple(embed_samples) if embed_samples else None,
            ridge_spots=ridge_spots,
            ridge_dims=ridge_dims,
            ridge_genes=ridge_genes,
            knn_references=knn_references,
            knn_queries=knn_queries,
            memory_spots=memory_spots,
            memory_tile_px=memory_tile_px,
            memory_work=memory_work,
            heads_spots=heads_spots,
            heads_genes=heads_genes,
            heads_measured_genes=measured,
        )
        select_rows(config.rows)
    except ValueError as exc:  # an unknown row
        raise VirtualSTError(str(exc)) from None
    results = run_perf(config, echo=lambda line: typer.echo(line, err=True))
    machine = describe_machine(device)
    typer.echo(format_table(results, machine))
    if out is not None:
        for path in write_report(out, results, machine, config, command=" ".join(["virtualst", *sys.argv[1:]])):
            typer.echo(str(path))
    if any(r.error for r in results):
        raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    app()
