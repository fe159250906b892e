"""AnnData export: scanpy/squidpy layout, h5ad roundtrip, atomic writes."""

from __future__ import annotations

import importlib.util
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

import virtualst
from virtualst.anndata_io import sample_to_anndata, write_h5ad_atomic
from virtualst.embed.images import open_image
from virtualst.sample import Sample


@pytest.fixture
def sample(tmp_path) -> Sample:
    Image.new("RGB", (400, 200), (240, 180, 230)).save(tmp_path / "he.jpg")
    spots = pd.DataFrame({"barcode": ["a", "b", "c"], "x": [50.0, 150.0, 350.0], "y": [20.0, 100.0, 190.0],
                          "in_tissue": [True, False, True], "array_row": [0, 1, 2], "array_col": [0, 2, 4]})
    return Sample(
        sample_id="S1", spots=spots, um_per_px=0.5, spot_diameter_um=55.0, image=open_image(tmp_path / "he.jpg"),
        counts=sp.csr_matrix(np.array([[1, 0], [2, 3], [0, 4]], dtype=np.int32)), genes=np.array(["G1", "G2"]),
        patient_id="P1", source=tmp_path, metadata={"reader": "test", "image_path": str(tmp_path / "he.jpg"),
                                                    "fit": {"a": np.float64(1.5)}, "missing": None},
    )


def test_layout(sample):
    adata = sample_to_anndata(sample, hires_max_px=100)
    assert adata.shape == (3, 2) and sp.issparse(adata.X) and adata.X.dtype == np.int32
    assert list(adata.obs_names) == ["a", "b", "c"] and list(adata.var_names) == ["G1", "G2"]
    assert adata.obs["in_tissue"].tolist() == [True, False, True] and "array_row" in adata.obs
    np.testing.assert_array_equal(adata.obsm["spatial"], sample.centers)
    lib = adata.uns["spatial"]["S1"]
    assert lib["images"]["hires"].shape == (50, 100, 3) and lib["images"]["hires"].dtype == np.uint8
    assert lib["scalefactors"]["tissue_hires_scalef"] == pytest.approx(100 / 400)
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(110.0)
    info = adata.uns["virtualst"]
    assert (info["sample_id"], info["patient_id"], info["um_per_px"], info["spot_diameter_um"]) == ("S1", "P1", 0.5, 55.0)
    assert json.loads(info["metadata_json"])["fit"] == {"a": 1.5}


def test_hires_never_enlarged(sample):
    hires = sample_to_anndata(sample, hires_max_px=2000).uns["spatial"]["S1"]["images"]["hires"]
    assert max(hires.shape[:2]) <= 400


def test_roundtrip(sample, tmp_path):
    path = sample.write_h5ad(tmp_path / "out" / "S1.h5ad", hires_max_px=64)
    assert not list(path.parent.glob("*.partial"))
    adata = ad.read_h5ad(path)
    assert adata.shape == (3, 2) and adata.X.toarray().tolist() == [[1, 0], [2, 3], [0, 4]]
    assert max(adata.uns["spatial"]["S1"]["images"]["hires"].shape[:2]) <= 64
    again = virtualst.read(path)  # the export carries its own pixel size and image path
    assert (again.sample_id, again.patient_id, again.um_per_px, again.spot_diameter_um) == ("S1", "P1", 0.5, 55.0)
    assert again.image.dimensions == (400, 200)
    np.testing.assert_array_equal(again.centers, sample.centers)


def test_without_counts_or_image(sample):
    bare = Sample(sample_id="S2", spots=sample.spots, um_per_px=1.0, spot_diameter_um=100.0)
    adata = sample_to_anndata(bare)
    assert adata.shape == (3, 0)
    assert adata.uns["spatial"]["S2"]["images"] == {} and adata.uns["virtualst"]["patient_id"] == ""


def test_duplicate_gene_names_made_unique(sample):
    sample.genes = np.array(["G1", "G1"])
    sample.metadata["gene_ids"] = np.array(["E1", "E2"])
    adata = sample_to_anndata(sample, hires_max_px=16)
    assert list(adata.var_names) == ["G1", "G1-1"] and list(adata.var["gene_ids"]) == ["E1", "E2"]


def test_atomic_write_failure_leaves_nothing(sample, tmp_path, monkeypatch):
    adata = sample_to_anndata(sample, hires_max_px=16)
    target = tmp_path / "x.h5ad"
    target.write_text("previous")

    def broken(self, filename, **kw):
        with open(filename, "wb") as fh:
            fh.write(b"\x89HDF half written")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken)
    with pytest.raises(OSError, match="disk full"):
        write_h5ad_atomic(adata, target)
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["he.jpg", "x.h5ad"]


def test_atomic_write_gives_the_usual_file_mode(sample, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = write_h5ad_atomic(sample_to_anndata(sample, hires_max_px=16), tmp_path / "y.h5ad")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600: others may read the predictions


def test_real_visium_export(visium_dir, tmp_path):
    with pytest.warns(UserWarning, match="flat colour"):
        s = virtualst.read(visium_dir)
    path = s.write_h5ad(tmp_path / "v.h5ad", hires_max_px=500)
    adata = ad.read_h5ad(path)
    scales = adata.uns["spatial"]["visium_tiny"]["scalefactors"]
    original = json.loads((visium_dir / "spatial" / "scalefactors_json.json").read_text())
    assert scales["spot_diameter_fullres"] == pytest.approx(original["spot_diameter_fullres"])
    hires = adata.uns["spatial"]["visium_tiny"]["images"]["hires"]
    assert max(hires.shape[:2]) <= 500
    assert scales["tissue_hires_scalef"] * s.image.extent[0] == pytest.approx(hires.shape[1])
    assert adata.shape == (100, 100) and list(adata.var["gene_ids"][:1]) == ["ENSG00000243485"]


@pytest.mark.skipif(importlib.util.find_spec("scanpy") is None, reason="scanpy not installed (optional)")
def test_scanpy_reads_export(sample, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    adata = ad.read_h5ad(sample.write_h5ad(tmp_path / "s.h5ad", hires_max_px=100))
    sc.pl.spatial(adata, color="G1", library_id="S1", img_key="hires", show=False)
