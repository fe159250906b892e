"""Legacy Spatial Transcriptomics (Ståhl et al. 2016): her2st and STUtility layouts.

Two directory layouts are recognised:

her2st
    ``ST-cnts/{id}.tsv.gz`` (counts, rows ``"{x}x{y}"``, one column per gene),
    ``ST-spotfiles/{id}_selection.tsv`` (``x y new_x new_y pixel_x pixel_y selected``)
    and ``ST-imgs/{patient}/{id}/*.jpg``. The patient id is the ``{patient}``
    folder name (the letter, e.g. ``C``).
STUtility
    ``{id}.tsv`` counts, ``alignment_table_{id}.tsv`` spot table and ``{id}.jpg``
    side by side. The patient is unknown (``None``) unless passed, except for
    STUtility's mouse olfactory bulb example, where MOB1 and MOB2 come from one
    animal (``"animal1"``) and MOB3 from another (``"animal2"``).

Decisions
---------
* Counts rows are matched to spots by ``"{x}x{y}"`` built from the integer
  array columns ``x``/``y`` (the real files use those, not ``new_x``/``new_y``).
* Spots of the spot table without a counts row were not measured: they are
  dropped and listed in ``metadata["spots_without_counts"]``.
* Counts rows without a spot have no position: they are dropped with a
  warning and listed in ``metadata["counts_rows_without_spot"]``; with
  ``unmatched="error"``, or when they are most of the counts rows (a sign of a
  wrong pair of files), or when nothing matches, reading fails instead.
* µm per pixel comes from the array itself: ``pixel = a * array + b`` is fitted
  by least squares on x and y separately over every row of the spot table.
  Neighbours in one array row are 200 µm apart; they are 1 index apart on the
  1k array and 2 apart on the staggered 2k array (where ``x + y`` has one
  parity for every spot). Hence ``um_per_px = 200 / (step * mean(|a_x|, |a_y|))``.
* ``in_tissue`` is the ``selected`` column when present, else true everywhere.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from virtualst.errors import InputError
from virtualst.sample import Sample

from ._common import check_unique, open_checked, preview, require_columns, require_file

log = logging.getLogger(__name__)

NAME = "legacy_st"
DESCRIPTION = "a legacy ST directory or counts file (her2st ST-cnts/ST-spotfiles/ST-imgs, or STUtility alignment_table_*.tsv)"

SPOT_PITCH_UM = 200.0
SPOT_DIAMETER_UM = 100.0
SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
#: STUtility's mouse olfactory bulb example: MOB1-2 from one animal, MOB3 from another.
MOB_ANIMALS = {"MOB1": "animal1", "MOB2": "animal1", "MOB3": "animal2"}

_BARCODE = re.compile(r"^\s*(-?\d+)x(-?\d+)\s*$")


@dataclass(frozen=True)
class LegacyFiles:
    """Where the parts of one legacy ST section live."""

    sample_id: str
    counts: Path
    spots: Path
    image: Path | None
    patient_id: str | None
    layout: str  # "her2st" or "stutility"


# ------------------------------------------------------------------ layout
def _section_id(counts: Path) -> str:
    name = counts.name
    for suffix in (".tsv.gz", ".tsv"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return counts.stem


def _first_existing(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def _stutility_spot_file(folder: Path, sample_id: str) -> Path | None:
    return _first_existing(
        folder / f"alignment_table_{sample_id}.tsv", folder / f"alignment_table_{sample_id}.tsv.gz"
    )


def _is_counts_name(path: Path) -> bool:
    return path.name.endswith((".tsv", ".tsv.gz")) and not path.name.startswith("alignment_table_")


def detect(path: Path) -> bool:
    """True for a her2st root, a STUtility folder, or one of their counts files."""
    path = Path(path)
    if path.is_dir():
        return (path / "ST-cnts").is_dir() or any(path.glob("alignment_table_*.tsv*"))
    if path.is_file() and _is_counts_name(path):
        if path.parent.name == "ST-cnts" and (path.parent.parent / "ST-spotfiles").is_dir():
            return True
        return _stutility_spot_file(path.parent, _section_id(path)) is not None
    return False


def list_samples(path: Path) -> list[str]:
    """Section ids found at ``path`` (one id for a counts file)."""
    path = Path(path)
    if path.is_file():
        return [_section_id(path)]
    if (path / "ST-cnts").is_dir():
        return sorted(_section_id(p) for p in (path / "ST-cnts").iterdir() if _is_counts_name(p))
    return sorted(p.name[len("alignment_table_") :].split(".tsv")[0] for p in path.glob("alignment_table_*.tsv*"))


def _her2st_image(root: Path, sample_id: str) -> tuple[Path | None, str | None]:
    images = sorted(
        p for p in (root / "ST-imgs").glob(f"*/{sample_id}/*") if p.suffix.lower() in IMAGE_SUFFIXES
    )
    if len(images) > 1:
        raise InputError(
            images[0].parent, f"several images for {sample_id} ({preview(p.name for p in images)}): pass image="
        )
    if not images:
        return None, None
    return images[0], images[0].parent.parent.name


def locate(path: Path, sample_id: str | None = None) -> LegacyFiles:
    """Find the counts, spot table and image of one section.

    Raises
    ------
    InputError
        When ``path`` holds several sections and ``sample_id`` is not given,
        when ``sample_id`` is not among them, or when a file is missing.
    """
    path = Path(path)
    if path.is_file():
        if sample_id is not None and sample_id != _section_id(path):
            raise InputError(path, f"sample_id {sample_id!r} does not match the counts file")
        sample_id = _section_id(path)
        root = path.parent.parent if path.parent.name == "ST-cnts" else None
        folder = path.parent
    else:
        ids = list_samples(path)
        if not ids:
            raise InputError(path, "no legacy ST counts files found")
        if sample_id is None:
            if len(ids) > 1:
                raise InputError(
                    path, f"holds {len(ids)} sections ({', '.join(ids)}): pass sample_id= or use read_all()"
                )
            sample_id = ids[0]
        elif sample_id not in ids:
            raise InputError(path, f"no section {sample_id!r} here (found: {', '.join(ids)})")
        root = path if (path / "ST-cnts").is_dir() else None
        folder = path

    if root is not None:
        counts = _first_existing(root / "ST-cnts" / f"{sample_id}.tsv.gz", root / "ST-cnts" / f"{sample_id}.tsv")
        counts = require_file(counts or root / "ST-cnts" / f"{sample_id}.tsv.gz", "counts file")
        spots = require_file(root / "ST-spotfiles" / f"{sample_id}_selection.tsv", "spot table")
        image, patient = _her2st_image(root, sample_id)
        if patient is None:  # no image folder: the her2st id starts with the patient letter
            match = re.match(r"[A-Za-z]+", sample_id)
            patient = match.group(0) if match else None
        return LegacyFiles(sample_id, counts, spots, image, patient, "her2st")

    counts = _first_existing(folder / f"{sample_id}.tsv", folder / f"{sample_id}.tsv.gz")
    counts = require_file(counts or folder / f"{sample_id}.tsv", "counts file")
    spots = _stutility_spot_file(folder, sample_id)
    spots = require_file(spots or folder / f"alignment_table_{sample_id}.tsv", "spot table")
    image = _first_existing(*(folder / f"{sample_id}{s}" for s in IMAGE_SUFFIXES))
    return LegacyFiles(sample_id, counts, spots, image, MOB_ANIMALS.get(sample_id), "stutility")


# ------------------------------------------------------------------ tables
def read_counts(path: Path) -> tuple[pd.Index, sp.csr_matrix, np.ndarray]:
    """Read a spots x genes counts table with ``"{x}x{y}"`` row names.

    Returns
    -------
    barcodes, counts, genes
        Row names, CSR counts (int32 when integral, else float32), gene names.
    """
    try:
        table = pd.read_csv(path, sep="\t", index_col=0)
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot read counts table ({' '.join(str(exc).split())})") from exc
    if table.shape[0] == 0:
        raise InputError(path, "counts table has zero spots")
    if table.shape[1] == 0:
        raise InputError(path, "counts table has no gene columns (expected tab-separated values)")
    index = table.index.astype(str)
    check_unique(pd.Series(index), path, "counts row")
    bad = [b for b in index if not _BARCODE.match(b)]
    if bad:
        raise InputError(path, f"{len(bad)} counts row name(s) are not '{{x}}x{{y}}' array positions, e.g. {bad[0]!r}")
    non_numeric = [c for c, t in table.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
    if non_numeric:
        raise InputError(path, f"non-numeric counts in column(s) {preview(non_numeric)}")
    values = table.to_numpy()
    dtype = np.int32 if np.issubdtype(values.dtype, np.integer) else np.float32
    barcodes = pd.Index([f"{int(m.group(1))}x{int(m.group(2))}" for m in map(_BARCODE.match, index)])
    return barcodes, sp.csr_matrix(values.astype(dtype)), table.columns.to_numpy(dtype=str)


def read_spot_table(path: Path) -> pd.DataFrame:
    """Read an ST spot table and add ``barcode`` (``"{x}x{y}"``) and ``in_tissue``."""
    try:
        table = pd.read_csv(path, sep="\t")
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot read spot table ({' '.join(str(exc).split())})") from exc
    require_columns(table, SPOT_COLUMNS, path)
    if len(table) == 0:
        raise InputError(path, "spot table has zero spots")
    for column in SPOT_COLUMNS:
        if not pd.api.types.is_numeric_dtype(table[column]) or table[column].isna().any():
            raise InputError(path, f"column {column} must hold numbers in every row")
    array = table[["x", "y"]].to_numpy(dtype=float)
    if not np.allclose(array, np.round(array)):
        raise InputError(path, "array columns x, y must be whole numbers")
    table["x"] = table["x"].round().astype(int)
    table["y"] = table["y"].round().astype(int)
    table.insert(0, "barcode", [f"{x}x{y}" for x, y in zip(table["x"], table["y"])])
    check_unique(table["barcode"], path, "array position")
    table["in_tissue"] = table["selected"].astype(bool) if "selected" in table.columns else True
    return table


def fit_um_per_px(table: pd.DataFrame, path: Path) -> tuple[float, dict[str, Any]]:
    """µm per pixel from the pixel distance between array neighbours.

    Parameters
    ----------
    table
        Spot table with ``x``, ``y`` (array) and ``pixel_x``, ``pixel_y``.
    path
        Named in the error when the fit is impossible.

    Returns
    -------
    um_per_px, details
        The pixel size, and the fit (slopes, lattice step, residual RMS).
    """
    x, y = table["x"].to_numpy(float), table["y"].to_numpy(float)
    if np.unique(x).size < 2 or np.unique(y).size < 2:
        raise InputError(
            path, "cannot derive the pixel size: spots span fewer than two array rows or columns (pass um_per_px=)"
        )
    a_x, b_x = np.polyfit(x, table["pixel_x"].to_numpy(float), 1)
    a_y, b_y = np.polyfit(y, table["pixel_y"].to_numpy(float), 1)
    # staggered 2k arrays only use positions where x + y has one parity
    step = 2 if np.unique((table["x"] + table["y"]) % 2).size == 1 else 1
    px_per_pitch = step * (abs(a_x) + abs(a_y)) / 2
    if not px_per_pitch > 0:
        raise InputError(path, "cannot derive the pixel size: pixel coordinates do not follow the array")
    residual = np.hypot(
        table["pixel_x"].to_numpy(float) - (a_x * x + b_x), table["pixel_y"].to_numpy(float) - (a_y * y + b_y)
    )
    details = {
        "px_per_array_unit_x": float(a_x),
        "px_per_array_unit_y": float(a_y),
        "lattice_step": step,
        "fit_rms_px": float(np.sqrt(np.mean(residual**2))),
        "spot_pitch_um": SPOT_PITCH_UM,
    }
    return SPOT_PITCH_UM / px_per_pitch, details


# ------------------------------------------------------------------ reader
def _match(
    spots: pd.DataFrame, barcodes: pd.Index, files: LegacyFiles, unmatched: str
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Rows of ``spots`` and of the counts that pair up, and what was left out."""
    in_counts = spots["barcode"].isin(barcodes).to_numpy()
    counts_only = barcodes[~barcodes.isin(spots["barcode"])].tolist()
    if not in_counts.any():
        raise InputError(
            files.counts,
            f"no counts row matches a spot of {files.spots.name} "
            f"(counts rows like {barcodes[0]!r}, spots like {spots['barcode'].iloc[0]!r})",
        )
    if counts_only and (unmatched == "error" or len(counts_only) > len(barcodes) / 2):
        raise InputError(
            files.counts,
            f"{len(counts_only)} of {len(barcodes)} counts rows have no spot in {files.spots.name} "
            f"(e.g. {preview(counts_only)})",
        )
    spot_rows = np.flatnonzero(in_counts)
    count_rows = barcodes.get_indexer(spots["barcode"].to_numpy()[spot_rows])
    no_counts = spots["barcode"][~in_counts].tolist()
    return spot_rows, count_rows, counts_only, no_counts


def read(
    path: Path,
    *,
    sample_id: str | None = None,
    patient_id: str | None = None,
    image: Any = None,
    um_per_px: float | None = None,
    unmatched: str = "drop",
) -> Sample:
    """Read one legacy ST section.

    Parameters
    ----------
    path
        her2st root, STUtility folder, or a counts file inside either.
    sample_id
        Section to read when ``path`` holds several.
    patient_id
        Overrides the patient found from the layout.
    image
        Image path or handle replacing the one found in the layout.
    um_per_px
        Overrides the pixel size fitted from the array.
    unmatched
        ``"drop"`` (default) drops counts rows without a spot with a warning;
        ``"error"`` refuses them.

    Returns
    -------
    Sample
        Spots with counts, in spot-table order; ``in_tissue`` from ``selected``.
    """
    if unmatched not in ("drop", "error"):
        raise ValueError(f"unmatched must be 'drop' or 'error', got {unmatched!r}")
    files = locate(Path(path), sample_id)
    table = read_spot_table(files.spots)
    if um_per_px is None:
        um_per_px, fit = fit_um_per_px(table, files.spots)
    else:
        fit = {"um_per_px_given": True}

    barcodes, counts, genes = read_counts(files.counts)
    spot_rows, count_rows, counts_only, no_counts = _match(table, barcodes, files, unmatched)
    if counts_only:
        warnings.warn(
            f"{files.counts}: dropped {len(counts_only)} counts row(s) without a spot in {files.spots.name} "
            f"(e.g. {preview(counts_only)})",
            stacklevel=2,
        )
    if no_counts:
        log.info("%s: %d spot(s) without counts dropped", files.spots, len(no_counts))

    if image is None:
        if files.image is None:
            raise InputError(files.spots.parent, f"no H&E image found for section {files.sample_id} (pass image=)")
        image = files.image
    handle = open_checked(image)

    spots = table.iloc[spot_rows].reset_index(drop=True)
    spots = spots.rename(columns={"x": "array_col", "y": "array_row"})
    spots["x"] = spots.pop("pixel_x").astype(float)
    spots["y"] = spots.pop("pixel_y").astype(float)
    keep = ["barcode", "x", "y", "in_tissue", "array_row", "array_col"]
    spots = spots[keep + [c for c in spots.columns if c not in keep]]

    return Sample(
        sample_id=files.sample_id,
        spots=spots,
        um_per_px=float(um_per_px),
        spot_diameter_um=SPOT_DIAMETER_UM,
        image=handle,
        counts=counts[count_rows],
        genes=genes,
        patient_id=patient_id if patient_id is not None else files.patient_id,
        source=files.counts,
        metadata={
            "reader": NAME,
            "technology": "Spatial Transcriptomics",
            "layout": files.layout,
            "counts_path": str(files.counts),
            "spots_path": str(files.spots),
            "image_path": str(image) if isinstance(image, (str, Path)) else None,
            "pixel_size_fit": fit,
            "spots_without_counts": no_counts,
            "counts_rows_without_spot": counts_only,
        },
    )
