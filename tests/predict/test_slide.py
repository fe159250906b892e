"""Whole-slide prediction: pixel size, grid, embedding with the model's tiles, outputs, measured samples."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from virtualst.embed.cache import read_attrs
from virtualst.errors import InputError
from virtualst.predict.slide import CSV_NAME, H5AD_NAME, SETTINGS_NAME, predict_slide, predict_spots

from .conftest import TEST_TILE_PX


def run(slide, model, out_dir, **kw):
    return predict_slide(slide, model, out_dir, device="cpu", show_progress=False, **kw)


@pytest.fixture(scope="module")
def tiff_prediction(he_tiff, saved_model, tmp_path_factory):
    """The pyramidal TIFF predicted on the default Visium grid by the saved model directory."""
    return run(he_tiff, saved_model, tmp_path_factory.mktemp("tiff-out"))


def test_jpeg_without_mpp_asks_for_it(he_jpeg, fitted_model, tmp_path):
    with pytest.raises(InputError, match=r"slide\.jpg: the image has no pixel size in its metadata; pass --mpp") as info:
        run(he_jpeg, fitted_model, tmp_path)
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir()), "nothing is written before the inputs are checked"


def test_unknown_grid_fails_before_any_work(he_jpeg, fitted_model, tmp_path):
    with pytest.raises(ValueError, match="unknown grid 'hexagon'; known: visium, st, square"):
        run(he_jpeg, fitted_model, tmp_path / "out", grid="hexagon", mpp=0.5)
    assert not (tmp_path / "out").exists()


def test_jpeg_with_mpp_is_predicted(he_jpeg, fitted_model, tmp_path):
    result = run(he_jpeg, fitted_model, tmp_path, mpp=0.5)
    info = result.adata.uns["virtualst"]
    assert (info["mpp"], info["mpp_source"], info["sample_id"]) == (0.5, "argument", "slide")
    assert result.adata.n_obs == result.grid.n_spots > 10


def test_tiff_mpp_comes_from_metadata(tiff_prediction):
    info = tiff_prediction.adata.uns["virtualst"]
    assert info["mpp"] == pytest.approx(0.5) and info["mpp_source"] == "metadata"
    assert (info["grid"], info["pitch_um"], info["spot_diameter_um"]) == ("visium", 100.0, 55.0)


def test_tiles_follow_the_model(tiff_prediction, fitted_model):
    attrs = read_attrs(tiff_prediction.cache)
    assert attrs["tile_px"] == TEST_TILE_PX == fitted_model.encoder_["tile_px"]
    assert attrs["tile_um"] == pytest.approx(112.0) and attrs["encoder"] == "efficientnet_lite0"
    assert tiff_prediction.cache.parent.parent == tiff_prediction.h5ad.parent / "cache"


def test_spots_are_the_grid_on_tissue(tiff_prediction):
    adata, grid, tissue = tiff_prediction.adata, tiff_prediction.grid, tiff_prediction.tissue
    assert list(adata.obs_names) == list(grid.spots.barcode)
    np.testing.assert_allclose(adata.obsm["spatial"], grid.spots[["x", "y"]].to_numpy())
    assert tissue.contains(adata.obsm["spatial"]).all()
    assert adata.obs["in_tissue"].all() and {"array_row", "array_col"} <= set(adata.obs.columns)
    # Tissue is an ellipse over ~60% of 1 x 0.77 mm: ~0.46 mm² / (0.01 mm² * sqrt(3)/2) spots.
    assert 40 <= adata.n_obs <= 65


def test_h5ad_has_the_spatial_layout(tiff_prediction, fitted_model):
    adata = ad.read_h5ad(tiff_prediction.h5ad)
    assert list(adata.var_names) == fitted_model.genes_ and np.isfinite(adata.X).all()
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2)
    library = adata.uns["spatial"]["slide"]
    hires = library["images"]["hires"]
    assert hires.dtype == np.uint8 and hires.ndim == 3 and max(hires.shape[:2]) <= 2000
    scale = library["scalefactors"]
    assert scale["tissue_hires_scalef"] == pytest.approx(hires.shape[1] / 2048)
    assert scale["spot_diameter_fullres"] == pytest.approx(55 / 0.5)
    mask = adata.uns["virtualst"]["tissue_mask"]
    assert mask.dtype == np.uint8 and mask.shape == hires.shape[:2] and set(np.unique(mask)) == {0, 1}
    assert 0.4 < mask.mean() < 0.8
    assert "measured" not in adata.layers
    settings = json.loads(adata.uns["virtualst"]["settings_json"])
    assert settings["grid"] == "visium" and settings["embedding"]["tile"]["px"] == TEST_TILE_PX


def test_blocks_of_spots_predict_like_one_call(tiff_prediction, fitted_model):
    whole = fitted_model.predict(tiff_prediction.cache, tiff_prediction.sample)
    blocks = predict_spots(fitted_model, tiff_prediction.cache, tiff_prediction.sample, chunk_spots=7)
    assert list(blocks.obs_names) == list(whole.obs_names) and list(blocks.var_names) == list(whole.var_names)
    np.testing.assert_allclose(blocks.X, whole.X, rtol=1e-6)
    np.testing.assert_array_equal(blocks.obsm["spatial"], whole.obsm["spatial"])
    pd.testing.assert_frame_equal(blocks.var, whole.var)
    np.testing.assert_array_equal(blocks.uns["spatial"]["slide"]["images"]["hires"], whole.uns["spatial"]["slide"]["images"]["hires"])
    assert blocks.uns["spatial"]["slide"]["scalefactors"] == whole.uns["spatial"]["slide"]["scalefactors"]
    assert blocks.uns["virtualst"]["encoder"] == "efficientnet_lite0"


def test_csv_matches_h5ad(tiff_prediction):
    adata = ad.read_h5ad(tiff_prediction.h5ad)
    table = pd.read_csv(tiff_prediction.csv)
    assert list(table.columns) == ["barcode", "x", "y", *adata.var_names]
    assert list(table.barcode) == list(adata.obs_names)
    np.testing.assert_allclose(table[["x", "y"]].to_numpy(), adata.obsm["spatial"], rtol=1e-5)
    np.testing.assert_allclose(table[list(adata.var_names)].to_numpy(), adata.X, rtol=1e-5, atol=1e-6)


def test_only_finished_files_in_the_output(tiff_prediction):
    out = tiff_prediction.h5ad.parent
    assert sorted(p.name for p in out.iterdir()) == sorted(["cache", CSV_NAME, H5AD_NAME, SETTINGS_NAME])
    assert not list(out.rglob("*.partial"))
    assert json.loads((out / SETTINGS_NAME).read_text())["mpp_source"] == "metadata"
    umask = os.umask(0)
    os.umask(umask)
    for name in (CSV_NAME, H5AD_NAME, SETTINGS_NAME):  # temporary files are 0600; outputs follow the umask
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_leaves_no_output(tiff_prediction, he_tiff, fitted_model, tmp_path, monkeypatch):
    def broken(self, path, *args, **kw):
        open(path, "w").write("barcode,x,y\nr0c0,1")  # half a table, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(OSError, match="No space left"):
        run(he_tiff, fitted_model, tmp_path, cache_dir=tiff_prediction.cache.parent.parent)
    assert not any(tmp_path.iterdir())


def test_rerun_reuses_the_cache(tiff_prediction, he_tiff, fitted_model, tmp_path):
    stamp = tiff_prediction.cache.stat().st_mtime_ns
    again = run(he_tiff, fitted_model, tmp_path, cache_dir=tiff_prediction.cache.parent.parent)
    assert again.cache == tiff_prediction.cache and again.cache.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.adata.X, tiff_prediction.adata.X)


def test_another_grid_needs_overwrite_of_the_cache(tiff_prediction, he_tiff, fitted_model, tmp_path):
    shutil.copytree(tiff_prediction.cache.parent.parent, tmp_path / "cache")
    with pytest.raises(InputError, match="cache exists with other settings .*pass --overwrite"):
        run(he_tiff, fitted_model, tmp_path, grid="st")
    st = run(he_tiff, fitted_model, tmp_path, grid="st", pitch_um=150.0, overwrite=True)
    assert st.adata.uns["virtualst"]["grid"] == "st" and st.adata.uns["virtualst"]["pitch_um"] == 150.0
    assert st.adata.uns["spatial"]["slide"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(100 / 0.5)
    np.testing.assert_allclose(np.diff(np.unique(st.adata.obsm["spatial"][:, 0])), 300.0)


def test_explicit_mpp_wins_over_metadata_with_a_warning(tiff_prediction, he_tiff, fitted_model, tmp_path):
    with pytest.warns(UserWarning, match=r"slide\.tif: --mpp 0\.7 contradicts the metadata \(0\.5 µm/px\); using 0\.7"):
        result = run(he_tiff, fitted_model, tmp_path, mpp=0.7, grid="st")  # st: few spots to embed
    assert result.adata.uns["virtualst"]["mpp"] == 0.7 and result.sample.um_per_px == 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # agreeing values are silent
        agreeing = run(he_tiff, fitted_model, tmp_path / "same", mpp=0.5, cache_dir=tiff_prediction.cache.parent.parent)
    assert agreeing.adata.uns["virtualst"]["mpp_source"] == "argument"
    np.testing.assert_array_equal(agreeing.adata.X, tiff_prediction.adata.X)


def test_measured_sample_is_predicted_at_its_spots(train_sample, fitted_model, tmp_path):
    result = run(train_sample, fitted_model, tmp_path, pitch_um=None)
    adata = result.adata
    assert list(adata.obs_names) == list(train_sample.barcodes) and result.grid is None
    assert adata.uns["virtualst"]["grid"] == "measured" and "pitch_um" not in adata.uns["virtualst"]
    measured = adata.layers["measured"]
    assert measured.shape == adata.shape
    r = [np.corrcoef(measured[:, g], adata.X[:, g])[0, 1] for g in range(adata.n_vars)]
    assert np.mean(r) > 0.5  # the training spots themselves
    blocks = predict_spots(fitted_model, result.cache, result.sample, chunk_spots=5)
    np.testing.assert_allclose(blocks.layers["measured"], measured)
    np.testing.assert_allclose(blocks.X, adata.X, rtol=1e-6)


def test_unreadable_slide_is_an_input_error(tmp_path, fitted_model):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(InputError, match=r"broken\.tif: cannot read image"):
        run(bad, fitted_model, tmp_path / "out")
    with pytest.raises(InputError, match="no such file"):
        run(tmp_path / "missing.svs", fitted_model, tmp_path / "out")


@pytest.mark.realdata
def test_her2st_section_predicted_at_measured_spots(her2st_dir, tmp_path):
    import virtualst
    from virtualst.embed.runner import EmbedSettings, embed_samples
    from virtualst.embed.tiling import TileSpec
    from virtualst.heads.predictor import GenePredictor
    from virtualst.heads.targets import TargetSpec

    train = [virtualst.read(her2st_dir, sample_id=s).in_tissue() for s in ("C2", "C3", "C4")]
    settings = EmbedSettings(tile=TileSpec(px=TEST_TILE_PX), batch_size=32, device="cpu")  # small tiles: ~10x faster than 224 px
    caches = embed_samples(train, tmp_path / "cache", settings, show_progress=False)
    model = GenePredictor(head="ridge", target=TargetSpec("cpm-log1p", "hvg:20")).fit(caches, train)
    result = run(her2st_dir, model, tmp_path / "out", sample_id="C5", cache_dir=tmp_path / "cache")
    adata = ad.read_h5ad(result.h5ad)
    c5 = virtualst.read(her2st_dir, sample_id="C5").in_tissue()
    assert list(adata.obs_names) == list(c5.barcodes) and adata.n_vars == 20
    assert adata.uns["virtualst"]["grid"] == "measured" and adata.uns["virtualst"]["mpp_source"] == "sample"
    measured = adata.layers["measured"]
    r = [np.corrcoef(measured[:, g], adata.X[:, g])[0, 1] for g in range(adata.n_vars)]
    assert np.nanmean(r) > 0
    mask = adata.uns["virtualst"]["tissue_mask"]
    hires = adata.uns["spatial"]["C5"]["images"]["hires"]
    assert mask.shape == hires.shape[:2] and 0.05 < mask.mean() < 0.5
