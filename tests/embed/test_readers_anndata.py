"""Generic .h5ad reader and the reader registry."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from virtualst.embed import readers
from virtualst.embed.readers import Reader, find_reader, read, register
from virtualst.errors import InputError


def write_h5ad(path: Path, *, n: int = 4, scalefactors: dict | None = None, spatial: bool = True) -> Path:
    adata = ad.AnnData(
        X=sp.csr_matrix(np.ones((n, 2), np.float32)),
        obs=pd.DataFrame(index=[f"b{i}" for i in range(n)]),
        var=pd.DataFrame(index=["A", "B"]),
    )
    if spatial:
        adata.obsm["spatial"] = np.column_stack([10 + 20 * np.arange(n), 15 + 10 * np.arange(n)]).astype(float)
    if scalefactors is not None:
        adata.uns["spatial"] = {"lib1": {"scalefactors": scalefactors, "images": {}}}
    adata.write_h5ad(path)
    return path


@pytest.fixture
def image(tmp_path):
    Image.new("RGB", (120, 80), (255, 200, 255)).save(tmp_path / "he.png")
    return tmp_path / "he.png"


def test_explicit_scale_and_image(tmp_path, image):
    path = write_h5ad(tmp_path / "sec.h5ad")
    s = read(path, image=image, um_per_px=0.5, spot_diameter_um=55, patient_id="P")
    assert s.metadata["reader"] == "anndata"
    assert (s.sample_id, s.patient_id, s.um_per_px, s.spot_diameter_um) == ("sec", "P", 0.5, 55)
    assert s.image.dimensions == (120, 80)
    assert s.spots["in_tissue"].all() and s.spots.loc[1, ["x", "y"]].tolist() == [30, 25]


def test_scale_from_scalefactors(tmp_path, image):
    path = write_h5ad(tmp_path / "sec.h5ad", scalefactors={"spot_diameter_fullres": 110.0, "tissue_hires_scalef": 0.1})
    s = read(path, image=image, spot_diameter_um=55)
    assert s.um_per_px == pytest.approx(0.5) and s.metadata["library_id"] == "lib1"


def test_no_pixel_size_is_an_error(tmp_path, image):
    path = write_h5ad(tmp_path / "sec.h5ad", scalefactors={"spot_diameter_fullres": 110.0})
    with pytest.raises(InputError) as excinfo:
        read(path, image=image)  # diameter in pixels but not in µm: no guessing
    assert str(excinfo.value).startswith(f"{path}: cannot determine the pixel size")


def test_without_image(tmp_path):
    s = read(write_h5ad(tmp_path / "sec.h5ad"), um_per_px=1.0, spot_diameter_um=100)
    assert s.image is None


def test_no_spatial(tmp_path):
    path = write_h5ad(tmp_path / "sec.h5ad", spatial=False)
    with pytest.raises(InputError, match=r"no obsm\['spatial'\]"):
        read(path, um_per_px=1.0, spot_diameter_um=55)


def test_corrupt_h5ad(tmp_path):
    path = tmp_path / "bad.h5ad"
    path.write_bytes(b"not hdf5")
    with pytest.raises(InputError) as excinfo:
        read(path, um_per_px=1.0, spot_diameter_um=55)
    assert str(excinfo.value).startswith(f"{path}: cannot read AnnData file") and "\n" not in str(excinfo.value)


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_duplicate_barcodes(tmp_path, image):
    path = tmp_path / "dup.h5ad"
    adata = ad.read_h5ad(write_h5ad(path))
    adata.obs_names = ["b0", "b1", "b1", "b3"]
    adata.write_h5ad(path)
    with pytest.raises(InputError, match="duplicate barcode 'b1'"):
        read(path, image=image, um_per_px=1.0, spot_diameter_um=55)


# ------------------------------------------------------------------ registry
def test_unrecognised(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError) as excinfo:
        read(tmp_path / "notes.txt")
    message = str(excinfo.value)
    assert message.startswith(f"{tmp_path / 'notes.txt'}: not a recognised sample: expected ")
    assert "Space Ranger" in message and "HEST" in message and "legacy ST" in message and ".h5ad" in message


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        read(tmp_path / "nope")


def test_register(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "READERS", list(readers.READERS))
    custom = Reader("custom", "a .custom file", lambda p: p.suffix == ".custom", lambda p, **kw: kw, lambda p: ["x"])
    register(custom, first=True)
    (tmp_path / "a.custom").write_text("")
    assert find_reader(tmp_path / "a.custom") is custom
    with pytest.raises(ValueError, match="already registered"):
        register(custom)
