"""GenePredictor on real her2st embeddings: fit, predict, save/load (directory and offline HF cache), CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import anndata as ad
import numpy as np
import pytest
from typer.testing import CliRunner

from virtualst.cli import app
from virtualst.embed.cache import read_embeddings
from virtualst.errors import InputError
from virtualst.heads.cv import pearson_per_gene
from virtualst.heads.predictor import GenePredictor
from virtualst.heads.smoothing import FeatureContext, PredictionSmoother
from virtualst.heads.targets import TargetSpec

from .test_hub import put_in_cache

pytestmark = pytest.mark.realdata

#: Fast settings per head kind; every kind must survive save -> load bit for bit.
HEADS = {
    "ridge": {},
    "knn": {},
    "lgbm": {"n_estimators": 40},
    "ensemble": {"members": [["ridge", {}], ["knn", {}]]},
}


@pytest.fixture(scope="module")
def fitted(her2st_sections):
    train = her2st_sections[:3]
    predictor = GenePredictor(head="ridge", target=TargetSpec("cpm-log1p", "hvg:20"), smoothing=True)
    return predictor.fit([s.cache for s in train], [s.sample for s in train])


def test_fit_reports_held_out_metrics(fitted):
    cv = fitted.cv_
    assert cv["folds"] == 3 and cv["scheme"] == "group 3-fold by section (not patient-disjoint)"
    assert set(cv["pearson"]) == set(fitted.genes_) and len(fitted.genes_) == 20
    assert cv["mean_pearson"] > 0.1
    assert fitted.encoder_["name"] == "efficientnet_lite0" and fitted.encoder_["dim"] == 1280
    assert fitted.training_ == {
        "sections": ["C2", "C3", "C4"], "patients": ["C"], "n_spots": 551, "sources": fitted.training_["sources"]
    }


def test_predict_new_section_as_anndata(fitted, her2st_sections):
    test = her2st_sections[3]
    adata = fitted.predict(test.cache, test.sample)
    assert adata.shape == (test.sample.n_spots, 20)
    assert list(adata.var_names) == fitted.genes_
    np.testing.assert_allclose(adata.obsm["spatial"], test.sample.centers)
    assert "C5" in adata.uns["spatial"] and "hires" in adata.uns["spatial"]["C5"]["images"]
    assert adata.var["reliable"].dtype == bool and adata.var["cv_pearson"].notna().all()
    r = pearson_per_gene(adata.layers["measured"], adata.X)
    assert r.mean() > 0.1  # real signal on an unseen section


def test_predict_from_cache_alone_places_spots_at_tile_centres(fitted, her2st_sections):
    test = her2st_sections[3]
    adata = fitted.predict(test.cache)
    np.testing.assert_allclose(adata.obsm["spatial"], test.sample.centers, atol=1.0)
    assert "measured" not in adata.layers


def test_refuses_embeddings_of_another_encoder(fitted, her2st_sections):
    emb = read_embeddings(her2st_sections[3].cache)
    other = replace(emb, attrs={**emb.attrs, "encoder": "uni_v1"})
    with pytest.raises(InputError, match="embedded with another encoder/tiling than this model .name 'uni_v1'"):
        fitted.predict(other)
    settings = json.loads(emb.attrs["settings"])
    tta = replace(emb, attrs={**emb.attrs, "settings": json.dumps({**settings, "tta": True})})
    with pytest.raises(InputError, match="tta True vs False"):
        fitted.predict(tta)


@pytest.mark.parametrize("kind", list(HEADS))
def test_every_head_round_trips_through_a_directory(kind, her2st_sections, tmp_path):
    train, test = her2st_sections[:3], her2st_sections[3]
    predictor = GenePredictor(head=kind, head_params=HEADS[kind], target=TargetSpec("cpm-log1p", "hvg:8"), cv_splits=2)
    predictor.fit([s.cache for s in train], [s.sample for s in train])
    folder = predictor.save_pretrained(tmp_path / kind)
    config = json.loads((folder / "config.json").read_text())
    assert all(len(h) == 64 for h in config["artefacts"].values())
    loaded = GenePredictor.from_pretrained(folder)
    np.testing.assert_array_equal(loaded.predict(test.cache).X, predictor.predict(test.cache).X)
    assert loaded.cv_ == predictor.cv_


def test_context_and_smoothing_survive_hub_cache_offline(her2st_sections, tmp_path, offline_cache):
    train, test = her2st_sections[:3], her2st_sections[3]
    predictor = GenePredictor(
        target=TargetSpec("log1p", "heg:10"), context=FeatureContext(), smoothing=PredictionSmoother(per_gene=False)
    ).fit([s.cache for s in train], [s.sample for s in train])
    folder = predictor.save_pretrained(tmp_path / "m", {"repo_id": "lab/her2st-ridge"})
    put_in_cache(offline_cache, "lab/her2st-ridge", folder)
    loaded = GenePredictor.from_pretrained("lab/her2st-ridge")
    np.testing.assert_array_equal(loaded.predict(test.cache).X, predictor.predict(test.cache).X)
    assert loaded.context == FeatureContext() and loaded.smoother_ is not None


def test_cli_fit_then_pull(her2st_sections, her2st_dir, tmp_path):
    cache_root = her2st_sections[0].cache.parent.parent  # reuse the session's embeddings
    out = tmp_path / "model"
    runner = CliRunner()
    result = runner.invoke(
        app, ["fit", "--samples", str(her2st_dir), "--cache", str(cache_root), "--genes", "hvg:10", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "ridge head, 10 genes, 732 spots; CV mean Pearson" in result.output
    pulled = runner.invoke(app, ["pull", str(out), "--out", str(tmp_path / "copy")])
    assert pulled.exit_code == 0, pulled.output
    assert GenePredictor.from_pretrained(tmp_path / "copy").genes_ == GenePredictor.from_pretrained(out).genes_
    (out / "head.safetensors").write_bytes(b"tampered")
    broken = runner.invoke(app, ["pull", str(out)])
    assert broken.exit_code == 2 and "checksum mismatch" in broken.output


def test_cli_fit_bad_options(tmp_path, her2st_dir):
    runner = CliRunner()
    for args, message in [
        (["--head", "forest"], "unknown head 'forest'"),
        (["--genes", "hvg:x"], "expected hvg:K"),
        (["--smooth", "lots"], "--smooth must be one of"),
    ]:
        result = runner.invoke(app, ["fit", "--samples", str(her2st_dir), "--out", str(tmp_path / "m"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "m").exists()


def test_saved_predictions_write_h5ad(fitted, her2st_sections, tmp_path):
    adata = fitted.predict(her2st_sections[3].cache, her2st_sections[3].sample)
    adata.write_h5ad(tmp_path / "p.h5ad")
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    assert back.shape == adata.shape and "spatial" in back.obsm


