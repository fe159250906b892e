"""Any ``.h5ad`` with ``obsm['spatial']`` (full-resolution pixel centres).

Pixel size, in order of precedence: ``um_per_px=``; ``uns['virtualst']``
(files written by :meth:`Sample.write_h5ad`); ``spot_diameter_um /
spot_diameter_fullres`` where the latter comes from
``uns['spatial'][library]['scalefactors']``. Nothing else: when none applies
the reader fails rather than guess.

The image is ``image=`` (a full-resolution image, level-0 pixels = the
``obsm['spatial']`` frame), else the source image recorded by virtualst when
that file still exists; otherwise the sample has no image. The low-resolution
images embedded in ``uns['spatial']`` are not used as the image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from virtualst.errors import InputError
from virtualst.sample import Sample

from ._common import check_unique, one_line, open_checked, positive_number

NAME = "anndata"
DESCRIPTION = "an .h5ad file with obsm['spatial']"


def detect(path: Path) -> bool:
    """True for an ``.h5ad`` file."""
    path = Path(path)
    return path.is_file() and path.suffix == ".h5ad"


def list_samples(path: Path) -> list[str]:
    """One file is one sample."""
    return [Path(path).stem]


def load(path: Path) -> Any:
    """``anndata.read_h5ad`` with read errors turned into :class:`InputError`."""
    import anndata  # imported here: keeps ``import virtualst`` light

    try:
        return anndata.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001  (h5py/anndata raise many types for bad files)
        raise InputError(path, f"cannot read AnnData file ({one_line(exc)})") from exc


def spots_and_counts(adata: Any, path: Path) -> tuple[pd.DataFrame, sp.csr_matrix, np.ndarray]:
    """Spot table, CSR counts and gene names from an AnnData with ``obsm['spatial']``."""
    if "spatial" not in adata.obsm:
        raise InputError(path, "no obsm['spatial'] spot coordinates")
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(path, f"obsm['spatial'] must have shape (n_spots, 2), got {xy.shape}")
    if adata.n_obs == 0:
        raise InputError(path, "the sample has zero spots")
    barcodes = pd.Series(adata.obs_names.astype(str))
    check_unique(barcodes, path, "barcode")
    obs = adata.obs
    spots = pd.DataFrame(
        {
            "barcode": barcodes.to_numpy(),
            "x": xy[:, 0],
            "y": xy[:, 1],
            "in_tissue": obs["in_tissue"].to_numpy().astype(bool) if "in_tissue" in obs else True,
        }
    )
    for column in ("array_row", "array_col"):
        if column in obs:
            spots[column] = obs[column].to_numpy()
    counts = adata.X
    counts = sp.csr_matrix(counts) if counts is not None else sp.csr_matrix((adata.n_obs, 0), dtype=np.float32)
    return spots, counts, adata.var_names.to_numpy(dtype=str)


def _library(adata: Any, library_id: str | None, path: Path) -> tuple[str | None, dict[str, Any]]:
    """The ``uns['spatial']`` entry to use, if any."""
    spatial = adata.uns.get("spatial", {})
    if not spatial:
        return None, {}
    if library_id is None:
        if len(spatial) > 1:
            raise InputError(path, f"uns['spatial'] holds several libraries ({', '.join(spatial)}): pass library_id=")
        library_id = next(iter(spatial))
    if library_id not in spatial:
        raise InputError(path, f"no library {library_id!r} in uns['spatial'] (found: {', '.join(spatial)})")
    return library_id, dict(spatial[library_id])


def read(
    path: Path,
    *,
    sample_id: str | None = None,
    patient_id: str | None = None,
    image: Any = None,
    um_per_px: float | None = None,
    spot_diameter_um: float | None = None,
    library_id: str | None = None,
) -> Sample:
    """Read an ``.h5ad`` with spot coordinates.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    sample_id, patient_id
        Default to ``uns['virtualst']`` values, else the library id / file stem.
    image
        Full-resolution image (path or handle) in the ``obsm['spatial']`` frame.
    um_per_px, spot_diameter_um
        Physical scale; see the module docstring for defaults.
    library_id
        Which ``uns['spatial']`` entry to use when there are several.
    """
    path = Path(path)
    adata = load(path)
    spots, counts, genes = spots_and_counts(adata, path)
    own = dict(adata.uns.get("virtualst", {}))
    library_id, library = _library(adata, library_id, path)
    scales = dict(library.get("scalefactors", {}))

    if spot_diameter_um is None and "spot_diameter_um" in own:
        spot_diameter_um = own["spot_diameter_um"]
    if um_per_px is None and "um_per_px" in own:
        um_per_px = own["um_per_px"]
    if um_per_px is None:
        if spot_diameter_um is None or "spot_diameter_fullres" not in scales:
            raise InputError(
                path,
                "cannot determine the pixel size: pass um_per_px= (or spot_diameter_um= with "
                "uns['spatial'][library]['scalefactors']['spot_diameter_fullres'])",
            )
        diameter_px = positive_number(scales["spot_diameter_fullres"], path, "spot_diameter_fullres")
        um_per_px = positive_number(spot_diameter_um, path, "spot_diameter_um") / diameter_px
    if spot_diameter_um is None:
        raise InputError(path, "unknown spot diameter: pass spot_diameter_um=")

    if image is None and own.get("image_path") and Path(own["image_path"]).is_file():
        image = Path(own["image_path"])  # reopen the source of a virtualst export
    handle = None if image is None else open_checked(image)

    extra = {}
    if "metadata_json" in own:
        try:
            extra = json.loads(own["metadata_json"])
        except (TypeError, ValueError):
            extra = {}
    return Sample(
        sample_id=sample_id or own.get("sample_id") or library_id or path.stem,
        spots=spots,
        um_per_px=positive_number(um_per_px, path, "um_per_px"),
        spot_diameter_um=positive_number(spot_diameter_um, path, "spot_diameter_um"),
        image=handle,
        counts=counts,
        genes=genes,
        patient_id=patient_id or own.get("patient_id") or None,
        source=path,
        metadata={
            **extra,
            "reader": NAME,
            "library_id": library_id,
            "image_path": str(image) if isinstance(image, (str, Path)) else None,
        },
    )
