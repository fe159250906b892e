"""Embed pre-cut patch files (HEST ``patches/{id}.h5``) into the embedding cache.

A HEST patch file holds ``img`` (N, 224, 224, 3) uint8 tiles at 0.5 µm/px
(112 µm of tissue) centred on the spots, ``coords`` (N, 2) the top-left
level-0 pixel of each tile, and ``barcode`` (N, 1) bytes. The tiles are fed
to the encoder as stored (no resampling) and the features land in the same
cache as slide embeddings, ``{cache}/{encoder}/{sample_id}.h5``, written
with the same :class:`~virtualst.embed.cache.CacheWriter` (batch by batch,
resumable, completion marker) and the runner's provenance attributes.

What the cache records, and what is not known:

* ``tile_px`` is the patch side and ``tile_um = tile_px x patch_um_per_px``
  (0.5 µm/px for HEST, so 224 px and 112 µm); ``coords`` are the file's own.
* ``um_per_px`` (the level-0 pixel size of the source slide) is not in the
  patch file: it is stored when the caller gives it (e.g. from HEST
  metadata) and is NaN otherwise. It does not enter the cache fingerprint,
  since the features do not depend on it.
* ``transform`` says the tiles were not resampled here; how HEST cut and
  resampled them is not recorded in the file.
* No ``edge`` flags: whether a patch crossed the slide edge is not known.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from virtualst.embed.cache import (
    BARCODE_KEYS,
    CacheWriter,
    cache_path,
    decode_strings,
    fingerprint,
)
from virtualst.embed.extractor import FeatureExtractor
from virtualst.embed.runner import (
    EmbedSettings,
    default_batch_size,
    make_extractor,
    plan_cache,
    provenance_attrs,
    stream_to_caches,
)
from virtualst.embed.tiling import TileSpec
from virtualst.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from virtualst.embed.encoders import Encoder

#: HEST patches: 224 px at 0.5 µm/px.
PATCH_UM_PER_PX = 0.5
IMAGE_KEY = "img"


@dataclass(frozen=True)
class PatchFile:
    """One patch file to embed and what is known about its slide.

    Parameters
    ----------
    sample_id
        Cache file name.
    path
        The ``.h5`` patch file.
    um_per_px
        Level-0 pixel size of the source slide, when known (metadata).
    patient_id
        Stored in the cache attributes.
    patch_um_per_px
        Pixel size of the stored tiles (0.5 for HEST).
    """

    sample_id: str
    path: Path
    um_per_px: float | None = None
    patient_id: str | None = None
    patch_um_per_px: float = PATCH_UM_PER_PX


@dataclass(frozen=True)
class PatchIndex:
    """The spots of a patch file, read without its pixels."""

    barcodes: np.ndarray
    coords: np.ndarray
    px: int

    @property
    def n(self) -> int:
        return len(self.barcodes)


def read_patch_index(path: str | Path) -> PatchIndex:
    """Barcodes, top-left coords and tile size of a patch file.

    Raises
    ------
    InputError
        Unreadable file, missing or mis-shaped ``img``/``coords``/``barcode``,
        or duplicate barcodes (rows are matched to counts by barcode).
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read patch file: {exc}") from None
    with f:
        if IMAGE_KEY not in f:
            raise InputError(path, f"no '{IMAGE_KEY}' array of patches")
        shape = f[IMAGE_KEY].shape
        if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or f[IMAGE_KEY].dtype != np.uint8:
            raise InputError(path, f"'{IMAGE_KEY}' must be (N, H, H, 3) uint8 RGB patches, got {shape} {f[IMAGE_KEY].dtype}")
        if "coords" not in f:
            raise InputError(path, "no 'coords' array")
        coords = np.asarray(f["coords"][()])
        barcode_key = next((k for k in BARCODE_KEYS if k in f), None)
        if barcode_key is None:
            raise InputError(path, "no 'barcode' array: patches cannot be matched to spots")
        barcodes = decode_strings(f[barcode_key][()])
    n = shape[0]
    if n == 0:
        raise InputError(path, "holds zero patches")
    if coords.shape != (n, 2) or len(barcodes) != n:
        raise InputError(path, f"{n} patches but coords {coords.shape} and {len(barcodes)} barcodes")
    _, first, counts = np.unique(barcodes, return_index=True, return_counts=True)
    if (counts > 1).any():
        raise InputError(path, f"duplicate barcode {str(barcodes[first[counts > 1][0]])!r}")
    return PatchIndex(barcodes=barcodes, coords=np.rint(coords).astype(np.int64), px=int(shape[1]))


@dataclass(frozen=True)
class _PatchSpots:
    """The part of a :class:`~virtualst.sample.Sample` that the runner's provenance reads."""

    sample_id: str
    patient_id: str | None
    source: Path
    um_per_px: float
    barcodes: np.ndarray
    centers: np.ndarray  # top-left corners here: they identify the tiles in the fingerprint


@dataclass
class PatchJob:
    """One patch file: where its cache goes, from which row it resumes, or whether it is reused."""

    patch: PatchFile
    index: PatchIndex
    path: Path
    attrs: dict[str, Any]
    start: int
    reused: bool = False


def patch_settings(settings: EmbedSettings, index: PatchIndex, patch: PatchFile) -> EmbedSettings:
    """The run settings with the tile size the patch file imposes."""
    return replace(settings, tile=TileSpec(px=index.px, um=index.px * patch.patch_um_per_px))


def patch_attrs(patch: PatchFile, index: PatchIndex, encoder: Encoder, settings: EmbedSettings, device: torch.device) -> dict[str, Any]:
    """The runner's provenance attributes, adjusted for tiles that were cut elsewhere."""
    settings = patch_settings(settings, index, patch)
    um_per_px = float(patch.um_per_px) if patch.um_per_px is not None else math.nan
    spots = _PatchSpots(patch.sample_id, patch.patient_id, Path(patch.path), um_per_px, index.barcodes, index.coords)
    attrs = provenance_attrs(spots, encoder, settings, settings.tile.um, device)
    fixed = json.loads(attrs["settings"])
    fixed.pop("um_per_px")  # metadata only: the features do not depend on it
    fixed["input"] = "patches"
    transform = json.loads(attrs["transform"])
    transform["resample"] = f"none: pre-cut {index.px} px patches at {patch.patch_um_per_px} µm/px used as stored"
    attrs.update(
        fingerprint=fingerprint(fixed),
        settings=json.dumps(fixed, sort_keys=True),
        transform=json.dumps(transform),
        input="patches",
        patches_path=str(patch.path),
        um_per_px_known=patch.um_per_px is not None,
    )
    return attrs


def plan_patch_job(
    patch: PatchFile, encoder: Encoder, device: torch.device, cache_dir: str | Path, settings: EmbedSettings
) -> PatchJob:
    """The :class:`PatchJob` for ``patch`` (``reused`` when a complete cache with these settings exists).

    Same rules as :func:`virtualst.embed.runner.plan_job`: a cache made with
    other settings is never replaced unless ``settings.overwrite``.
    """
    index = read_patch_index(patch.path)
    path = cache_path(cache_dir, encoder.config.name, patch.sample_id)
    attrs = patch_attrs(patch, index, encoder, settings, device)
    start = plan_cache(path, attrs, index.n, encoder.dim, settings.overwrite)
    if start is None:
        return PatchJob(patch=patch, index=index, path=path, attrs=attrs, start=index.n, reused=True)
    return PatchJob(patch=patch, index=index, path=path, attrs=attrs, start=start)


class PatchBatches:
    """Map-style dataset of ``(job, first_row, uint8 (B, H, W, 3))`` read from patch files.

    Holds paths and row ranges only, so it pickles into DataLoader workers;
    each read opens the file (cheap next to a forward pass).
    """

    def __init__(self, jobs: list[PatchJob], batch_size: int) -> None:
        self.paths = [Path(job.patch.path) for job in jobs]
        self.items = [
            (j, first, min(first + batch_size, job.index.n))
            for j, job in enumerate(jobs)
            for first in range(job.start, job.index.n, batch_size)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> tuple[int, int, np.ndarray]:
        job, first, stop = self.items[item]
        with h5py.File(self.paths[job], "r") as f:
            return job, first, np.ascontiguousarray(f[IMAGE_KEY][first:stop])


def embed_patches_with(
    extractor: FeatureExtractor,
    patches: Iterable[PatchFile],
    cache_dir: str | Path,
    settings: EmbedSettings,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Embed every patch of each file into ``{cache_dir}/{encoder}/{sample_id}.h5``.

    Reuses complete caches with the same settings and resumes interrupted
    ones from their last flushed batch. Returns the cache paths in order.
    """
    encoder, device = extractor.encoder, extractor.device
    patches = list(patches)
    planned = [plan_patch_job(p, encoder, device, cache_dir, settings) for p in patches]  # all checks before any work
    jobs = [job for job in planned if not job.reused]
    if progress:
        progress(sum(job.start for job in planned))
    def open_writer(j: int) -> CacheWriter:
        job = jobs[j]
        return CacheWriter(job.path, job.index.barcodes, job.index.coords, encoder.dim, job.attrs, settings.storage_dtype)

    dataset = PatchBatches(jobs, settings.batch_size or default_batch_size(device))
    finished = [j for j, job in enumerate(jobs) if job.start == job.index.n]
    stream_to_caches(extractor, dataset, open_writer, finished, settings, progress)
    return [job.path for job in planned]


def embed_patches(
    patches: Iterable[PatchFile],
    cache_dir: str | Path,
    settings: EmbedSettings | None = None,
    show_progress: bool = True,
) -> list[Path]:
    """Embed several patch files with one encoder; returns their cache paths.

    Parameters
    ----------
    patches
        Files to embed (e.g. a HEST-bench task's ``patches/{id}.h5``).
    cache_dir
        Root of the cache.
    settings
        Run settings; ``settings.tile`` is ignored (the patch files fix the tile).
    show_progress
        Draw a tqdm bar with tiles/s.
    """
    from tqdm.auto import tqdm

    settings = settings or EmbedSettings()
    patches = list(patches)
    total = sum(read_patch_index(p.path).n for p in patches)
    extractor = make_extractor(settings)
    with tqdm(total=total, unit="tile", desc=f"embed {extractor.encoder.config.name} (patches)", disable=not show_progress) as bar:
        return embed_patches_with(extractor, patches, cache_dir, settings, progress=bar.update)
