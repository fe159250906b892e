"""Leaderboards: per-gene scores of every fold summarised into ranked rows.

Scoring follows HEST-Benchmark: Pearson per gene → mean over the genes of a
fold → mean ± std (population) over the folds of a task → mean over tasks.
The other columns (top-50 Pearson, Spearman, MSE, MAE) are averaged the
same way. The 95 % interval resamples the genes of every fold together
(one bootstrap draw per fold, averaged over the folds), so it says how much
the score depends on which genes were asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from virtualst.bench.metrics import METRICS, bootstrap_means, percentile_interval

#: Columns that identify one leaderboard entry.
ENTRY = ["task", "encoder", "normalization", "row"]

#: What a reader must know about a row to read its numbers (shown as notes).
ROW_NOTES = {
    "mean": "training mean of each gene: Pearson undefined",
    "library-size": "reads each test spot's total counts (sequencing depth), which no image model sees: a confound gauge, not a predictor",
}
HEST_NOTE_EXACT = "HEST-Benchmark protocol, exact (log1p targets); no intercept, so MSE/MAE are not comparable"
HEST_NOTE_OTHER = "HEST-Benchmark probe on these targets (HEST reports log1p only); no intercept, so MSE/MAE are not comparable"


def _fold_summary(genes: pd.DataFrame, top_k: int) -> pd.DataFrame:
    """One row per fold of one entry: each metric's mean over genes, the top-``k`` Pearson, gene counts."""
    records = []
    for fold, part in genes.groupby("fold", sort=False):
        top = part.sort_values("mean_expression", ascending=False, kind="stable").head(top_k)
        record = {"fold": fold, **{m: float(part[m].mean()) for m in METRICS}}  # pandas' mean skips NaN genes
        record.update(pearson_top=float(top["pearson"].mean()), n_genes=len(part), n_nan=int(part["pearson"].isna().sum()))
        records.append(record)
    return pd.DataFrame.from_records(records)


def _interval(part: pd.DataFrame, n_boot: int, level: float, seed: int) -> tuple[float, float]:
    """Bootstrap interval of the mean over folds of the per-fold mean Pearson."""
    draws = [bootstrap_means(fold["pearson"], n_boot, seed) for _, fold in part.groupby("fold", sort=False)]
    if not draws or any(len(d) == 0 for d in draws):
        return float("nan"), float("nan")
    return percentile_interval(np.mean(draws, axis=0), level)


def build_leaderboard(per_gene: pd.DataFrame, top_k: int = 50, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Rank every entry of a per-gene table.

    Parameters
    ----------
    per_gene
        :func:`virtualst.bench.metrics.gene_table` rows with the columns of
        :data:`ENTRY` and ``fold`` added.
    top_k
        Genes in the "top by mean expression" Pearson column.

    Returns
    -------
    pandas.DataFrame
        One row per entry, ranked by mean Pearson within each task and
        normalisation (NaN last): ``rank``, the entry columns, ``n_folds``,
        ``pearson`` (mean over folds), ``pearson_std``, ``ci_low``,
        ``ci_high``, ``pearson_top``, ``spearman``, ``mse``, ``mae``,
        ``n_genes`` (per fold), ``n_nan``.
    """
    missing = [c for c in [*ENTRY, "fold", "gene", "mean_expression", *METRICS] if c not in per_gene]
    if missing:
        raise ValueError(f"per-gene table lacks column(s) {', '.join(missing)}")
    records = []
    for key, genes in per_gene.groupby(ENTRY, sort=False):
        part = _fold_summary(genes, top_k)
        low, high = _interval(genes, n_boot, level, seed)
        records.append(
            {
                **dict(zip(ENTRY, key)),
                "n_folds": len(part),
                "pearson": float(part["pearson"].mean(skipna=False)),
                "pearson_std": float(np.std(part["pearson"].to_numpy())),
                "ci_low": low,
                "ci_high": high,
                "pearson_top": float(part["pearson_top"].mean()),
                **{m: float(part[m].mean()) for m in METRICS if m != "pearson"},
                "n_genes": int(part["n_genes"].max()),
                "n_nan": int(part["n_nan"].sum()),
            }
        )
    table = pd.DataFrame.from_records(records)
    # Tasks and normalisations stay in the order they ran (log1p first, as the task lists them).
    order = {c: {v: i for i, v in enumerate(dict.fromkeys(per_gene[c]))} for c in ("task", "normalization")}
    table = table.sort_values(
        ["task", "normalization", "pearson"],
        ascending=[True, True, False],
        na_position="last",
        kind="stable",
        key=lambda col: col.map(order[col.name]) if col.name in order else col,
    )
    table.insert(0, "rank", table.groupby(["task", "normalization"]).cumcount() + 1)
    return table.reset_index(drop=True)


def across_tasks(leaderboard: pd.DataFrame) -> pd.DataFrame:
    """HEST's last step: each (encoder, normalisation, row) averaged over the tasks it ran on.

    Entries missing from some task get ``n_tasks`` below the others rather
    than a mean over fewer tasks passing as comparable.
    """
    grouped = leaderboard.groupby(["encoder", "normalization", "row"], sort=False)
    table = grouped.agg(n_tasks=("task", "nunique"), pearson=("pearson", lambda s: s.mean(skipna=False)), pearson_top=("pearson_top", "mean"))
    table = table.reset_index().sort_values(["normalization", "pearson"], ascending=[True, False], na_position="last", kind="stable")
    table.insert(0, "rank", table.groupby("normalization").cumcount() + 1)
    return table.reset_index(drop=True)


def row_note(row: str, normalization: str) -> str:
    """What the reader must know about ``row`` (empty for our heads)."""
    if row == "hest-ridge":
        return HEST_NOTE_EXACT if normalization == "log1p" else HEST_NOTE_OTHER
    return ROW_NOTES.get(row, "")


def best_image_row(entries: pd.DataFrame) -> Any:
    """The best-scoring entry that predicts from the image alone (not ``mean``/``library-size``), or ``None``."""
    images = entries[~entries["row"].isin(list(ROW_NOTES)) & entries["pearson"].notna()]
    return None if images.empty else next(images.sort_values("pearson", ascending=False, kind="stable").itertuples(index=False))


def verdict(entries: pd.DataFrame) -> str:
    """One line: the best image row and its margin over ``hest-ridge`` of the same encoder."""
    best = best_image_row(entries)
    if best is None:
        return ""
    line = f"Best image-based row: `{best.row}` ({best.encoder}), Pearson {_number(best.pearson)}"
    reference = entries[(entries["row"] == "hest-ridge") & (entries["encoder"] == best.encoder)]
    if best.row != "hest-ridge" and len(reference):
        line += f", {best.pearson - reference['pearson'].iloc[0]:+.3f} over `hest-ridge` ({_number(reference['pearson'].iloc[0])})"
    return line + "."


def score_text(entry: Any) -> str:
    """``"Pearson 0.402 ± 0.061"`` for a leaderboard entry; says so when the score is undefined."""
    if not np.isfinite(entry.pearson):
        return "Pearson undefined (constant predictions)"
    return f"Pearson {entry.pearson:.3f} ± {entry.pearson_std:.3f}"


def _number(value: float, digits: int = 3) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(entries: pd.DataFrame, top_k: int = 50, level: float = 0.95) -> str:
    """A GitHub-flavoured Markdown table of leaderboard entries (already ranked)."""
    pct = f"{level:.0%}"
    header = (
        f"| # | row | encoder | Pearson (mean ± std over folds) | {pct} CI | top-{top_k} Pearson | Spearman | MSE | MAE | notes |\n"
        "|---:|---|---|---|---|---:|---:|---:|---:|---|\n"
    )
    lines = []
    best = best_image_row(entries)
    for e in entries.itertuples(index=False):
        pearson = f"{_number(e.pearson)} ± {_number(e.pearson_std)}"
        if best is not None and e.row == best.row and e.encoder == best.encoder:
            pearson = f"**{pearson}**"
        not_comparable = e.row == "hest-ridge"
        mse, mae = (f"{_number(v)}†" if not_comparable else _number(v) for v in (e.mse, e.mae))
        ci = f"[{_number(e.ci_low)}, {_number(e.ci_high)}]"
        lines.append(
            f"| {e.rank} | `{e.row}` | {e.encoder} | {pearson} | {ci} | {_number(e.pearson_top)} | {_number(e.spearman)} "
            f"| {mse} | {mae} | {row_note(e.row, e.normalization)} |"
        )
    return header + "\n".join(lines) + "\n"


def markdown_report(
    leaderboard: pd.DataFrame,
    context: Mapping[str, Any],
    tasks: Mapping[str, Mapping[str, Any]],
    overall: pd.DataFrame | None = None,
    figures: Mapping[tuple[str, str], Sequence[str]] | None = None,
    top_k: int = 50,
    level: float = 0.95,
) -> str:
    """``leaderboard.md``: one table per task and normalisation, with what produced it.

    Parameters
    ----------
    leaderboard
        :func:`build_leaderboard` output.
    context
        ``command``, ``version``, ``date``, ``encoders``... shown in the header.
    tasks
        Per task: ``description``, ``split``, ``genes``, ``n_folds``,
        ``patient_disjoint`` (bool), ``samples``.
    overall
        :func:`across_tasks` output, shown first when several tasks ran.
    figures
        Relative image paths per ``(task, normalization)``, linked under its table.
    """
    out = ["# virtualst leaderboard", ""]
    out += [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in context.items()]
    out += [
        "",
        "Pearson per gene → mean over genes per fold → mean ± std over folds (HEST-Benchmark); "
        "truths are never smoothed; everything is fitted on the training fold.",
        "",
    ]
    if overall is not None and overall["encoder"].size and leaderboard["task"].nunique() > 1:
        out += ["## Mean over tasks", ""]
        for norm, part in overall.groupby("normalization", sort=False):
            out += [
                f"### {norm} targets",
                "",
                "| # | row | encoder | tasks | mean Pearson | mean top-k Pearson |",
                "|---:|---|---|---:|---:|---:|",
            ]
            out += [
                f"| {r.rank} | `{r.row}` | {r.encoder} | {r.n_tasks} | {_number(r.pearson)} | {_number(r.pearson_top)} |"
                for r in part.itertuples()
            ]
            out.append("")
    for (task, norm), part in leaderboard.groupby(["task", "normalization"], sort=False):
        info = tasks.get(task, {})
        label = "patient-disjoint" if info.get("patient_disjoint") else "**not patient-disjoint**: train and test share patients"
        out += [f"## {task} — {norm} targets", ""]
        if info:
            out.append(
                f"{info.get('description', '')}. Split `{info.get('split')}` ({info.get('n_folds')} folds, {label}); "
                f"genes `{info.get('genes')}` chosen on each training fold unless pinned; samples: {', '.join(info.get('samples', []))}."
            )
            out.append("")
        out.append(markdown_table(part, top_k, level))
        out.append(verdict(part))
        out.append("")
        out.append("† no intercept: off by the per-gene mean, so its MSE/MAE are not comparable with the other rows.")
        out.append("")
        for path in (figures or {}).get((task, norm), []):
            out.append(f"![{path}]({path})")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
