"""``virtualst bench``: embed, fit every row on every fold, score, write the leaderboard.

One run covers tasks × encoders × normalisations × rows × folds. Embeddings
come from the cache (computed when missing) and every fitted fold is stored
under ``{out}/folds`` (:mod:`virtualst.bench.fold_store`), so re-running the
same command recomputes nothing, and adding a row or an encoder computes
only that. Outputs in ``{out}``:

``leaderboard.md`` / ``leaderboard.csv``
    Ranked rows per task and normalisation (:mod:`virtualst.bench.leaderboard`).
``per_gene.csv``
    Every metric of every gene of every fold of every entry.
``results.json``
    Leaderboard, per-fold means, each fold's metadata (fitted alphas,
    smoothing strengths, sample ids, patient-disjointness).
``config.yaml``
    The resolved configuration: tasks with their data paths, folds, rows,
    encoders, embedding settings, versions.
``plots/``
    Measured vs predicted maps over the H&E for the best genes of the best
    row, and predicted-vs-measured scatter plots.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from virtualst._version import __version__
from virtualst.bench.data import SampleData
from virtualst.bench.fold_store import fingerprint, fold_key, load_fold, save_fold
from virtualst.bench.leaderboard import ENTRY, across_tasks, build_leaderboard, markdown_report
from virtualst.bench.metrics import fold_means
from virtualst.bench.protocols import HEAD_ROWS, SMOOTHINGS, FoldResult, expand_rows, get_protocol, run_fold
from virtualst.bench.splits import Fold
from virtualst.bench.tasks import HEST_TASKS, Task, TaskError, get_task
from virtualst.embed.runner import EmbedSettings
from virtualst.errors import VirtualSTError
from virtualst.files import write_text_atomically
from virtualst.heads.base import jsonable

#: Rows every leaderboard shows: the HEST reference and the two baselines.
REFERENCE_ROWS = ("hest-ridge", "mean", "library-size")

#: Suites: a name -> the tasks it runs (those found under the data root).
SUITES = {"hest": tuple(HEST_TASKS)}


@dataclass
class BenchmarkConfig:
    """What one benchmark run covers.

    Parameters
    ----------
    tasks
        Built-in task names (``her2st``, ``stutility-mob``, ``IDC``...) or task YAML files.
    data_root
        Folder holding the built-in tasks' data (``{data_root}/her2st``...).
    out
        Output folder.
    cache
        Embedding cache root, shared with ``virtualst embed``/``fit``.
    encoders
        Encoders to compare.
    heads, smoothings
        Our rows: every head × smoothing (:func:`~virtualst.bench.protocols.expand_rows`);
        the :data:`REFERENCE_ROWS` always run.
    normalizations, genes, split
        Override the tasks' own (``None`` keeps them).
    embed
        Embedding settings (device, batch size...); the encoder is set per run.
    plots
        Draw maps and scatter plots of the best row.
    top_k, n_boot
        Genes in the top-by-expression Pearson; bootstrap resamples of the interval.
    """

    tasks: tuple[str, ...]
    data_root: Path
    out: Path
    cache: Path = Path("cache")
    encoders: tuple[str, ...] = ("efficientnet_lite0",)
    heads: tuple[str, ...] = tuple(HEAD_ROWS)
    smoothings: tuple[str, ...] = tuple(SMOOTHINGS)
    normalizations: tuple[str, ...] | None = None
    genes: str | None = None
    split: str | None = None
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    plots: bool = True
    top_k: int = 50
    n_boot: int = 1000

    @property
    def rows(self) -> list[str]:
        """Reference rows, then ours."""
        try:
            return [*REFERENCE_ROWS, *expand_rows(self.heads, self.smoothings)]
        except ValueError as exc:
            raise VirtualSTError(str(exc)) from None

    def resolve_tasks(self) -> list[Task]:
        """The tasks with this run's overrides applied."""
        overrides = {k: v for k, v in {"normalization": self.normalizations, "genes": self.genes, "split": self.split}.items() if v is not None}
        try:
            return [replace(get_task(name, self.data_root.resolve()), **overrides) for name in self.tasks]
        except ValueError as exc:  # a bad override, re-validated by Task.__post_init__
            raise VirtualSTError(str(exc)) from None


def suite_tasks(suite: str, data_root: str | Path) -> tuple[str, ...]:
    """The tasks of ``suite`` whose folders exist under ``data_root``.

    Raises
    ------
    TaskError
        Unknown suite, or none of its tasks found.
    """
    if suite not in SUITES:
        raise TaskError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    found = tuple(t for t in SUITES[suite] if (Path(data_root) / t).is_dir())
    if not found:
        raise TaskError(f"no task of suite {suite!r} found under {data_root} (expected folders {', '.join(SUITES[suite])})")
    return found


@dataclass
class BenchmarkResult:
    """What :func:`run_benchmark` produced (also written to ``config.out``)."""

    leaderboard: pd.DataFrame
    per_gene: pd.DataFrame
    overall: pd.DataFrame
    paths: dict[str, Path]
    fold_results: dict[tuple[str, str, str, str, str], FoldResult] = field(repr=False, default_factory=dict)


def _slug(text: str) -> str:
    """A file-name-safe form of an encoder/task name (``hf-hub:org/name`` -> ``hf-hub_org_name``)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)


def _strict_json(value: Any) -> Any:
    """JSON-able with NaN/inf as ``null`` (strict JSON readers reject NaN)."""
    value = jsonable(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_strict_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    return value


def _task_info(task: Task, folds: Sequence[Fold], samples: Sequence[str]) -> dict[str, Any]:
    return {
        "description": task.description or task.name,
        "split": str(task.split),
        "genes": task.genes if isinstance(task.genes, str) else f"{len(task.genes)} pinned genes",
        "n_folds": len(folds),
        "patient_disjoint": all(f.patient_disjoint for f in folds),
        "samples": list(samples),
        "folds": [{"name": f.name, "train": list(f.train), "test": list(f.test), "patient_disjoint": f.patient_disjoint} for f in folds],
    }


class _Runner:
    """Runs (or reloads) every fold of one task × encoder and collects per-gene tables."""

    def __init__(self, config: BenchmarkConfig, tick: Callable[[str], None]) -> None:
        self.config, self.tick = config, tick
        self.tables: list[pd.DataFrame] = []
        self.records: list[dict[str, Any]] = []
        self.results: dict[tuple[str, str, str, str, str], FoldResult] = {}
        self.reused = 0

    def run(self, task: Task, encoder: str, data: list[SampleData], folds: Sequence[Fold]) -> None:
        prints = {d.sample_id: fingerprint(d) for d in data}
        genes = task.gene_spec()
        for norm in task.normalization:
            for row in self.config.rows:
                protocol = get_protocol(row)
                for fold in folds:
                    self.tick(f"{task.name} {encoder} {norm} {row} {fold.name}")
                    key = fold_key(
                        {
                            "row": row,
                            "protocol": type(protocol).__name__,
                            "config": asdict(protocol),
                            "normalization": norm,
                            "genes": str(genes),
                            "train": fold.train,
                            "test": fold.test,
                        },
                        [prints[i] for i in (*fold.train, *fold.test)],
                    )
                    base = self.config.out / "folds" / _slug(task.name) / _slug(encoder) / norm / row / _slug(fold.name)
                    result = load_fold(base, key)
                    if result is None:
                        result = run_fold(row, fold, data, norm, genes)
                        save_fold(base, key, result)
                    else:
                        self.reused += 1
                    entry = dict(zip(ENTRY, (task.name, encoder, norm, row)))
                    table = result.gene_table(fold=fold.name)
                    for column, value in reversed(entry.items()):
                        table.insert(0, column, value)
                    self.tables.append(table)
                    self.records.append({**entry, "fold": fold.name, "metadata": result.metadata})
                    self.results[(task.name, encoder, norm, row, fold.name)] = result


def run_benchmark(config: BenchmarkConfig, show_progress: bool = True, command: str | None = None) -> BenchmarkResult:
    """Run the benchmark described by ``config`` and write its outputs.

    Parameters
    ----------
    config
        Tasks, encoders, rows, output folder.
    show_progress
        Progress bars for embedding and for the folds.
    command
        The command line, recorded in the outputs.
    """
    from tqdm.auto import tqdm

    rows = config.rows  # validate before any work
    if not config.encoders:
        raise VirtualSTError("no encoder to benchmark (--encoders is empty)")
    tasks = config.resolve_tasks()
    folds = {t.name: t.folds() for t in tasks}
    total = sum(len(t.normalization) * len(rows) * len(folds[t.name]) for t in tasks) * len(config.encoders)
    config.out.mkdir(parents=True, exist_ok=True)
    info: dict[str, dict[str, Any]] = {}
    with tqdm(total=total, unit="fold", desc="bench", disable=not show_progress) as bar:

        def tick(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)

        runner = _Runner(config, tick)
        data_by_run: dict[tuple[str, str], list[SampleData]] = {}
        for task in tasks:
            for encoder in config.encoders:
                data = task.load(encoder, config.cache, config.embed, show_progress)
                data_by_run[task.name, encoder] = data
                runner.run(task, encoder, data, folds[task.name])
            info[task.name] = _task_info(task, folds[task.name], [d.sample_id for d in data])

    per_gene = pd.concat(runner.tables, ignore_index=True)
    leaderboard = build_leaderboard(per_gene, top_k=config.top_k, n_boot=config.n_boot)
    overall = across_tasks(leaderboard)
    context = {
        "command": command or "(Python API)",
        "virtualst": __version__,
        "date": dt.date.today().isoformat(),
        "encoders": ", ".join(config.encoders),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
    }
    figures: dict[tuple[str, str], list[str]] = {}
    if config.plots:
        from virtualst.bench.plots import plot_best_rows

        figures = plot_best_rows(leaderboard, runner.results, data_by_run, tasks, config.out)

    out = config.out
    paths = {
        "per_gene": out / "per_gene.csv",
        "leaderboard_csv": out / "leaderboard.csv",
        "leaderboard_md": out / "leaderboard.md",
        "config": out / "config.yaml",
        "results": out / "results.json",
    }
    write_text_atomically(paths["per_gene"], per_gene.to_csv(index=False))
    write_text_atomically(paths["leaderboard_csv"], leaderboard.to_csv(index=False))
    write_text_atomically(paths["leaderboard_md"], markdown_report(leaderboard, context, info, overall, figures, top_k=config.top_k))
    resolved = {
        "context": context,
        "tasks": [{**t.to_dict(), "folds": info[t.name]["folds"]} for t in tasks],
        "encoders": list(config.encoders),
        "rows": rows,
        "embed": config.embed.to_dict(),
        "cache": str(config.cache),
        "top_k": config.top_k,
        "n_boot": config.n_boot,
    }
    write_text_atomically(paths["config"], yaml.safe_dump(jsonable(resolved), sort_keys=False, allow_unicode=True))
    fold_table = fold_means(per_gene)
    results = {
        "context": context,
        "leaderboard": leaderboard.to_dict(orient="records"),
        "mean_over_tasks": overall.to_dict(orient="records"),
        "fold_means": fold_table.to_dict(orient="records"),
        "folds": runner.records,
        "reused_folds": runner.reused,
    }
    write_text_atomically(paths["results"], json.dumps(_strict_json(results), indent=1, default=str))  # written last: the run is complete
    return BenchmarkResult(leaderboard, per_gene, overall, {**paths, "plots": out / "plots"}, runner.results)
