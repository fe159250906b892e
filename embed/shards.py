"""Shards of one large sample: embedded apart (by several Ray workers), merged into its single cache.

A shard is a sub-sample of consecutive spots whose boundaries fall on batch
boundaries, so every shard encodes exactly the batches a whole-sample run
would, and the merged features equal that run's. Each shard is an ordinary
resumable cache under ``{cache}/.shards/{sample_id}/``; the merge writes the
sample's own cache (the whole sample's provenance, completion marker last)
and then deletes the shards.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from virtualst.embed.cache import read_embeddings

if TYPE_CHECKING:  # pragma: no cover
    from virtualst.embed.cache import CacheWriter
    from virtualst.sample import Sample

#: Folder of the shard caches under the cache root.
SHARD_DIR = ".shards"
#: Automatic shards are at least this many spots (smaller ones cost more in start-up than they save).
MIN_SHARD_SPOTS = 1024
#: Rows copied per write while merging.
MERGE_ROWS = 4096


def shard_size(spots: int, workers: int, batch: int, requested: int | None = None) -> int:
    """Spots per shard (a multiple of ``batch``); 0 means samples stay whole.

    Parameters
    ----------
    spots
        Spots still to embed, over all samples.
    workers
        Workers sharing them.
    batch
        Tiles per forward pass: shard boundaries fall on batch boundaries.
    requested
        ``None`` chooses: an equal share per worker, at least
        :data:`MIN_SHARD_SPOTS`, when a run has more workers than samples
        (the caller decides that); ``0`` never shards; ``N`` is rounded up to
        a multiple of ``batch``.
    """
    if requested == 0 or (requested is None and workers < 2):
        return 0
    size = requested if requested is not None else max(MIN_SHARD_SPOTS, math.ceil(spots / workers))
    return math.ceil(size / batch) * batch


def shard_ranges(n_spots: int, size: int) -> list[range]:
    """Consecutive row ranges of at most ``size`` spots covering ``n_spots``."""
    return [range(start, min(start + size, n_spots)) for start in range(0, n_spots, size)]


def shard_root(cache_root: str | Path, sample_id: str) -> Path:
    """Where the shard caches of ``sample_id`` live."""
    return Path(cache_root) / SHARD_DIR / sample_id


def shard_sample(sample: Sample, rows: range, index: int, count: int) -> Sample:
    """Shard ``index`` of ``count``: the spots ``rows`` of ``sample``, under its own id."""
    mask = np.zeros(sample.n_spots, dtype=bool)
    mask[rows.start : rows.stop] = True
    shard = sample.subset(mask)
    shard.sample_id = f"{sample.sample_id}.shard{index + 1:04d}of{count:04d}"
    return shard


def merge_shards(writer: CacheWriter, barcodes: np.ndarray, shard_paths: list[Path]) -> Path:
    """Fill the sample's fresh cache ``writer`` (spots ``barcodes``) from its shard caches, in row order, and finalise it.

    Raises
    ------
    RuntimeError
        When the shards do not hold exactly the sample's spots in order.
    """
    if writer.n_done:
        raise RuntimeError(f"{writer.partial}: a partial cache exists; it resumes whole, not from shards")
    with writer:
        for path in shard_paths:
            shard = read_embeddings(path)
            expected = barcodes[writer.n_done : writer.n_done + len(shard.barcodes)]
            if not np.array_equal(shard.barcodes, expected):
                raise RuntimeError(f"{path}: shard spots do not follow row {writer.n_done} of {writer.path.name}")
            for start in range(0, len(shard.features), MERGE_ROWS):
                writer.write(writer.n_done, shard.features[start : start + MERGE_ROWS])
        return writer.finalize()
