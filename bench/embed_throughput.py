"""Embedding throughput: the full pipeline against the encoder's forward pass alone.

Run ``python -m virtualst.bench.embed_throughput [SAMPLE ...]``. In one
process, on the same tiles, it measures

* **forward-only**: tiles already decoded in memory, batched through the
  encoder (preprocessing included) — the ceiling;
* **pipeline**: ``embed_samples`` from the files on disk into a fresh cache
  (image decoding, tile reads and resampling, DataLoader, HDF5 writes);

and prints both rates and their ratio (target >= 0.9 on CPU).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from virtualst.embed.readers import read_all
from virtualst.embed.runner import (
    EmbedSettings,
    FeatureExtractor,
    default_batch_size,
    embed_with,
    resolve_device,
)
from virtualst.embed.tiling import TileSpec, iter_tiles

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_SAMPLES = [SHARED_DATA / "her2st", SHARED_DATA / "stutility_mob"]


def load_samples(paths: list[Path]) -> list:
    """In-tissue spots of every sample found at ``paths``, with fresh (undecoded) images."""
    return [s.in_tissue() for p in paths for s in read_all(p)]


def forward_only_rate(extractor: FeatureExtractor, tiles: np.ndarray, batch_size: int) -> float:
    """Tiles/s of the encoder on tiles already in memory."""
    import torch

    batches = [torch.from_numpy(tiles[i : i + batch_size]) for i in range(0, len(tiles), batch_size)]
    extractor(batches[0])  # warm-up: allocator, kernels
    start = time.perf_counter()
    for batch in batches:
        extractor(batch)
    return len(tiles) / (time.perf_counter() - start)


def pipeline_rate(extractor: FeatureExtractor, paths: list[Path], settings: EmbedSettings) -> tuple[float, int]:
    """Tiles/s of the whole pipeline, from image files on disk to finished cache files.

    The encoder is already loaded (a one-off start-up cost, not throughput).
    """
    samples = load_samples(paths)  # fresh handles: image decoding is timed
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        embed_with(extractor, samples, cache, settings)
        elapsed = time.perf_counter() - start
    n = sum(s.n_spots for s in samples)
    return n / elapsed, n


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    import torch

    from virtualst.embed.encoders import load_encoder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", nargs="*", type=Path, default=DEFAULT_SAMPLES)
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="alternate the two measurements this many times")
    args = parser.parse_args(argv)

    settings = EmbedSettings(
        encoder=args.encoder, batch_size=args.batch_size, num_workers=args.workers, device=args.device
    )
    spec = TileSpec()
    samples = load_samples(args.samples)
    tiles = np.stack([tile for s in samples for _, tile, _ in iter_tiles(s, spec)])
    extractor = FeatureExtractor(load_encoder(args.encoder), resolve_device(args.device))
    batch_size = args.batch_size or default_batch_size(extractor.device)

    forward, pipeline = [], []
    for _ in range(args.repeats):
        forward.append(forward_only_rate(extractor, tiles, batch_size))
        rate, n = pipeline_rate(extractor, args.samples, settings)
        pipeline.append(rate)
    best_forward, best_pipeline = float(np.median(forward)), float(np.median(pipeline))
    print(f"machine    {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {extractor.device}")
    print(f"encoder    {args.encoder}, batch {batch_size}, {n} tiles from {len(samples)} sample(s)")
    print(f"forward    {best_forward:8.1f} tiles/s median  (runs: {', '.join(f'{r:.1f}' for r in forward)})")
    print(f"pipeline   {best_pipeline:8.1f} tiles/s median  (runs: {', '.join(f'{r:.1f}' for r in pipeline)})")
    print(f"ratio      {best_pipeline / best_forward:8.3f}  (target >= 0.9 on CPU)")


if __name__ == "__main__":  # pragma: no cover
    main()
