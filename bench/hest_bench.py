"""Read a HEST-Benchmark task folder (e.g. ``{root}/IDC``) into :class:`SampleData`.

What HEST-Benchmark provides, per task folder:

``adata/{id}.h5ad``
    Raw counts in ``X`` (spots x genes), one spot per ``obs`` row named by
    its barcode, ``obsm['spatial']`` the spot centres in level-0 pixels.
``patches/{id}.h5``
    224 px tiles at 0.5 µm/px centred on the spots (see :mod:`virtualst.embed.patches`).
``splits/train_{k}.csv``, ``splits/test_{k}.csv``
    Columns ``sample_id, patches_path, expr_path`` (paths relative to the
    task folder); one fold per ``k``.
``var_50genes.json``
    ``{"genes": [...]}``: the task's 50 target genes.

What it does not provide, and what is assumed here:

* **Patients.** The split files name samples only (HEST made the folds
  patient-stratified). Patient ids come, in order, from a ``patient`` or
  ``patient_id`` column of the split files, from a metadata table (a CSV
  with ``id``/``sample_id`` and ``patient`` columns, such as HEST's
  ``HEST_v1_1_0.csv``, passed as ``metadata=`` or found at
  ``{task}/metadata.csv``), and from an explicit ``patients`` mapping, which
  wins over both. A sample with none is its own patient, and its folds say
  ``patients_known=False``.
* **Pixel size.** Level-0 µm/px comes from the metadata table's
  ``pixel_size_um_estimated`` when given; otherwise it is estimated from
  the patches themselves, which are 112 µm wide and centred on their spot:
  the spot centre lies 56 µm from the tile's top-left corner. When neither
  is possible, ``coords_um`` is NaN (with a warning).
* **Rows.** Expression rows are matched to patches by barcode, as HEST
  does; a patch whose barcode has no expression row is an error. Every gene
  of the h5ad is kept (the library size needs them all); the task's gene
  list selects the targets later.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from virtualst.bench.data import SampleData
from virtualst.bench.splits import Fold, SplitSpec, make_folds, read_split_tables
from virtualst.embed.cache import Embeddings, read_embeddings
from virtualst.embed.patches import PATCH_UM_PER_PX, PatchFile, embed_patches
from virtualst.embed.readers._common import positive_number
from virtualst.embed.readers.anndata_reader import load as load_h5ad
from virtualst.embed.runner import EmbedSettings
from virtualst.errors import InputError
from virtualst.heads.targets import read_gene_file

GENES_FILE = "var_50genes.json"
METADATA_FILE = "metadata.csv"
PATIENT_COLUMNS = ("patient", "patient_id")
ID_COLUMNS = ("sample_id", "id")
PIXEL_SIZE_COLUMN = "pixel_size_um_estimated"
#: Patches are this wide in µm (224 px at 0.5 µm/px) and centred on their spot.
PATCH_UM = 224 * PATCH_UM_PER_PX
#: Largest relative spread of per-spot pixel-size estimates still taken as one pixel size.
ESTIMATE_TOLERANCE = 0.05


@dataclass(frozen=True)
class HestEntry:
    """Files of one sample of a task."""

    sample_id: str
    patches: Path
    expr: Path
    listed_in: Path


def _known(value: object) -> str | None:
    text = "" if value is None else str(value).strip()
    return None if text.lower() in ("", "nan", "none", "na") else text


def _require_expr(entry: HestEntry) -> Path:
    if not entry.expr.is_file():
        raise InputError(entry.expr, f"expression file of sample {entry.sample_id!r} not found (listed in {entry.listed_in.name})")
    return entry.expr


def estimate_um_per_px(centers_px: np.ndarray, top_left_px: np.ndarray, tile_um: float = PATCH_UM) -> float | None:
    """Level-0 µm/px from spot centres and the top-left corners of tiles centred on them.

    Returns ``None`` when the offsets are not positive or disagree by more
    than :data:`ESTIMATE_TOLERANCE` (the tiles are then not centred on these spots).
    """
    offsets = np.asarray(centers_px, dtype=float) - np.asarray(top_left_px, dtype=float)
    if offsets.size == 0 or not (offsets > 0).all():
        return None
    estimates = (tile_um / 2) / offsets.ravel()
    median = float(np.median(estimates))
    spread = float(np.percentile(estimates, 95) - np.percentile(estimates, 5)) / median
    return median if spread <= ESTIMATE_TOLERANCE else None


class HestBenchTask:
    """One HEST-Benchmark task folder.

    Parameters
    ----------
    root
        The task folder (``{bench_root}/{task}``).
    metadata
        Optional CSV with ``id``/``sample_id`` and ``patient`` (and
        ``pixel_size_um_estimated``) columns; ``{root}/metadata.csv`` is used
        when present and this is ``None``.
    patients
        Sample id -> patient id, overriding every other source.
    """

    def __init__(self, root: str | Path, metadata: str | Path | None = None, patients: Mapping[str, str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(self.root, "HEST-Benchmark task folder not found")
        if not any((self.root / name).exists() for name in ("splits", "adata", "patches")):
            raise InputError(self.root, "not a HEST-Benchmark task folder (expected adata/, patches/, splits/, var_50genes.json)")
        default = self.root / METADATA_FILE
        self.metadata_path = Path(metadata) if metadata is not None else (default if default.is_file() else None)
        self.patients_override = dict(patients or {})

    @property
    def split_dir(self) -> Path:
        return self.root / "splits"

    @property
    def genes_path(self) -> Path:
        return self.root / GENES_FILE

    # ---------------------------------------------------------------- listing
    @cached_property
    def _split_tables(self) -> list:
        return read_split_tables(self.split_dir) if self.split_dir.is_dir() else []

    @cached_property
    def entries(self) -> dict[str, HestEntry]:
        """Samples named by the split files (or found in ``adata/`` when there are none), in first-seen order."""
        found: dict[str, HestEntry] = {}
        for _, train, test, train_path, test_path in self._split_tables:
            for table, path in ((train, train_path), (test, test_path)):
                for row in table.to_dict("records"):
                    entry = self._entry(row, path)
                    previous = found.setdefault(entry.sample_id, entry)
                    if (previous.patches, previous.expr) != (entry.patches, entry.expr):
                        raise InputError(path, f"sample {entry.sample_id!r} has other file paths than in {previous.listed_in.name}")
        if not self._split_tables:
            for h5ad in sorted((self.root / "adata").glob("*.h5ad")):
                found[h5ad.stem] = HestEntry(h5ad.stem, self.root / "patches" / f"{h5ad.stem}.h5", h5ad, h5ad.parent)
        if not found:
            raise InputError(self.root, "no samples: no split files and no adata/*.h5ad")
        return found

    def _entry(self, row: dict, listed_in: Path) -> HestEntry:
        sid = str(row["sample_id"])
        patches = _known(row.get("patches_path")) or f"patches/{sid}.h5"
        expr = _known(row.get("expr_path")) or f"adata/{sid}.h5ad"
        return HestEntry(sid, self.root / patches, self.root / expr, listed_in)

    @property
    def sample_ids(self) -> list[str]:
        return list(self.entries)

    def genes(self) -> list[str]:
        """The task's pinned target genes (``var_50genes.json``)."""
        return read_gene_file(self.genes_path)

    # ------------------------------------------------------------ metadata
    @cached_property
    def _metadata(self) -> pd.DataFrame | None:
        path = self.metadata_path
        if path is None:
            return None
        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (OSError, ValueError) as exc:
            raise InputError(path, f"cannot read metadata table ({exc})") from None
        id_column = next((c for c in ID_COLUMNS if c in table.columns), None)
        if id_column is None:
            raise InputError(path, f"metadata table needs a column {' or '.join(ID_COLUMNS)}")
        return table.drop_duplicates(id_column).set_index(id_column)

    def _from_splits(self) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for _, train, test, *_ in self._split_tables:
            for table in (train, test):
                column = next((c for c in PATIENT_COLUMNS if c in table.columns), None)
                if column:
                    found.update({s: _known(p) for s, p in zip(table["sample_id"], table[column]) if _known(p)})
        return found

    def _from_metadata(self) -> dict[str, str | None]:
        table = self._metadata
        column = None if table is None else next((c for c in PATIENT_COLUMNS if c in table.columns), None)
        if column is None:
            return {}
        return {s: _known(table.at[s, column]) for s in self.sample_ids if s in table.index and _known(table.at[s, column])}

    #: Patient sources, lowest precedence first (later ones override).
    PATIENT_SOURCES: tuple[Callable[[HestBenchTask], dict[str, str | None]], ...] = (_from_splits, _from_metadata)

    def patient_ids(self) -> dict[str, str | None]:
        """Sample id -> patient id, ``None`` where no source knows it."""
        found: dict[str, str | None] = dict.fromkeys(self.sample_ids)
        for source in self.PATIENT_SOURCES:
            found.update({s: p for s, p in source(self).items() if s in found})
        found.update({s: str(p) for s, p in self.patients_override.items() if s in found})
        return found

    def um_per_px(self, sample_id: str) -> float | None:
        """Level-0 µm/px from the metadata table, or ``None``."""
        table = self._metadata
        if table is None or PIXEL_SIZE_COLUMN not in table.columns or sample_id not in table.index:
            return None
        value = _known(table.at[sample_id, PIXEL_SIZE_COLUMN])
        return None if value is None else positive_number(value, self.metadata_path, PIXEL_SIZE_COLUMN)

    # ---------------------------------------------------------------- folds
    def folds(self, spec: str | SplitSpec = "official") -> list[Fold]:
        """Folds over the task's samples (the official split files by default)."""
        patients = self.patient_ids()
        return make_folds(spec, self.sample_ids, [patients[s] for s in self.sample_ids], split_dir=self.split_dir)

    # ------------------------------------------------------------------ data
    def patch_files(self) -> list[PatchFile]:
        """Every sample's patch file, checked to exist."""
        patients = self.patient_ids()
        files = []
        for sid, entry in self.entries.items():
            if not entry.patches.is_file():
                raise InputError(entry.patches, f"patch file of sample {sid!r} not found (listed in {entry.listed_in.name})")
            files.append(PatchFile(sid, entry.patches, um_per_px=self.um_per_px(sid), patient_id=patients[sid]))
        return files

    def sample_data(self, sample_id: str, embeddings: Embeddings) -> SampleData:
        """Counts of ``sample_id`` aligned to the rows of its patch embeddings."""
        entry = self.entries[sample_id]
        adata = load_h5ad(_require_expr(entry))
        obs = pd.Index(adata.obs_names.astype(str))
        if obs.has_duplicates:
            raise InputError(entry.expr, f"duplicate spot barcode {obs[obs.duplicated()][0]!r}")
        rows = obs.get_indexer(embeddings.barcodes)
        missing = embeddings.barcodes[rows < 0]
        if len(missing):
            raise InputError(
                entry.expr, f"{len(missing)} of {len(rows)} patch barcodes have no expression row (e.g. {', '.join(missing[:3])})"
            )
        counts = sp.csr_matrix(adata.X)[rows] if adata.X is not None else None
        if counts is None or counts.shape[1] == 0:
            raise InputError(entry.expr, "no counts in X")
        patient = self.patient_ids()[sample_id]
        return SampleData(
            sample_id=sample_id,
            patient_id=patient if patient is not None else sample_id,
            features=embeddings.features,
            counts=counts,
            genes=adata.var_names.to_numpy(dtype=str),
            coords_um=self._coords_um(sample_id, adata, rows, embeddings),
            barcodes=embeddings.barcodes,
        )

    def _coords_um(self, sample_id: str, adata, rows: np.ndarray, embeddings: Embeddings) -> np.ndarray:
        tile_um = float(embeddings.attrs.get("tile_um", PATCH_UM))
        centers = np.asarray(adata.obsm["spatial"], dtype=float)[rows, :2] if "spatial" in adata.obsm else None
        um = self.um_per_px(sample_id)
        if um is None and centers is not None:
            um = estimate_um_per_px(centers, embeddings.coords, tile_um)
        if um is None:
            warnings.warn(f"{sample_id}: level-0 pixel size unknown (no metadata, patches not centred on obsm['spatial']): coords_um are NaN")
            return np.full((len(rows), 2), math.nan)
        if centers is None:  # tiles are centred on their spot
            centers = embeddings.coords + tile_um / um / 2
        return centers * um

    def load(self, encoder: str, cache_dir: str | Path, settings: EmbedSettings | None = None, show_progress: bool = True) -> list[SampleData]:
        """Embed the patches (reusing caches) and return every sample's :class:`SampleData`."""
        settings = replace(settings or EmbedSettings(), encoder=encoder)
        files = self.patch_files()
        for entry in self.entries.values():  # fail before embedding rather than after
            _require_expr(entry)
        paths = embed_patches(files, cache_dir, settings, show_progress=show_progress)
        return [self.sample_data(f.sample_id, read_embeddings(p)) for f, p in zip(files, paths)]
