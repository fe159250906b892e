"""Embed the spot tiles of samples with a frozen encoder into the HDF5 cache.

Plans the work (reuse, resume or refuse existing caches) before computing
anything, streams the tiles of every remaining sample through one loader
(:mod:`virtualst.embed.loader`) into the encoder (:mod:`virtualst.embed.extractor`),
and writes each batch to the cache as soon as it is computed, so a killed
run loses at most one batch.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from virtualst._version import __version__
from virtualst.embed.cache import (
    CacheWriter,
    cache_path,
    fingerprint,
    is_complete,
    partial_path,
    read_attrs,
    resume_point,
)
from virtualst.embed.extractor import FeatureExtractor
from virtualst.embed.images import RESAMPLE
from virtualst.embed.loader import TileBatches, iter_tile_batches
from virtualst.embed.replicas import EncoderReplicas, plan_replicas, weight_bytes
from virtualst.embed.tiling import TileGeometry, TileSpec, edge_flags, tile_geometry
from virtualst.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from virtualst.embed.encoders import Encoder, EncoderIdentity
    from virtualst.sample import Sample


@dataclass
class EmbedSettings:
    """Everything that controls an embedding run.

    Parameters
    ----------
    encoder
        Registry name or ``hf-hub:``/``local-dir:`` spec.
    tile
        Physical tile size and pixel size of the tiles.
    batch_size
        Tiles per forward pass; ``None`` picks 16 on CPU and 256 on CUDA. On
        CUDA a batch that runs out of memory is halved and retried.
    num_workers
        DataLoader worker processes reading tiles; ``None`` picks one per
        core (up to 8) on CUDA and none on CPU, where the encoder already
        uses every core. CPU replicas read their own tiles and ignore it.
    device
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    tta
        Average features over the 8 dihedral transforms of each tile.
    storage_dtype
        ``float32`` or ``float16`` in the cache.
    weights
        Local file or directory overriding the encoder's weight source.
    overwrite
        Recompute even when a complete cache with the same settings exists.
    compile_encoder
        Run the encoder through ``torch.compile``.
    cpu_replicas
        Encoder processes sharing the cores of a CPU run
        (:mod:`virtualst.embed.replicas`); ``None`` chooses (one per core, up
        to 4, for runs of 1,024 tiles or more), ``1`` keeps one process.
    """

    encoder: str = "efficientnet_lite0"
    tile: TileSpec = field(default_factory=TileSpec)
    batch_size: int | None = None
    num_workers: int | None = None
    device: str = "auto"
    tta: bool = False
    storage_dtype: str = "float32"
    weights: str | None = None
    overwrite: bool = False
    compile_encoder: bool = False
    cpu_replicas: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, saved beside outputs."""
        out = asdict(self)
        out["tile"] = self.tile.to_dict()
        return out


def resolve_device(name: str) -> torch.device:
    """Turn ``"auto"`` into CUDA when available, else CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(name, "CUDA device requested but torch sees no GPU")
    return device


def default_batch_size(device: torch.device) -> int:
    """Tiles per forward pass: small batches stay in CPU caches, GPUs want large ones.

    256 keeps an H100 busy with ViT-g-sized encoders; smaller GPUs back off
    (:class:`~virtualst.embed.extractor.FeatureExtractor` halves on out-of-memory).
    """
    return 256 if device.type == "cuda" else 16


def make_extractor(settings: EmbedSettings) -> FeatureExtractor:
    """Load the settings' encoder onto their device, ready to embed."""
    from virtualst.embed.encoders import load_encoder

    encoder = load_encoder(settings.encoder, weights=settings.weights)
    return FeatureExtractor(encoder, resolve_device(settings.device), tta=settings.tta, compile_encoder=settings.compile_encoder)


@contextmanager
def open_engine(settings: EmbedSettings, n_tiles: int) -> Iterator[FeatureExtractor | EncoderReplicas]:
    """The encoder ready to embed ``n_tiles`` tiles: one extractor, or CPU replicas when they pay.

    The encoder is loaded here first (its size caps the replicas, and a
    missing model fails before any process starts), then released if
    replicas take over.
    """
    extractor = make_extractor(settings)
    plan = plan_replicas(extractor.device, n_tiles, weight_bytes(extractor.encoder), settings.cpu_replicas)
    if plan.replicas == 1:
        yield extractor
        return
    del extractor
    with EncoderReplicas(settings, plan) as replicas:
        yield replicas


def default_workers(device: torch.device) -> int:
    """Tile-reading processes: enough to feed a GPU; none on CPU.

    On CPU reading happens in the encoding process (or in each replica,
    :mod:`virtualst.embed.replicas`): a separate reading process competing
    with the encoder's threads measured slower (ratio 0.78 vs 0.88 to the
    forward pass alone, ``python -m virtualst.bench.embed_throughput``).
    """
    cores = os.cpu_count() or 1
    return min(8, cores) if device.type == "cuda" else 0


@dataclass
class EmbedJob:
    """One sample still to embed: where it goes and from which row it resumes."""

    sample: Sample
    path: Path
    geometry: TileGeometry
    attrs: dict[str, Any]
    start: int


# ----------------------------------------------------------------------- provenance
def cache_settings(sample: Sample, encoder: Encoder | EncoderIdentity, settings: EmbedSettings, tile_um: float) -> dict[str, Any]:
    """The settings a cache must share with a run to be reused or resumed."""
    spots = np.concatenate([sample.barcodes.astype(str), sample.centers.round(3).astype(str).ravel()])
    return {
        "encoder": encoder.config.name,
        "weights": encoder.provenance.get("weights"),
        "weights_id": encoder.provenance.get("sha256") or encoder.provenance.get("revision"),
        "tile_px": settings.tile.px,
        "tile_um": round(tile_um, 6),
        "um_per_px": round(sample.um_per_px, 9),
        "tta": settings.tta,
        "storage_dtype": settings.storage_dtype,
        "spots_sha256": fingerprint({"spots": spots.tolist()}),
    }


def provenance_attrs(
    sample: Sample, encoder: Encoder | EncoderIdentity, settings: EmbedSettings, tile_um: float, device: torch.device
) -> dict[str, Any]:
    """Attributes written into the cache file (DESIGN.md §2)."""
    import torch

    fixed = cache_settings(sample, encoder, settings, tile_um)
    transform = {
        "input_size": encoder.input_size,
        "mean": list(map(float, encoder.mean)),
        "std": list(map(float, encoder.std)),
        "resample": f"PIL {RESAMPLE.name.lower()}, antialiased, from the best pyramid level",
        "tta": "dihedral-8-mean" if settings.tta else "none",
    }
    return {
        "fingerprint": fingerprint(fixed),
        "settings": json.dumps(fixed, sort_keys=True),
        "run_settings": json.dumps(settings.to_dict(), sort_keys=True),  # the resolved run config
        "encoder": encoder.config.name,
        "weights_source": str(encoder.provenance.get("weights")),
        "weights_revision": str(encoder.provenance.get("revision")),
        "weights_sha256": str(encoder.provenance.get("sha256")),
        "pooling": encoder.config.pooling,
        "precision": encoder.precision if device.type == "cuda" else "fp32",
        "transform": json.dumps(transform),
        "tile_px": settings.tile.px,
        "tile_um": tile_um,
        "um_per_px": sample.um_per_px,
        "tile_um_per_px": tile_um / settings.tile.px,
        "sample_id": sample.sample_id,
        "patient_id": sample.patient_id or "",
        "source": str(sample.source or ""),
        "virtualst_version": __version__,
        "torch_version": str(torch.__version__),
        "device": str(device),
        "host": platform.node(),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }


def settings_differences(path: Path, expected: dict[str, Any]) -> str:
    """What differs between the settings stored in ``path`` and ``expected``, for error messages."""
    try:
        found = json.loads(read_attrs(path).get("settings", "{}"))
    except (OSError, ValueError):
        return "unreadable settings"
    diffs = [f"{k} {found.get(k)!r} vs {v!r}" for k, v in expected.items() if found.get(k) != v]
    return "; ".join(diffs) or "different settings"


# ---------------------------------------------------------------------------- runs
def plan_cache(path: Path, attrs: dict[str, Any], n: int, dim: int, overwrite: bool) -> int | None:
    """Row to resume ``path`` from, or ``None`` when a complete cache with these settings is reused.

    Raises :class:`InputError` when a cache made with other settings exists
    and ``overwrite`` is false: caches are never silently replaced.
    """
    if overwrite:
        path.unlink(missing_ok=True)
        partial_path(path).unlink(missing_ok=True)
    elif is_complete(path, attrs["fingerprint"]):
        return None
    elif path.exists():
        expected = json.loads(attrs["settings"])
        raise InputError(
            path, f"cache exists with other settings ({settings_differences(path, expected)}); pass --overwrite or another --cache"
        )
    return resume_point(path, attrs["fingerprint"], n, dim)


def encoded_batches(
    engine: FeatureExtractor | EncoderReplicas, dataset: TileBatches, settings: EmbedSettings
) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(job, first_row, features)`` for every batch of ``dataset``, in order.

    Replicas read and encode in their own processes; one extractor reads
    through a DataLoader with the settings' workers.
    """
    if isinstance(engine, EncoderReplicas):
        yield from engine.encode(dataset)
        return
    workers = settings.num_workers if settings.num_workers is not None else default_workers(engine.device)
    for j, first, tiles in iter_tile_batches(dataset, min(workers, len(dataset)), engine.device.type == "cuda"):
        yield j, first, engine(tiles)


def stream_to_caches(
    extractor: FeatureExtractor | EncoderReplicas,
    dataset: Any,
    open_writer: Callable[[int], CacheWriter],
    finished: Iterable[int],
    settings: EmbedSettings,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Encode the ``(job, first_row, tiles)`` batches of ``dataset`` into each job's cache, batch by batch.

    Batches come from :func:`encoded_batches`; ``open_writer(job)`` opens a job's cache on first use (so only files
    being written are held open); ``finished`` lists resumed jobs whose rows
    were all written before an interruption, finalised first. Unfinished
    files stay ``.partial`` for the next run.
    """
    writers: dict[int, CacheWriter] = {}

    def writer(j: int) -> CacheWriter:
        if j not in writers:
            writers[j] = open_writer(j)
        return writers[j]

    try:
        for j in finished:
            writer(j).finalize()
        for j, first, features in encoded_batches(extractor, dataset, settings):
            out = writer(j)
            out.write(first, features.astype(settings.storage_dtype, copy=False))
            if progress:
                progress(len(features))
            if out.n_done == out.n:
                out.finalize()
    finally:
        for out in writers.values():
            out.close()


def plan_job(sample: Sample, encoder: Encoder | EncoderIdentity, device: torch.device, cache_dir: str | Path, settings: EmbedSettings):
    """Return the :class:`EmbedJob` for ``sample``, or its cache path when a complete one is reused.

    Raises :class:`InputError` when a cache made with other settings exists
    and ``settings.overwrite`` is false: caches are never silently replaced.
    """
    if sample.image is None:
        raise InputError(sample.source or sample.sample_id, "sample has no image to tile")
    path = cache_path(cache_dir, encoder.config.name, sample.sample_id)
    geometry = tile_geometry(sample, settings.tile)
    attrs = provenance_attrs(sample, encoder, settings, geometry.tile_um, device)
    start = plan_cache(path, attrs, sample.n_spots, encoder.dim, settings.overwrite)
    if start is None:
        return path
    return EmbedJob(sample=sample, path=path, geometry=geometry, attrs=attrs, start=start)


def open_cache_writer(job: EmbedJob, dim: int, settings: EmbedSettings) -> CacheWriter:
    """The (new or resumed) cache file of ``job``, with its spots, coordinates, edge flags and provenance."""
    edge = edge_flags(job.sample, settings.tile)
    return CacheWriter(
        job.path, job.sample.barcodes, job.geometry.top_left, dim, job.attrs, settings.storage_dtype, extra={"edge": edge}
    )


def embed_with(
    extractor: FeatureExtractor | EncoderReplicas,
    samples: Iterable[Sample],
    cache_dir: str | Path,
    settings: EmbedSettings,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Embed every spot of each sample into ``{cache_dir}/{encoder}/{sample_id}.h5``.

    Reuses complete caches with the same settings, resumes interrupted ones
    from their last flushed batch, and streams tiles of all remaining samples
    through one DataLoader. Returns the cache paths in sample order.
    """
    encoder, device = extractor.encoder, extractor.device
    samples = list(samples)
    planned = [plan_job(s, encoder, device, cache_dir, settings) for s in samples]  # all checks before any work
    paths = [p if isinstance(p, Path) else p.path for p in planned]
    jobs = [p for p in planned if isinstance(p, EmbedJob)]
    if progress:
        progress(sum(s.n_spots for s, p in zip(samples, planned) if isinstance(p, Path)))

    def open_writer(j: int) -> CacheWriter:
        if progress and jobs[j].start:
            progress(jobs[j].start)
        return open_cache_writer(jobs[j], encoder.dim, settings)

    dataset = TileBatches(jobs, settings.batch_size or default_batch_size(device))
    finished = [j for j, job in enumerate(jobs) if job.start == job.sample.n_spots]
    stream_to_caches(extractor, dataset, open_writer, finished, settings, progress)
    return paths


def plan_without_encoder(samples: list[Sample], cache_dir: str | Path, settings: EmbedSettings) -> list[Path | EmbedJob] | None:
    """Each sample's complete cache or job (see :func:`plan_job`), found without building the encoder; ``None`` when that cannot be.

    Identifies the encoder from its weights (:func:`~virtualst.embed.encoders.describe_encoder`),
    so a re-run with a billion-parameter model does not load it to find nothing to do.
    ``None`` for ``hf-hub:``/``local-dir:`` specs and with ``overwrite`` (planning would delete caches).
    """
    from virtualst.embed.encoders import describe_encoder

    if settings.overwrite:
        return None
    identity = describe_encoder(settings.encoder, weights=settings.weights)
    if identity is None:
        return None
    device = resolve_device(settings.device)
    return [plan_job(s, identity, device, cache_dir, settings) for s in samples]


def embed_samples(
    samples: Iterable[Sample],
    cache_dir: str | Path,
    settings: EmbedSettings | None = None,
    show_progress: bool = True,
) -> list[Path]:
    """Embed several samples with one encoder; returns their cache paths.

    Parameters
    ----------
    samples
        Samples with images (e.g. from :func:`virtualst.read`).
    cache_dir
        Root of the cache.
    settings
        Run settings; defaults to the offline default encoder at 224 px / 112 µm.
    show_progress
        Draw a tqdm bar with tiles/s.
    """
    from tqdm.auto import tqdm

    settings = settings or EmbedSettings()
    samples = list(samples)
    total = sum(s.n_spots for s in samples)
    planned = plan_without_encoder(samples, cache_dir, settings)
    if planned is not None and all(isinstance(p, Path) for p in planned):
        return planned
    to_embed = total if planned is None else sum(p.sample.n_spots - p.start for p in planned if isinstance(p, EmbedJob))
    with open_engine(settings, to_embed) as engine, tqdm(
        total=total, unit="tile", desc=f"embed {engine.encoder.config.name}", disable=not show_progress
    ) as bar:
        return embed_with(engine, samples, cache_dir, settings, progress=bar.update)
