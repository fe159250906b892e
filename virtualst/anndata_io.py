"""Export a :class:`~virtualst.sample.Sample` as AnnData, the way scanpy and squidpy read it.

Layout written::

    X                      counts (CSR, the sample's dtype); 0 genes when unsequenced
    obs                    index = barcodes; in_tissue, array_row, array_col, ...
    var                    index = gene names (made unique); gene_ids when known
    obsm['spatial']        (x, y) spot centres in full-resolution (level-0) pixels
    uns['spatial'][sample_id]
        images/hires       uint8 RGB thumbnail, longest side <= hires_max_px
        scalefactors       tissue_hires_scalef, spot_diameter_fullres
        metadata           source paths and reader (strings only)
    uns['virtualst']       sample_id, patient_id, um_per_px, spot_diameter_um,
                           image_path, metadata_json, version
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from virtualst.files import write_atomically

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

    from virtualst.sample import Sample


def _jsonable(value: Any) -> Any:
    """Make free-form metadata JSON-serialisable (arrays -> lists, paths -> str)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _var(sample: Sample, n_genes: int) -> pd.DataFrame:
    genes = [] if sample.genes is None else [str(g) for g in sample.genes]
    var = pd.DataFrame(index=pd.Index(genes, dtype=object))
    gene_ids = sample.metadata.get("gene_ids")
    if gene_ids is not None and len(gene_ids) == n_genes:
        var["gene_ids"] = np.asarray(gene_ids, dtype=str)
    if var.index.has_duplicates:  # Visium gene symbols repeat; keep them in a column
        var["gene_name"] = var.index.to_numpy()
        seen: dict[str, int] = {}
        unique = []
        for name in genes:
            k = seen.get(name, 0)
            unique.append(name if k == 0 else f"{name}-{k}")
            seen[name] = k + 1
        var.index = pd.Index(unique, dtype=object)
    return var


def _obs(sample: Sample) -> pd.DataFrame:
    obs = sample.spots.drop(columns=["x", "y"]).set_index("barcode")
    obs.index = obs.index.astype(str)
    obs.index.name = None
    obs["in_tissue"] = obs["in_tissue"].astype(bool)
    for column in obs.columns:  # h5ad cannot store mixed object columns
        if obs[column].dtype == object:
            obs[column] = obs[column].astype(str)
    return obs


def spatial_uns(sample: Sample, hires_max_px: int = 2000) -> dict[str, Any]:
    """``uns['spatial'][sample_id]`` for ``sample``: hires thumbnail, scale factors, metadata."""
    scalefactors = {"spot_diameter_fullres": float(sample.spot_diameter_um / sample.um_per_px)}
    images: dict[str, np.ndarray] = {}
    if sample.image is not None:
        hires = np.ascontiguousarray(sample.image.thumbnail(hires_max_px), dtype=np.uint8)
        images["hires"] = hires
        width = getattr(sample.image, "extent", sample.image.dimensions)[0]  # exact, unrounded
        # thumbnail pixels per full-resolution pixel, as scanpy multiplies obsm['spatial'] by it
        scalefactors["tissue_hires_scalef"] = float(hires.shape[1] / width)
    metadata = {
        k: str(v)
        for k, v in {
            "source": sample.source,
            "reader": sample.metadata.get("reader"),
            "technology": sample.metadata.get("technology"),
            "image_path": sample.metadata.get("image_path"),
        }.items()
        if v is not None
    }
    return {"images": images, "scalefactors": scalefactors, "metadata": metadata}


def sample_to_anndata(sample: Sample, hires_max_px: int = 2000) -> ad.AnnData:
    """Build an AnnData from ``sample``.

    Parameters
    ----------
    sample
        The sample to export.
    hires_max_px
        Longest side of the embedded ``hires`` thumbnail.

    Returns
    -------
    anndata.AnnData
        With scanpy/squidpy spatial conventions (see the module docstring).
    """
    import anndata as ad  # imported here: keeps ``import virtualst`` light

    from virtualst._version import __version__

    if sample.counts is None:
        counts = sp.csr_matrix((sample.n_spots, 0), dtype=np.float32)
    else:
        counts = sp.csr_matrix(sample.counts)
    adata = ad.AnnData(X=counts, obs=_obs(sample), var=_var(sample, counts.shape[1]))
    adata.obsm["spatial"] = sample.centers
    adata.uns["spatial"] = {sample.sample_id: spatial_uns(sample, hires_max_px)}
    image_path = sample.metadata.get("image_path")
    metadata = {k: v for k, v in sample.metadata.items() if k != "gene_ids"}  # gene_ids live in var
    adata.uns["virtualst"] = {
        "sample_id": sample.sample_id,
        "patient_id": "" if sample.patient_id is None else str(sample.patient_id),
        "um_per_px": float(sample.um_per_px),
        "spot_diameter_um": float(sample.spot_diameter_um),
        "image_path": "" if image_path is None else str(image_path),
        "metadata_json": json.dumps(_jsonable(metadata)),
        "version": __version__,
    }
    return adata


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> Path:
    """Write ``adata`` to ``path`` so that a crash never leaves a valid-looking file.

    The data go to a hidden ``*.partial`` file in the same directory, which is
    renamed over ``path`` only once complete (a rename within one file system
    is atomic).

    Returns
    -------
    Path
        ``path``.
    """
    return write_atomically(path, lambda tmp: adata.write_h5ad(tmp))
