"""Embedding throughput: the full pipeline against the encoder's forward pass alone.

Run ``python -m virtualst.bench.embed_throughput [SAMPLE ...]``. In one
process, on the same tiles, it measures

* **forward-only**: tiles already decoded in memory, batched through the
  encoder (preprocessing included), both in one process using every core
  and, on CPU, through the encoder replicas the pipeline runs
  (:mod:`virtualst.embed.replicas`) — the faster of the two is the ceiling;
* **pipeline**: the embedding runner from the files on disk into a fresh
  cache (image decoding, tile reads and resampling, HDF5 writes), with the
  engine ``embed_samples`` would choose;

and prints the rates and the ratio of the pipeline to the ceiling (target
>= 0.9 on CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from virtualst.bench.timing import cpu_model
from virtualst.embed.readers import read_all
from virtualst.embed.replicas import EncoderReplicas, plan_replicas, weight_bytes
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


class StoredTileBatches:
    """Batches of tiles from an ``.npy`` file, in the item format of :class:`~virtualst.embed.loader.TileBatches`.

    Lets encoder replicas run the forward pass on tiles already decoded:
    each replica maps the file (served from the page cache) instead of
    receiving the tiles through a pipe.
    """

    def __init__(self, path: Path, n: int, batch_size: int) -> None:
        self.path = path
        self.items = [(0, np.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
        self._tiles = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> tuple[int, int, np.ndarray]:
        if self._tiles is None:
            self._tiles = np.load(self.path, mmap_mode="r")
        rows = self.items[item][1]
        return 0, int(rows[0]), np.array(self._tiles[rows[0] : rows[-1] + 1])  # writable, as read tiles are

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tiles": None}


def replica_forward_rate(replicas: EncoderReplicas, tiles_file: Path, n: int, batch_size: int) -> float:
    """Tiles/s of the encoder replicas on tiles already decoded (stored in ``tiles_file``)."""
    for _ in replicas.encode(StoredTileBatches(tiles_file, min(n, 2 * batch_size * replicas.plan.replicas), batch_size)):
        pass  # warm-up: every replica maps the file and runs its first batches
    start = time.perf_counter()
    count = sum(len(features) for _, _, features in replicas.encode(StoredTileBatches(tiles_file, n, batch_size)))
    return count / (time.perf_counter() - start)


def pipeline_rate(extractor: FeatureExtractor | EncoderReplicas, paths: list[Path], settings: EmbedSettings) -> tuple[float, int]:
    """Tiles/s of the whole pipeline, from image files on disk to finished cache files.

    The encoder (or its replicas) is already loaded: a one-off start-up
    cost, not throughput.
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
    repeats: int = 5,
    cpu_replicas: int | None = None,
) -> dict:
    """Forward-only and pipeline rates on the in-tissue spots of ``paths``, alternated ``repeats`` times.

    Returns
    -------
    dict
        ``forward_single`` (one process), ``forward_replicas`` (empty when the
        pipeline runs one process) and ``pipeline``: tiles/s of every run;
        ``forward_median`` (the faster forward-only arrangement's median),
        ``pipeline_median``, ``ratio`` (pipeline over forward-only),
        ``replicas`` and ``threads`` (the pipeline's engine), ``n_tiles``,
        ``n_samples``, ``batch_size``, ``device`` and ``encoder``.
    """
    import torch

    from virtualst.embed.encoders import load_encoder

    paths = [Path(p) for p in paths]
    settings = EmbedSettings(encoder=encoder, batch_size=batch_size, num_workers=workers, device=device, cpu_replicas=cpu_replicas)
    samples = load_samples(paths)
    tiles = np.stack([tile for s in samples for _, tile, _ in iter_tiles(s, TileSpec())])
    for sample in samples:
        sample.image.close()
    extractor = FeatureExtractor(load_encoder(encoder), resolve_device(device))
    batch = batch_size or default_batch_size(extractor.device)
    plan = plan_replicas(extractor.device, len(tiles), weight_bytes(extractor.encoder), cpu_replicas)

    single, replicated, pipeline = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        tiles_file = Path(scratch) / "tiles.npy"
        np.save(tiles_file, tiles)
        with EncoderReplicas(settings, plan) if plan.replicas > 1 else nullcontext() as replicas:
            for _ in range(max(1, repeats)):
                single.append(forward_only_rate(extractor, tiles, batch))
                if replicas:
                    replicated.append(replica_forward_rate(replicas, tiles_file, len(tiles), batch))
                pipeline.append(pipeline_rate(replicas or extractor, paths, settings)[0])
    forward_median = max(float(np.median(single)), float(np.median(replicated)) if replicated else 0.0)
    pipeline_median = float(np.median(pipeline))
    return {
        "forward_single": single,
        "forward_replicas": replicated,
        "pipeline": pipeline,
        "forward_median": forward_median,
        "pipeline_median": pipeline_median,
        "ratio": pipeline_median / forward_median,
        "replicas": plan.replicas,
        "threads": plan.threads if plan.replicas > 1 else torch.get_num_threads(),
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
    parser.add_argument("--repeats", type=int, default=5, help="alternate the measurements this many times (runs swing on shared machines)")
    parser.add_argument("--cpu-replicas", type=int, default=None, help="encoder processes on CPU (default: chosen)")
    args = parser.parse_args(argv)

    r = measure(args.samples, args.encoder, args.batch_size, args.workers, args.device, args.repeats, args.cpu_replicas)

    def runs(rates: list[float]) -> str:
        return f"{np.median(rates):8.1f} tiles/s median  (runs: {', '.join(f'{x:.1f}' for x in rates)})"

    print(f"machine    {cpu_model()}, {torch.get_num_threads()} cores for torch, device {r['device']}")
    print(f"encoder    {r['encoder']}, batch {r['batch_size']}, {r['n_tiles']} tiles from {r['n_samples']} sample(s)")
    print(f"forward    {runs(r['forward_single'])}  one process")
    if r["forward_replicas"]:
        print(f"forward    {runs(r['forward_replicas'])}  {r['replicas']} replicas x {r['threads']} thread(s)")
    print(f"pipeline   {runs(r['pipeline'])}  {r['replicas']} process(es) x {r['threads']} thread(s)")
    print(f"ratio      {r['ratio']:8.3f}  pipeline / faster forward-only (target >= 0.9 on CPU, >= 0.8 on GPU)")
    return r


if __name__ == "__main__":  # pragma: no cover
    main()
