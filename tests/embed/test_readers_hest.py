"""HEST-1k reader on a tiny HEST-format directory written by the fixture."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile

from virtualst.embed.readers import find_reader, list_samples, read
from virtualst.errors import InputError

WSI_PX = (256, 320)  # (height, width)


def write_hest_sample(root: Path, sid: str = "TENX01", meta: dict | None = None, n: int = 5) -> Path:
    """Write st/{sid}.h5ad, wsis/{sid}.tif, metadata/{sid}.json and patches/{sid}.h5."""
    for sub in ("st", "wsis", "metadata", "patches"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    xy = np.column_stack([40 + 50 * np.arange(n), 30 + 40 * np.arange(n)]).astype(float)
    adata = ad.AnnData(
        X=sp.csr_matrix(rng.integers(0, 9, (n, 3)).astype(np.float32)),
        obs=pd.DataFrame({"in_tissue": [1] * (n - 1) + [0], "array_row": np.arange(n), "array_col": np.arange(n)},
                         index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=["ERBB2", "GATA3", "ESR1"]),
    )
    adata.obsm["spatial"] = xy
    adata.write_h5ad(root / "st" / f"{sid}.h5ad")
    tifffile.imwrite(root / "wsis" / f"{sid}.tif", rng.integers(0, 255, (*WSI_PX, 3), dtype=np.uint8))
    default = {"pixel_size_um_estimated": 0.5, "spot_diameter": 55.0, "inter_spot_dist": 100.0,
               "st_technology": "Visium", "oncotree_code": "IDC", "patient": "P01", "magnification": "20x"}
    (root / "metadata" / f"{sid}.json").write_text(json.dumps(default if meta is None else meta))
    with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
        f["img"] = np.zeros((n, 224, 224, 3), np.uint8)
        f["coords"] = (xy - 112).astype(np.int64)  # top-left corners
        f["barcode"] = np.array([[f"s{i}".encode()] for i in range(n)])
    return root


@pytest.fixture
def hest_root(tmp_path):
    return write_hest_sample(tmp_path / "hest")


def test_read_hest(hest_root):
    s = read(hest_root)
    assert s.metadata["reader"] == "hest"
    assert s.sample_id == "TENX01" and s.patient_id == "P01"
    assert s.um_per_px == 0.5 and s.spot_diameter_um == 55.0
    assert s.image.dimensions == (WSI_PX[1], WSI_PX[0])
    assert s.n_spots == 5 and list(s.genes) == ["ERBB2", "GATA3", "ESR1"]
    assert s.spots.loc[1, ["x", "y"]].tolist() == [90, 70]
    assert s.spots["in_tissue"].tolist() == [True] * 4 + [False]
    assert s.metadata["oncotree_code"] == "IDC" and s.metadata["patches_path"].endswith("TENX01.h5")


def test_h5ad_inside_hest_uses_hest_reader(hest_root):
    path = hest_root / "st" / "TENX01.h5ad"
    assert find_reader(path).name == "hest"
    assert read(path).um_per_px == 0.5


def test_several_samples(hest_root):
    write_hest_sample(hest_root, "TENX02", n=3)
    assert list_samples(hest_root) == ["TENX01", "TENX02"]
    with pytest.raises(InputError, match=r"2 samples \(TENX01, TENX02\)"):
        read(hest_root)
    assert read(hest_root, sample_id="TENX02").n_spots == 3


@pytest.mark.parametrize("patient", [None, float("nan")])
def test_unknown_patient(tmp_path, patient):
    meta = {"pixel_size_um_estimated": 0.5, "st_technology": "Spatial Transcriptomics"}
    if patient is not None:
        meta["patient"] = patient
    root = write_hest_sample(tmp_path / "h", meta=meta)
    s = read(root)
    assert s.patient_id is None and s.spot_diameter_um == 100.0  # from st_technology


def test_missing_pixel_size(tmp_path):
    root = write_hest_sample(tmp_path / "h", meta={"spot_diameter": 55.0})
    with pytest.raises(InputError) as excinfo:
        read(root)
    assert str(excinfo.value) == f"{root / 'metadata' / 'TENX01.json'}: no pixel_size_um_estimated (pass um_per_px=)"
    assert read(root, um_per_px=0.25).um_per_px == 0.25


def test_malformed_metadata(hest_root):
    path = hest_root / "metadata" / "TENX01.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="malformed HEST metadata JSON"):
        read(hest_root)


def test_missing_wsi(hest_root):
    (hest_root / "wsis" / "TENX01.tif").unlink()
    with pytest.raises(InputError, match="no whole-slide image for TENX01"):
        read(hest_root)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_corrupt_wsi(hest_root):
    path = hest_root / "wsis" / "TENX01.tif"
    path.write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(InputError) as excinfo:
        read(hest_root)
    assert str(excinfo.value).startswith(str(path)) and "\n" not in str(excinfo.value)


def test_spots_outside_wsi(hest_root):
    tifffile.imwrite(hest_root / "wsis" / "TENX01.tif", np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(InputError, match="outside the 100x100 image"):
        read(hest_root)


def test_missing_spatial(hest_root):
    path = hest_root / "st" / "TENX01.h5ad"
    adata = ad.read_h5ad(path)
    del adata.obsm["spatial"]
    adata.write_h5ad(path)
    with pytest.raises(InputError, match=r"no obsm\['spatial'\]"):
        read(hest_root)
