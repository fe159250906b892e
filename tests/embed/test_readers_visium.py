"""Space Ranger reader: the real cut-down output and synthetic v1/v2/parquet layouts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from virtualst.embed.readers import read, visium
from virtualst.errors import InputError

COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
FULLRES = 400  # synthetic full-resolution side (px)
HIRES_SCALEF = 0.25
DIAMETER_PX = 27.5  # -> 2 µm/px


def write_matrix(path: Path, barcodes: list[str], n_genes: int = 4) -> np.ndarray:
    """Write a 10x v3 HDF5 matrix (genes x barcodes CSC); return the barcodes x genes counts."""
    counts = np.arange(len(barcodes) * n_genes).reshape(len(barcodes), n_genes) % 3
    csc = sp.csc_matrix(counts.T)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = csc.data.astype(np.int32), csc.indices, csc.indptr
        m["shape"] = np.array([n_genes, len(barcodes)])
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["features/name"] = np.array([f"Gene{i}" for i in range(n_genes)], dtype="S")
        m["features/id"] = np.array([f"ENSG{i:05d}" for i in range(n_genes)], dtype="S")
    return counts


def tissue_image(side: int, mode: str = "RGB") -> Image.Image:
    """A small non-uniform image (flat images are rejected as blank)."""
    ramp = np.linspace(0, 255, side * side * len(mode)).astype(np.uint8)
    return Image.fromarray(ramp.reshape(side, side, len(mode)), mode)


def write_outs(outs: Path, fmt: str = "v1", n: int = 6, image: bool = True) -> Path:
    """Write a tiny Space Ranger ``outs/``: matrix, positions (v1/v2/parquet), scalefactors, hires PNG."""
    spatial = outs / "spatial"
    spatial.mkdir(parents=True)
    barcodes = [f"BC{i:03d}-1" for i in range(n)]
    write_matrix(outs / visium.MATRIX, barcodes[::-1])  # matrix order differs from positions order
    positions = pd.DataFrame(
        {
            "barcode": barcodes + ["EXTRA-1"],
            "in_tissue": [1] * n + [0],
            "array_row": list(range(n + 1)),
            "array_col": [2 * i for i in range(n + 1)],
            "pxl_row_in_fullres": [50 + 10 * i for i in range(n + 1)],  # y
            "pxl_col_in_fullres": [100 + 20 * i for i in range(n + 1)],  # x
        }
    )
    if fmt == "v1":
        positions.to_csv(spatial / "tissue_positions_list.csv", header=False, index=False)
    elif fmt == "v2":
        positions.to_csv(spatial / "tissue_positions.csv", index=False)
    else:
        positions.to_parquet(spatial / "tissue_positions.parquet", index=False)
    scales = {"spot_diameter_fullres": DIAMETER_PX, "tissue_hires_scalef": HIRES_SCALEF, "tissue_lowres_scalef": 0.1}
    (spatial / "scalefactors_json.json").write_text(json.dumps(scales))
    if image:
        side = int(FULLRES * HIRES_SCALEF)
        tissue_image(side, "RGBA").save(spatial / "tissue_hires_image.png")
    return outs


# ------------------------------------------------------------------ real data
@pytest.mark.realdata
def test_real_visium_tiny(visium_dir):
    # its hires PNG is all black: the reader falls back to the lowres PNG
    with pytest.warns(UserWarning, match="single flat colour; using tissue_lowres_image.png"):
        s = read(visium_dir)
    scales = json.loads((visium_dir / "spatial" / "scalefactors_json.json").read_text())
    # the data README says 49 spots; the files hold 100 barcodes (all under tissue)
    assert s.n_spots == 100 and len(s.genes) == 100 and s.counts.shape == (100, 100)
    assert s.um_per_px == pytest.approx(55 / scales["spot_diameter_fullres"])
    assert s.spot_diameter_um == 55
    assert s.sample_id == "visium_tiny" and s.patient_id is None
    assert s.metadata["image_scale"] == scales["tissue_lowres_scalef"]
    assert s.image.dimensions == (round(600 / scales["tissue_lowres_scalef"]),) * 2
    positions = pd.read_csv(visium_dir / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    first = s.spots.iloc[0]
    assert (first.x, first.y) == (positions.loc[first.barcode, 5], positions.loc[first.barcode, 4])
    with h5py.File(visium_dir / visium.MATRIX) as f:
        assert list(s.barcodes) == [b.decode() for b in f["matrix/barcodes"][:]]
    assert len(s.metadata["gene_ids"]) == 100


# ------------------------------------------------------------------ synthetic
@pytest.mark.parametrize("fmt", ["v1", "v2", "parquet"])
def test_position_formats(tmp_path, fmt):
    s = read(write_outs(tmp_path / "outs", fmt))
    assert list(s.barcodes) == [f"BC{i:03d}-1" for i in range(5, -1, -1)]  # matrix order, EXTRA-1 left out
    assert s.spots.iloc[-1][["x", "y", "array_row", "array_col"]].tolist() == [100, 50, 0, 0]
    assert s.um_per_px == pytest.approx(55 / DIAMETER_PX)
    assert s.image.dimensions == (FULLRES, FULLRES)
    assert s.counts.shape == (6, 4) and s.counts.dtype == np.int32
    assert list(s.genes) == ["Gene0", "Gene1", "Gene2", "Gene3"]


def test_run_folder_and_names(tmp_path):
    write_outs(tmp_path / "run7" / "outs")
    s = read(tmp_path / "run7", patient_id="P3")
    assert s.sample_id == "run7" and s.patient_id == "P3"
    assert read(tmp_path / "run7" / "outs").sample_id == "run7"
    assert read(tmp_path / "run7", sample_id="x").sample_id == "x"


def test_full_resolution_image(tmp_path):
    outs = write_outs(tmp_path / "outs")
    Image.new("RGB", (FULLRES, FULLRES)).save(tmp_path / "full.jpg")
    s = read(outs, image=tmp_path / "full.jpg")
    assert s.metadata["image_scale"] == 1.0 and s.image.dimensions == (FULLRES, FULLRES)


def test_lowres_fallback(tmp_path):
    outs = write_outs(tmp_path / "outs", image=False)
    tissue_image(40).save(outs / "spatial" / "tissue_lowres_image.png")
    assert read(outs).image.dimensions == (FULLRES, FULLRES)


def test_blank_hires(tmp_path):
    outs = write_outs(tmp_path / "outs")
    png = outs / "spatial" / "tissue_hires_image.png"
    Image.new("RGB", (100, 100)).save(png)
    with pytest.raises(InputError) as excinfo:
        read(outs)
    assert str(excinfo.value) == f"{png}: image is a single flat colour (no tissue): pass image="
    tissue_image(40).save(outs / "spatial" / "tissue_lowres_image.png")
    with pytest.warns(UserWarning, match="flat colour"):
        assert read(outs).metadata["image_scale"] == 0.1


def _message(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_no_image(tmp_path):
    outs = write_outs(tmp_path / "outs", image=False)
    with pytest.raises(InputError) as excinfo:
        read(outs)
    assert _message(excinfo).startswith(f"{outs / 'spatial'}: no image found")


def test_corrupt_image(tmp_path):
    outs = write_outs(tmp_path / "outs")
    png = outs / "spatial" / "tissue_hires_image.png"
    png.write_bytes(png.read_bytes()[:60])
    with pytest.raises(InputError) as excinfo:
        read(outs)
    assert _message(excinfo).startswith(str(png))


def test_spots_outside_image(tmp_path):
    outs = write_outs(tmp_path / "outs")
    Image.new("RGB", (120, 120)).save(tmp_path / "small.png")
    with pytest.raises(InputError, match="outside the 120x120 image"):
        read(outs, image=tmp_path / "small.png")


@pytest.mark.parametrize(
    "text, problem",
    [('{"spot_diameter_fullres": 27.5,', "malformed scalefactors JSON"),
     ('{"tissue_hires_scalef": 0.25}', "no spot_diameter_fullres"),
     ('{"spot_diameter_fullres": "big"}', "must be a number"),
     ('[1, 2]', "expected a JSON object"),
     ('{"spot_diameter_fullres": 27.5}', "no tissue_hires_scalef")],
)
def test_bad_scalefactors(tmp_path, text, problem):
    outs = write_outs(tmp_path / "outs")
    path = outs / "spatial" / "scalefactors_json.json"
    path.write_text(text)
    with pytest.raises(InputError) as excinfo:
        read(outs)
    message = _message(excinfo)
    assert message.startswith(str(path)) and problem in message, message


def test_missing_position_column(tmp_path):
    outs = write_outs(tmp_path / "outs", "v2")
    path = outs / "spatial" / "tissue_positions.csv"
    pd.read_csv(path).drop(columns="pxl_row_in_fullres").to_csv(path, index=False)
    with pytest.raises(InputError) as excinfo:
        read(outs)
    assert re.match(rf"{re.escape(str(path))}: missing column\(s\) pxl_row_in_fullres", _message(excinfo))


def test_v1_wrong_column_count(tmp_path):
    outs = write_outs(tmp_path / "outs", "v1")
    path = outs / "spatial" / "tissue_positions_list.csv"
    pd.read_csv(path, header=None).iloc[:, :5].to_csv(path, header=False, index=False)
    with pytest.raises(InputError, match="expected 6 columns"):
        read(outs)


def test_duplicate_barcodes(tmp_path):
    outs = write_outs(tmp_path / "outs", "v2")
    path = outs / "spatial" / "tissue_positions.csv"
    table = pd.read_csv(path)
    pd.concat([table, table.iloc[:1]]).to_csv(path, index=False)
    with pytest.raises(InputError, match="duplicate barcode 'BC000-1'"):
        read(outs)


def test_matrix_barcodes_without_position(tmp_path):
    outs = write_outs(tmp_path / "outs", "v2")
    path = outs / "spatial" / "tissue_positions.csv"
    pd.read_csv(path).iloc[2:].to_csv(path, index=False)
    with pytest.raises(InputError) as excinfo:
        read(outs)
    assert _message(excinfo).startswith(f"{path}: 2 of 6 matrix barcodes have no position")


def test_zero_spots(tmp_path):
    outs = write_outs(tmp_path / "outs")
    write_matrix(outs / visium.MATRIX, [])
    with pytest.raises(InputError, match="zero spots"):
        read(outs)


def test_missing_matrix_is_not_visium(tmp_path):
    outs = write_outs(tmp_path / "outs")
    (outs / visium.MATRIX).unlink()
    assert not visium.detect(outs)
    with pytest.raises(InputError, match="not a recognised sample: expected"):
        read(outs)
