"""What one benchmark sample is once embedded: features aligned with counts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class SampleData:
    """One section's embeddings and measured counts, rows aligned by barcode.

    Parameters
    ----------
    sample_id
        Unique within a task.
    patient_id
        Patient (or animal) the section comes from; splits never put one
        patient on both sides unless the scheme says so.
    features : ndarray (n_spots, n_features)
        Tile embeddings.
    counts : scipy.sparse.csr_matrix (n_spots, n_genes)
        Raw counts.
    genes : ndarray (n_genes,) of str
    coords_um : ndarray (n_spots, 2)
        Spot centres in µm (for spatial context and smoothing).
    barcodes : ndarray (n_spots,) of str
    """

    sample_id: str
    patient_id: str
    features: np.ndarray
    counts: sp.csr_matrix
    genes: np.ndarray
    coords_um: np.ndarray
    barcodes: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.features)
        for name, rows in (("counts", self.counts.shape[0]), ("coords_um", len(self.coords_um)), ("barcodes", len(self.barcodes))):
            if rows != n:
                raise ValueError(f"{self.sample_id}: {name} has {rows} rows but features have {n}")
        if self.counts.shape[1] != len(self.genes):
            raise ValueError(f"{self.sample_id}: counts have {self.counts.shape[1]} genes but {len(self.genes)} names")

    @property
    def n_spots(self) -> int:
        return len(self.features)
