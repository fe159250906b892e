"""The in-memory ``Sample`` shared by every stage.

A sample is one tissue section: a lazily read image, the spot table in
level-0 pixel coordinates, the physical pixel size, and (when sequenced)
the counts matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from virtualst.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

    from virtualst.embed.images import SlideImage

SPOT_COLUMNS = ("barcode", "x", "y", "in_tissue")


@dataclass
class Sample:
    """One section with spots, image and (optionally) counts.

    Parameters
    ----------
    sample_id
        Unique name of the section; also the cache file name.
    spots
        Table with columns ``barcode`` (str), ``x``, ``y`` (spot centre in
        level-0 pixels of ``image``) and ``in_tissue`` (bool); extra columns
        such as ``array_row``/``array_col`` are kept.
    um_per_px
        Physical size of one level-0 pixel in micrometres.
    spot_diameter_um
        Physical spot diameter (100 for legacy ST, 55 for Visium).
    image
        Lazy image handle; ``None`` when the sample has no image.
    counts
        Spots x genes raw counts (CSR), rows aligned with ``spots``.
    genes
        Gene names, one per counts column.
    patient_id
        Patient the section comes from; used for leak-free splits.
    source
        File or directory the sample was read from.
    metadata
        Free-form provenance (technology, organ, reader name...).
    """

    sample_id: str
    spots: pd.DataFrame
    um_per_px: float
    spot_diameter_um: float
    image: SlideImage | None = None
    counts: sp.csr_matrix | None = None
    genes: np.ndarray | None = None
    patient_id: str | None = None
    source: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`InputError` when the parts of the sample disagree."""
        where = self.source if self.source is not None else self.sample_id
        missing = [c for c in SPOT_COLUMNS if c not in self.spots.columns]
        if missing:
            raise InputError(where, f"spot table lacks column(s) {', '.join(missing)}")
        if len(self.spots) == 0:
            raise InputError(where, "the sample has zero spots")
        duplicated = self.spots["barcode"].duplicated()
        if duplicated.any():
            first = self.spots["barcode"][duplicated].iloc[0]
            raise InputError(where, f"duplicate spot barcode {first!r} ({int(duplicated.sum())} duplicates)")
        xy = self.spots[["x", "y"]].to_numpy(dtype=float)
        if not np.isfinite(xy).all():
            raise InputError(where, "spot coordinates contain NaN or infinite values")
        if not (np.isfinite(self.um_per_px) and self.um_per_px > 0):
            raise InputError(where, f"pixel size must be a positive number of µm, got {self.um_per_px}")
        if not (np.isfinite(self.spot_diameter_um) and self.spot_diameter_um > 0):
            raise InputError(where, f"spot diameter must be positive, got {self.spot_diameter_um}")
        if self.counts is not None:
            if self.counts.shape[0] != len(self.spots):
                raise InputError(
                    where, f"counts have {self.counts.shape[0]} rows but there are {len(self.spots)} spots"
                )
            if self.genes is None or len(self.genes) != self.counts.shape[1]:
                n = None if self.genes is None else len(self.genes)
                raise InputError(where, f"counts have {self.counts.shape[1]} genes but {n} gene names")
        if self.image is not None:
            width, height = self.image.dimensions
            outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
            if outside.any():
                first = self.spots["barcode"].iloc[int(np.argmax(outside))]
                raise InputError(
                    where,
                    f"{int(outside.sum())} spot centre(s) lie outside the {width}x{height} image "
                    f"(first: {first!r})",
                )

    # ------------------------------------------------------------- accessors
    @property
    def n_spots(self) -> int:
        """Number of spots."""
        return len(self.spots)

    @property
    def barcodes(self) -> np.ndarray:
        """Spot barcodes as a string array."""
        return self.spots["barcode"].to_numpy(dtype=str)

    @property
    def centers(self) -> np.ndarray:
        """Spot centres, shape (n_spots, 2), (x, y) in level-0 pixels."""
        return self.spots[["x", "y"]].to_numpy(dtype=np.float64)

    def subset(self, mask: np.ndarray) -> Sample:
        """Return a copy restricted to the spots where ``mask`` is true."""
        mask = np.asarray(mask, dtype=bool)
        return Sample(
            sample_id=self.sample_id,
            spots=self.spots.loc[mask].reset_index(drop=True),
            um_per_px=self.um_per_px,
            spot_diameter_um=self.spot_diameter_um,
            image=self.image,
            counts=None if self.counts is None else self.counts[mask],
            genes=self.genes,
            patient_id=self.patient_id,
            source=self.source,
            metadata=dict(self.metadata),
        )

    def in_tissue(self) -> Sample:
        """Return the spots under tissue only."""
        return self.subset(self.spots["in_tissue"].to_numpy(dtype=bool))

    def to_anndata(self, hires_max_px: int = 2000) -> ad.AnnData:
        """Export as AnnData with scanpy/squidpy spatial conventions."""
        from virtualst.anndata_io import sample_to_anndata

        return sample_to_anndata(self, hires_max_px=hires_max_px)

    def write_h5ad(self, path: str | Path, hires_max_px: int = 2000) -> Path:
        """Write :meth:`to_anndata` to ``path`` atomically."""
        from virtualst.anndata_io import write_h5ad_atomic

        return write_h5ad_atomic(self.to_anndata(hires_max_px=hires_max_px), path)

    def __repr__(self) -> str:
        n_genes = 0 if self.genes is None else len(self.genes)
        image = "no image" if self.image is None else f"image {self.image.dimensions[0]}x{self.image.dimensions[1]}"
        return (
            f"Sample({self.sample_id!r}, {self.n_spots} spots, {n_genes} genes, {image}, "
            f"{self.um_per_px:.3f} µm/px, spot {self.spot_diameter_um:g} µm, patient={self.patient_id!r})"
        )
