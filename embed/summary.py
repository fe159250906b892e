"""Human-readable summaries of samples and cache files (``virtualst info``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from virtualst.embed.cache import PARTIAL_SUFFIX, read_attrs, read_embeddings
from virtualst.errors import InputError
from virtualst.sample import Sample

CACHE_SUFFIXES = (".h5", ".hdf5", ".h5" + PARTIAL_SUFFIX)


def describe_cache(path: Path) -> str:
    """Summarise one embedding cache file."""
    if path.name.endswith(PARTIAL_SUFFIX):
        attrs = read_attrs(path)
        return (
            f"{path}: UNFINISHED cache of {attrs.get('sample_id')} by {attrs.get('encoder')}, "
            f"{attrs.get('n_done')} tiles done; re-run embed to resume"
        )
    emb = read_embeddings(path)
    a = emb.attrs
    lines = [
        f"{path}",
        f"  tiles             {len(emb)} x {emb.features.shape[1]} ({emb.features.dtype})",
        f"  complete          {a.get('complete', 'unknown (foreign file)')}",
    ]
    for key in ("encoder", "weights_source", "weights_revision", "weights_sha256", "pooling", "precision"):
        if key in a:
            lines.append(f"  {key:<17} {a[key]}")
    if "tile_um" in a:
        lines.append(f"  tile size         {a['tile_px']} px, {float(a['tile_um']):.1f} µm ({float(a['tile_um_per_px']):.3f} µm/px)")
    if "transform" in a:
        lines.append(f"  transform         {json.loads(a['transform'])}")
    for key in ("sample_id", "patient_id", "source", "virtualst_version", "device", "created_at"):
        if a.get(key):
            lines.append(f"  {key:<17} {a[key]}")
    return "\n".join(lines)


def describe_sample(sample: Sample) -> str:
    """Summarise one sample."""
    lines = [repr(sample)]
    if sample.image is not None:
        width, height = sample.image.dimensions
        lines.append(f"  image      {sample.image.path} ({width}x{height} level-0 px)")
    n_tissue = int(sample.spots["in_tissue"].sum())
    lines.append(f"  spots      {sample.n_spots} ({n_tissue} in tissue)")
    if sample.counts is not None and sample.counts.shape[1]:
        totals = np.asarray(sample.counts.sum(axis=1)).ravel()
        lines.append(f"  counts     median {np.median(totals):.0f} UMI/spot, {sample.counts.shape[1]} genes")
    return "\n".join(lines)


def describe(path: str | Path) -> str:
    """Summarise a cache file, or every sample found at ``path``."""
    from virtualst.embed.readers import read_all

    path = Path(path)
    unfinished = Path(str(path) + PARTIAL_SUFFIX)
    if not path.exists() and unfinished.exists():
        path = unfinished  # the run that writes it was interrupted
    if not path.exists():
        raise InputError(path, "no such file or directory")
    if path.name.endswith(CACHE_SUFFIXES):
        return describe_cache(path)
    return "\n".join(describe_sample(s) for s in read_all(path))
