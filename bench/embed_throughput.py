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
import tempfile
import time
from pathlib import Path

import numpy as np

from virtualst.bench.timing import cpu_model
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


def measure(
    paths: list[Path] | tuple[Path, ...] = tuple(DEFAULT_SAMPLES),
    encoder: str = "efficientnet_lite0",
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    repeats: int = 3,
) -> dict:
    """Forward-only and pipeline rates on the in-tissue spots of ``paths``, alternated ``repeats`` times.

    Returns
    -------
    dict
        ``forward`` and ``pipeline`` (tiles/s of every run), their medians
        ``forward_median`` and ``pipeline_median``, ``ratio`` (pipeline over
        forward-only), ``n_tiles``, ``n_samples``, ``batch_size``, ``device``
        and ``encoder``.
    """
    from virtualst.embed.encoders import load_encoder

    paths = [Path(p) for p in paths]
    settings = EmbedSettings(encoder=encoder, batch_size=batch_size, num_workers=workers, device=device)
    samples = load_samples(paths)
    tiles = np.stack([tile for s in samples for _, tile, _ in iter_tiles(s, TileSpec())])
    extractor = FeatureExtractor(load_encoder(encoder), resolve_device(device))
    batch = batch_size or default_batch_size(extractor.device)

    forward, pipeline = [], []
    for _ in range(max(1, repeats)):
        forward.append(forward_only_rate(extractor, tiles, batch))
        pipeline.append(pipeline_rate(extractor, paths, settings)[0])
    forward_median, pipeline_median = float(np.median(forward)), float(np.median(pipeline))
    return {
        "forward": forward,
        "pipeline": pipeline,
        "forward_median": forward_median,
        "pipeline_median": pipeline_median,
        "ratio": pipeline_median / forward_median,
        "n_tiles": len(tiles),
        "n_samples": len(samples),
        "batch_size": batch,
        "device": str(extractor.device),
        "encoder": encoder,
    }


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point; prints the rates and returns :func:`measure`'s dict."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", nargs="*", type=Path, default=DEFAULT_SAMPLES)
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="alternate the two measurements this many times")
    args = parser.parse_args(argv)

    r = measure(args.samples, args.encoder, args.batch_size, args.workers, args.device, args.repeats)
    print(f"machine    {cpu_model()}, {torch.get_num_threads()} torch threads, device {r['device']}")
    print(f"encoder    {r['encoder']}, batch {r['batch_size']}, {r['n_tiles']} tiles from {r['n_samples']} sample(s)")
    print(f"forward    {r['forward_median']:8.1f} tiles/s median  (runs: {', '.join(f'{x:.1f}' for x in r['forward'])})")
    print(f"pipeline   {r['pipeline_median']:8.1f} tiles/s median  (runs: {', '.join(f'{x:.1f}' for x in r['pipeline'])})")
    print(f"ratio      {r['ratio']:8.3f}  (target >= 0.9 on CPU, >= 0.8 on GPU)")
    return r


if __name__ == "__main__":  # pragma: no cover
    main()
