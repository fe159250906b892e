"""HEST-1k sample layout: ``st/{id}.h5ad``, ``wsis/{id}.tif``, ``metadata/{id}.json``.

Counts and ``obsm['spatial']`` (level-0 pixel centres) come from the h5ad,
the pixel size from ``pixel_size_um_estimated`` in the metadata JSON, the
spot diameter from its ``spot_diameter`` (µm; else 55 for Visium and 100 for
legacy ST by ``st_technology``), the patient from its ``patient`` field when
present. ``patches/{id}.h5`` is not needed to build the sample; its path is
kept in ``metadata["patches_path"]`` when it exists.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from virtualst.errors import InputError
from virtualst.sample import Sample

from ._common import open_checked, positive_number, read_json, require_file
from .anndata_reader import load, spots_and_counts

NAME = "hest"
DESCRIPTION = "a HEST-1k directory (st/{id}.h5ad, wsis/{id}.tif, metadata/{id}.json) or its st/{id}.h5ad"

WSI_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi")
#: Spot diameter (µm) by ``st_technology`` when the metadata has none.
DIAMETER_BY_TECHNOLOGY = {"visium": 55.0, "spatial transcriptomics": 100.0}
#: Metadata fields copied into ``Sample.metadata``.
KEPT_FIELDS = ("st_technology", "oncotree_code", "organ", "species", "magnification", "inter_spot_dist", "dataset_title")


def _root(path: Path) -> Path | None:
    """The HEST root for a root directory or an ``st/{id}.h5ad`` file."""
    if path.is_dir() and (path / "st").is_dir() and ((path / "metadata").is_dir() or (path / "wsis").is_dir()):
        return path
    if path.is_file() and path.suffix == ".h5ad" and path.parent.name == "st":
        return _root(path.parent.parent)
    return None


def detect(path: Path) -> bool:
    """True for a HEST-1k root or one of its ``st/*.h5ad`` files."""
    return _root(Path(path)) is not None


def list_samples(path: Path) -> list[str]:
    """Sample ids (``st/*.h5ad`` stems); one id for an h5ad file."""
    path = Path(path)
    if path.is_file():
        return [path.stem]
    return sorted(p.stem for p in (path / "st").glob("*.h5ad"))


def _resolve_id(path: Path, root: Path, sample_id: str | None) -> str:
    if path.is_file():
        if sample_id is not None and sample_id != path.stem:
            raise InputError(path, f"sample_id {sample_id!r} does not match the file")
        return path.stem
    ids = list_samples(root)
    if not ids:
        raise InputError(root / "st", "no .h5ad files")
    if sample_id is None:
        if len(ids) > 1:
            raise InputError(root, f"holds {len(ids)} samples ({', '.join(ids)}): pass sample_id= or use read_all()")
        return ids[0]
    if sample_id not in ids:
        raise InputError(root, f"no sample {sample_id!r} here (found: {', '.join(ids)})")
    return sample_id


def _spot_diameter(meta: dict[str, Any], path: Path) -> float:
    value = meta.get("spot_diameter")
    if value is not None and not (isinstance(value, float) and math.isnan(value)):
        return positive_number(value, path, "spot_diameter")
    technology = str(meta.get("st_technology", "")).lower()
    if technology in DIAMETER_BY_TECHNOLOGY:
        return DIAMETER_BY_TECHNOLOGY[technology]
    raise InputError(path, f"no spot_diameter and unknown st_technology {meta.get('st_technology')!r}")


def read(
    path: Path,
    *,
    sample_id: str | None = None,
    patient_id: str | None = None,
    image: Any = None,
    um_per_px: float | None = None,
) -> Sample:
    """Read one HEST-1k sample.

    Parameters
    ----------
    path
        HEST root (with ``sample_id`` when it holds several) or ``st/{id}.h5ad``.
    sample_id
        Sample to read.
    patient_id
        Overrides the metadata's ``patient``.
    image
        Overrides ``wsis/{id}.tif``.
    um_per_px
        Overrides ``pixel_size_um_estimated``.
    """
    path = Path(path)
    root = _root(path)
    if root is None:
        raise InputError(path, "not a HEST-1k directory (expected st/, wsis/, metadata/)")
    sid = _resolve_id(path, root, sample_id)

    meta_path = root / "metadata" / f"{sid}.json"
    meta = read_json(meta_path, "HEST metadata JSON")
    if um_per_px is None:
        if meta.get("pixel_size_um_estimated") is None:
            raise InputError(meta_path, "no pixel_size_um_estimated (pass um_per_px=)")
        um_per_px = positive_number(meta["pixel_size_um_estimated"], meta_path, "pixel_size_um_estimated")
    diameter = _spot_diameter(meta, meta_path)

    h5ad = require_file(root / "st" / f"{sid}.h5ad", "HEST expression file")
    spots, counts, genes = spots_and_counts(load(h5ad), h5ad)

    if image is None:
        image = next((root / "wsis" / f"{sid}{s}" for s in WSI_SUFFIXES if (root / "wsis" / f"{sid}{s}").is_file()), None)
        if image is None:
            raise InputError(root / "wsis", f"no whole-slide image for {sid} (expected wsis/{sid}.tif): pass image=")
    handle = open_checked(image)

    patient = patient_id or meta.get("patient")
    if isinstance(patient, float) and math.isnan(patient):  # HEST writes NaN for unknown
        patient = None
    patches = root / "patches" / f"{sid}.h5"
    return Sample(
        sample_id=sid,
        spots=spots,
        um_per_px=float(um_per_px),
        spot_diameter_um=diameter,
        image=handle,
        counts=counts,
        genes=genes,
        patient_id=None if patient is None else str(patient),
        source=h5ad,
        metadata={
            "reader": NAME,
            "technology": meta.get("st_technology"),
            "image_path": str(image) if isinstance(image, (str, Path)) else None,
            "metadata_path": str(meta_path),
            "patches_path": str(patches) if patches.is_file() else None,
            **{k: meta[k] for k in KEPT_FIELDS if k in meta},
        },
    )
