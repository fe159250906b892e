"""10x Space Ranger ``outs/`` directories (Visium).

Spots are the barcodes of ``filtered_feature_bc_matrix.h5``, in matrix order;
their positions come from ``spatial/tissue_positions.parquet``,
``spatial/tissue_positions.csv`` (v2, header) or
``spatial/tissue_positions_list.csv`` (v1, no header), tried in that order.
Positions are full-resolution pixels (x = ``pxl_col_in_fullres``,
y = ``pxl_row_in_fullres``). Visium spots are 55 µm wide, so
``um_per_px = 55 / spot_diameter_fullres``.

The image is the full-resolution image when given (``image=``), else the
hires PNG (scaled by ``tissue_hires_scalef``), else the lowres PNG.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from virtualst.errors import InputError
from virtualst.sample import Sample

from ._common import (
    check_unique,
    one_line,
    open_checked,
    positive_number,
    preview,
    read_json,
    require_columns,
    require_file,
)

NAME = "visium"
DESCRIPTION = "a Space Ranger outs/ directory (filtered_feature_bc_matrix.h5 + spatial/)"

SPOT_DIAMETER_UM = 55.0
MATRIX = "filtered_feature_bc_matrix.h5"
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")


def _outs(path: Path) -> Path:
    """Accept the run folder as well as its ``outs/``."""
    return path / "outs" if (path / "outs" / MATRIX).is_file() else path


def detect(path: Path) -> bool:
    """True for a directory holding the filtered matrix and a ``spatial/`` folder."""
    path = Path(path)
    if not path.is_dir():
        return False
    outs = _outs(path)
    return (outs / MATRIX).is_file() and (outs / "spatial").is_dir()


def list_samples(path: Path) -> list[str]:
    """One Space Ranger output is one sample."""
    return [_default_id(Path(path))]


def _default_id(path: Path) -> str:
    path = path.resolve()
    return path.parent.name if path.name == "outs" else path.name


# ------------------------------------------------------------------ matrix
def _text(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def read_matrix(path: Path) -> tuple[np.ndarray, sp.csr_matrix, np.ndarray, np.ndarray]:
    """Read a 10x HDF5 feature-barcode matrix (v3 layout) without anndata.

    Returns
    -------
    barcodes, counts, gene_names, gene_ids
        ``counts`` is barcodes x genes CSR.
    """
    require_file(path, "feature-barcode matrix")
    try:
        with h5py.File(path, "r") as f:
            if "matrix" not in f:
                raise InputError(path, "no 'matrix' group (expected a Space Ranger v3+ HDF5 matrix)")
            m = f["matrix"]
            needed = ["data", "indices", "indptr", "shape", "barcodes", "features/name", "features/id"]
            missing = [k for k in needed if k not in m]
            if missing:
                raise InputError(path, f"matrix lacks {', '.join(missing)}")
            n_genes, n_barcodes = (int(v) for v in m["shape"][:])
            genes_by_barcodes = sp.csc_matrix(
                (m["data"][:], m["indices"][:], m["indptr"][:]), shape=(n_genes, n_barcodes)
            )
            barcodes = _text(m["barcodes"][:])
            names, ids = _text(m["features/name"][:]), _text(m["features/id"][:])
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(path, f"cannot read feature-barcode matrix ({one_line(exc)})") from exc
    if len(barcodes) != n_barcodes or len(names) != n_genes:
        raise InputError(path, f"matrix shape {n_genes}x{n_barcodes} disagrees with its barcodes/features")
    counts = genes_by_barcodes.T.tocsr()
    if np.issubdtype(counts.dtype, np.floating) and np.all(np.mod(counts.data, 1) == 0):
        counts = counts.astype(np.int32)  # Space Ranger stores integer UMI counts
    return barcodes, counts, names, ids


# ------------------------------------------------------------------ positions
def find_positions(spatial: Path) -> Path:
    """The first positions file present in ``spatial/``."""
    for name in POSITION_FILES:
        if (spatial / name).is_file():
            return spatial / name
    raise InputError(spatial, f"no spot positions file ({', '.join(POSITION_FILES)})")


def read_positions(path: Path) -> pd.DataFrame:
    """Read any of the three tissue-position formats into one table."""
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            with path.open("r", encoding="utf-8") as handle:
                has_header = "barcode" in handle.readline()
            table = pd.read_csv(path, header=0 if has_header else None)
            if not has_header:
                if table.shape[1] != len(POSITION_COLUMNS):
                    raise InputError(
                        path, f"expected {len(POSITION_COLUMNS)} columns ({', '.join(POSITION_COLUMNS)}), found {table.shape[1]}"
                    )
                table.columns = list(POSITION_COLUMNS)
    except InputError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot read spot positions ({one_line(exc)})") from exc
    require_columns(table, POSITION_COLUMNS, path)
    table["barcode"] = table["barcode"].astype(str)
    check_unique(table["barcode"], path, "barcode")
    for column in POSITION_COLUMNS[1:]:
        if not pd.api.types.is_numeric_dtype(table[column]) or table[column].isna().any():
            raise InputError(path, f"column {column} must hold numbers in every row")
    return table


# ------------------------------------------------------------------ reader
def _scalefactors(spatial: Path) -> tuple[Path, dict[str, Any]]:
    path = spatial / "scalefactors_json.json"
    data = read_json(path, "scalefactors JSON")
    if "spot_diameter_fullres" not in data:
        raise InputError(path, "malformed scalefactors JSON: no spot_diameter_fullres")
    positive_number(data["spot_diameter_fullres"], path, "spot_diameter_fullres")
    return path, data


def _image(spatial: Path, scales_path: Path, scales: dict[str, Any], image: Any) -> tuple[Any, float, str]:
    """Pick the image: given full-res, else hires PNG, else lowres PNG."""
    if image is not None:
        return open_checked(image, scale=1.0), 1.0, str(image) if isinstance(image, (str, Path)) else "given"
    blank = []
    for level in ("hires", "lowres"):
        png = spatial / f"tissue_{level}_image.png"
        if png.is_file():
            key = f"tissue_{level}_scalef"
            if key not in scales:
                raise InputError(scales_path, f"malformed scalefactors JSON: no {key} for {png.name}")
            scale = positive_number(scales[key], scales_path, key)
            handle = open_checked(png, scale=scale)
            if _is_blank(handle):  # e.g. a cut-down output with an all-black hires PNG
                blank.append(png)
                continue
            if blank:
                warnings.warn(f"{blank[0]}: image is a single flat colour; using {png.name} instead", stacklevel=3)
            return handle, scale, str(png)
    if blank:
        raise InputError(blank[0], "image is a single flat colour (no tissue): pass image=")
    raise InputError(spatial, "no image found (tissue_hires_image.png / tissue_lowres_image.png): pass image=")


def _is_blank(handle: Any) -> bool:
    """True when a (small, PNG) image is one flat colour; cheap on Visium PNGs."""
    return bool(np.ptp(handle.thumbnail(64)) == 0)


def read(
    path: Path,
    *,
    sample_id: str | None = None,
    patient_id: str | None = None,
    image: Any = None,
) -> Sample:
    """Read a Space Ranger output.

    Parameters
    ----------
    path
        The ``outs/`` directory (or the run directory that contains it).
    sample_id
        Defaults to the directory name (the run folder for ``outs/``).
    patient_id
        Patient of the section; unknown (``None``) unless given.
    image
        Full-resolution H&E (path or handle); defaults to the hires PNG.
    """
    path = Path(path)
    outs = _outs(path)
    spatial = outs / "spatial"
    if not spatial.is_dir():
        raise InputError(outs, "no spatial/ folder")
    barcodes, counts, names, ids = read_matrix(outs / MATRIX)
    if len(barcodes) == 0:
        raise InputError(outs / MATRIX, "the matrix has zero spots")
    check_unique(pd.Series(barcodes), outs / MATRIX, "barcode")

    positions_path = find_positions(spatial)
    positions = read_positions(positions_path).set_index("barcode")
    missing = ~pd.Index(barcodes).isin(positions.index)
    if missing.any():
        raise InputError(
            positions_path,
            f"{int(missing.sum())} of {len(barcodes)} matrix barcodes have no position (e.g. {preview(barcodes[missing])})",
        )
    positions = positions.loc[barcodes]  # matrix order

    scales_path, scales = _scalefactors(spatial)
    diameter_px = float(scales["spot_diameter_fullres"])
    handle, image_scale, image_source = _image(spatial, scales_path, scales, image)

    spots = pd.DataFrame(
        {
            "barcode": barcodes.astype(str),
            "x": positions["pxl_col_in_fullres"].to_numpy(float),
            "y": positions["pxl_row_in_fullres"].to_numpy(float),
            "in_tissue": positions["in_tissue"].to_numpy().astype(bool),
            "array_row": positions["array_row"].to_numpy(int),
            "array_col": positions["array_col"].to_numpy(int),
        }
    )
    return Sample(
        sample_id=sample_id or _default_id(path),
        spots=spots,
        um_per_px=SPOT_DIAMETER_UM / diameter_px,
        spot_diameter_um=SPOT_DIAMETER_UM,
        image=handle,
        counts=counts,
        genes=names.astype(str),
        patient_id=patient_id,
        source=outs,
        metadata={
            "reader": NAME,
            "technology": "Visium",
            "positions_path": str(positions_path),
            "image_path": image_source,
            "image_scale": image_scale,
            "scalefactors": {k: float(v) for k, v in scales.items() if isinstance(v, (int, float))},
            "gene_ids": ids.astype(str),
        },
    )
