"""Embed the spot tiles of samples with a frozen encoder into the HDF5 cache.

The hot loop ships uint8 tiles to the device and normalises there (4x less
traffic than float32), runs the encoder under ``torch.inference_mode`` with
the encoder's precision on CUDA, and writes each batch to the cache as soon
as it is computed, so a killed run loses at most one batch.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from virtualst._version import __version__
from virtualst.embed.cache import CacheWriter, cache_path, fingerprint, is_complete, partial_path, read_attrs
from virtualst.embed.tiling import TileSpec, edge_flags, read_tile, tile_geometry
from virtualst.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from virtualst.embed.encoders import Encoder
    from virtualst.sample import Sample

#: Torch dtypes for the encoders' declared precisions (autocast on CUDA only).
AUTOCAST_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


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
        Tiles per forward pass.
    num_workers
        DataLoader worker processes reading tiles; ``None`` picks one per
        core on CUDA and a single prefetching worker on CPU (the encoder
        already uses every core there).
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
    """

    encoder: str = "efficientnet_lite0"
    tile: TileSpec = field(default_factory=TileSpec)
    batch_size: int = 64
    num_workers: int | None = None
    device: str = "auto"
    tta: bool = False
    storage_dtype: str = "float32"
    weights: str | None = None
    overwrite: bool = False

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


def default_workers(device: torch.device) -> int:
    """Worker processes that keep the device fed without starving the encoder of cores."""
    cores = os.cpu_count() or 1
    return min(8, cores) if device.type == "cuda" else 1


# --------------------------------------------------------------------------- data
class TileBatches:
    """Map-style dataset whose items are whole batches of tiles.

    Batches rather than single tiles keep inter-process traffic to one
    message per batch. Picklable: the image handle reopens in each worker.
    """

    def __init__(self, image: Any, centers: np.ndarray, size0: float, px: int, batches: list[np.ndarray]):
        self.image, self.centers, self.size0, self.px, self.batches = image, centers, size0, px, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, item: int) -> tuple[int, np.ndarray]:
        indices = self.batches[item]
        tiles = np.empty((len(indices), self.px, self.px, 3), dtype=np.uint8)
        for row, index in enumerate(indices):
            tiles[row], _ = read_tile(self.image, self.centers[index], self.size0, self.px)
        return int(indices[0]), tiles


def _single_threaded_worker(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def iter_tile_batches(
    dataset: TileBatches, num_workers: int, pin_memory: bool
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, uint8 tensor (B, H, W, 3))`` in order through a DataLoader."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(
        dataset,
        batch_size=None,  # items are already batches
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_single_threaded_worker if num_workers else None,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
        collate_fn=lambda item: (item[0], torch.from_numpy(item[1])),
    )
    yield from loader


# ------------------------------------------------------------------------ forward
def dihedral_views(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The 8 rotations/flips of a (B, C, H, W) batch."""
    import torch

    for flipped in (x, torch.flip(x, dims=(3,))):
        for k in range(4):
            yield torch.rot90(flipped, k, dims=(2, 3))


class FeatureExtractor:
    """Device placement, preprocessing, precision and TTA around an encoder."""

    def __init__(self, encoder: Encoder, device: torch.device, tta: bool = False) -> None:
        import torch

        self.device = device
        self.tta = tta
        self.encoder = encoder.to(device).eval()
        self.channels_last = device.type == "cuda"
        if self.channels_last:
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        dtype_name = AUTOCAST_DTYPES.get(encoder.precision) if device.type == "cuda" else None
        self.autocast_dtype = getattr(torch, dtype_name) if dtype_name else None

    def __call__(self, tiles_bhwc: torch.Tensor) -> np.ndarray:
        """Features (B, D) float32 for a uint8 (B, H, W, 3) batch."""
        import torch

        with torch.inference_mode():
            x = tiles_bhwc.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            x = self.encoder.preprocess(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                device_type=self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
            ):
                if self.tta:
                    features = torch.stack([self.encoder(view) for view in dihedral_views(x)]).mean(0)
                else:
                    features = self.encoder(x)
            return features.float().cpu().numpy()


# ----------------------------------------------------------------------- provenance
def cache_settings(sample: Sample, encoder: Encoder, settings: EmbedSettings, tile_um: float) -> dict[str, Any]:
    """The settings a cache must share with a run to be reused or resumed."""
    spots = np.concatenate([sample.barcodes.astype(str), sample.centers.round(3).astype(str).ravel()])
    return {
        "encoder": encoder.config.name,
        "weights": encoder.provenance.get("weights_source"),
        "weights_id": encoder.provenance.get("sha256") or encoder.provenance.get("revision"),
        "tile_px": settings.tile.px,
        "tile_um": round(tile_um, 6),
        "um_per_px": round(sample.um_per_px, 9),
        "tta": settings.tta,
        "storage_dtype": settings.storage_dtype,
        "spots_sha256": fingerprint({"spots": spots.tolist()}),
    }


def provenance_attrs(
    sample: Sample, encoder: Encoder, settings: EmbedSettings, tile_um: float, device: torch.device
) -> dict[str, Any]:
    """Attributes written into the cache file (DESIGN.md §2)."""
    import torch

    fixed = cache_settings(sample, encoder, settings, tile_um)
    transform = {
        "input_size": encoder.input_size,
        "mean": list(map(float, encoder.mean)),
        "std": list(map(float, encoder.std)),
        "resample": "PIL box/antialiased from native resolution",
        "tta": "dihedral-8-mean" if settings.tta else "none",
    }
    return {
        "fingerprint": fingerprint(fixed),
        "settings": json.dumps(fixed, sort_keys=True),
        "encoder": encoder.config.name,
        "weights_source": str(encoder.provenance.get("weights_source")),
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


def _differences(path: Path, expected: dict[str, Any]) -> str:
    try:
        found = json.loads(read_attrs(path).get("settings", "{}"))
    except (OSError, ValueError):
        return "unreadable settings"
    diffs = [f"{k} {found.get(k)!r} vs {v!r}" for k, v in expected.items() if found.get(k) != v]
    return "; ".join(diffs) or "different settings"


# ---------------------------------------------------------------------------- runs
ProgressHook = Callable[[int], None]


def embed_sample(
    sample: Sample,
    extractor: FeatureExtractor,
    encoder: Encoder,
    cache_dir: str | Path,
    settings: EmbedSettings,
    progress: ProgressHook | None = None,
) -> Path:
    """Embed every spot of ``sample`` into ``{cache_dir}/{encoder}/{sample_id}.h5``.

    Returns the cache path. Reuses a complete cache with the same settings,
    resumes an interrupted one, and refuses to silently replace a cache made
    with other settings (unless ``settings.overwrite``).
    """
    if sample.image is None:
        raise InputError(sample.source or sample.sample_id, "sample has no image to tile")
    path = cache_path(cache_dir, encoder.config.name, sample.sample_id)
    geometry = tile_geometry(sample, settings.tile)
    tile_um = geometry.size0 * sample.um_per_px
    attrs = provenance_attrs(sample, encoder, settings, tile_um, extractor.device)

    if settings.overwrite:
        path.unlink(missing_ok=True)
        partial_path(path).unlink(missing_ok=True)
    elif is_complete(path, attrs["fingerprint"]):
        if progress:
            progress(sample.n_spots)
        return path
    elif path.exists():
        expected = json.loads(attrs["settings"])
        raise InputError(
            path, f"cache exists with other settings ({_differences(path, expected)}); pass --overwrite or another --cache"
        )

    edge = edge_flags(sample, settings.tile)
    with CacheWriter(
        path, sample.barcodes, geometry.top_left, encoder.dim, attrs, settings.storage_dtype, extra={"edge": edge}
    ) as writer:
        start = writer.n_done
        if progress and start:
            progress(start)
        order = np.arange(start, sample.n_spots)
        batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
        dataset = TileBatches(sample.image, geometry.centers, geometry.size0, settings.tile.px, batches)
        workers = settings.num_workers if settings.num_workers is not None else default_workers(extractor.device)
        workers = min(workers, len(batches))
        for first, tiles in iter_tile_batches(dataset, workers, pin_memory=extractor.device.type == "cuda"):
            writer.write(first, extractor(tiles).astype(settings.storage_dtype, copy=False))
            if progress:
                progress(len(tiles))
        return writer.finalize()


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

    from virtualst.embed.encoders import load_encoder

    settings = settings or EmbedSettings()
    samples = list(samples)
    encoder = load_encoder(settings.encoder, weights=settings.weights)
    extractor = FeatureExtractor(encoder, resolve_device(settings.device), tta=settings.tta)
    total = sum(s.n_spots for s in samples)
    paths = []
    with tqdm(total=total, unit="tile", desc=f"embed {encoder.config.name}", disable=not show_progress) as bar:
        for sample in samples:
            bar.set_postfix_str(sample.sample_id)
            paths.append(embed_sample(sample, extractor, encoder, cache_dir, settings, progress=bar.update))
    return paths
