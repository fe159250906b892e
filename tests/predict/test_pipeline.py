"""``virtualst predict`` and ``virtualst demo``: slide in, maps + signatures + hotspots + report out."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from virtualst.cli import app
from virtualst.demo import run_demo, synthetic_gene_sets

runner = CliRunner()


def one_line_error(result, fragment):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output


def test_cli_predict_on_a_pyramidal_tiff(saved_model, he_tiff, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(he_tiff), "--model", str(saved_model), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    adata = ad.read_h5ad(out / "predictions.h5ad")
    assert adata.n_obs > 20 and adata.n_vars == 3
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2) and adata.uns["virtualst"]["grid"] == "visium"
    assert {p.stem for p in (out / "maps").glob("*.png")} == set(adata.var_names)
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 1 + adata.n_vars  # thumbnail + every gene map
    # One training section: no cross-validation, so no gene is known reliable and no signature can be scored.
    assert "reliability unknown" in html and "not scored" in html
    assert f"{adata.n_obs} spots" in result.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--grid", "hexagons"], "unknown grid 'hexagons'"),
        (["--gene-sets", "no-such-set"], "neither a built-in gene set"),
        (["--genes", "GA,NOPE"], "NOPE not predicted by this model"),
    ],
)
def test_cli_predict_checks_options_before_embedding(saved_model, he_tiff, tmp_path, args, fragment):
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(he_tiff), "--model", str(saved_model), "--out", str(out), *args])
    one_line_error(result, fragment)
    assert not (out / "cache").exists() and not (out / "predictions.h5ad").exists()


def test_cli_predict_jpeg_without_pixel_size_is_refused(saved_model, he_jpeg, tmp_path):
    result = runner.invoke(app, ["predict", str(he_jpeg), "--model", str(saved_model), "--out", str(tmp_path / "o")])
    one_line_error(result, "--mpp")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo on a small synthetic data set: 3 sections of 2.8 mm (2 benchmarked, 1 predicted)."""
    out = tmp_path_factory.mktemp("demo")
    lines = []
    result = run_demo(out, device="cpu", show_progress=False, echo=lines.append, synthetic_sections=3, synthetic_size_um=2800.0)
    return out, result, "\n".join(lines)


def test_demo_recovers_the_synthetic_signal(demo):
    out, result, printed = demo
    # Measured (seed 0): strong genes 0.7, noise genes ~0 on the held-out section.
    assert result.by_group["strong"] > 0.5
    assert abs(result.by_group["noise"]) < 0.1
    assert result.by_group["strong"] > result.by_group["weak"] > result.by_group["noise"]
    board = result.leaderboard.set_index("row")
    assert {"hest-ridge", "mean", "library-size", "ridge", "knn+context"} <= set(board.index)
    assert board.loc[result.best_row, "pearson"] > board.loc["library-size", "pearson"], "image rows beat the depth gauge"
    assert "leaderboard" in printed and "strong genes" in printed and str(result.report) in printed


def test_demo_writes_model_predictions_signatures_and_report(demo):
    out, result, _ = demo
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["training"]["sections"] == ["A1", "B1"]
    adata = ad.read_h5ad(out / "prediction" / "predictions.h5ad")
    assert adata.uns["virtualst"]["sample_id"] == result.held_out == "C1" and "measured" in adata.layers
    maps = {p.name for p in (out / "prediction" / "maps").glob("*.png")}
    assert maps and all(f"{p[: -len('.png')]}_scatter.png" in maps for p in maps if not p.endswith("_scatter.png"))
    sets = synthetic_gene_sets(result.data)
    scored = [name for name in sets if f"sig_{name}" in adata.obs]
    assert scored, "the synthetic programmes are scored"
    hot = pd.read_csv(out / "prediction" / "hotspots.csv")
    assert set(hot["hotspot"]) <= {"hot", "cold"} and set(hot["signature"]) <= set(scored)
    table = pd.read_csv(out / "prediction" / "signatures.csv")
    assert len(table) == adata.n_obs and np.allclose(table[f"{scored[0]}_score"], adata.obs[f"sig_{scored[0]}"])
    html = result.report.read_text()
    assert "Benchmark" in html and "hest-ridge" in html and scored[0] in html
