"""Batches of tiles for the encoder, read through a torch DataLoader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from virtualst.embed.tiling import read_tile

if TYPE_CHECKING:  # pragma: no cover
    import torch


class TileBatches:
    """Map-style dataset whose items are whole batches of tiles, across samples.

    Batches rather than single tiles keep inter-process traffic to one
    message per batch; one dataset over every sample lets a worker decode
    the next slide while the encoder is still busy with the current one.
    Picklable: image handles reopen in each worker. Items run job by job, so
    each process releases an image (a decoded JPEG can be 275 MB) as soon as
    it reads from the next one: memory holds one image per process, not one
    per sample.
    """

    def __init__(self, jobs: list[Any], batch_size: int) -> None:
        """``jobs``: :class:`~virtualst.embed.runner.EmbedJob` s (sample, geometry, first row to do)."""
        self.sources = [(job.sample.image, job.geometry.centers, job.geometry.size0, job.geometry.px) for job in jobs]
        self.items = [
            (j, rows)
            for j, job in enumerate(jobs)
            for rows in np.array_split(
                np.arange(job.start, job.sample.n_spots),
                range(batch_size, job.sample.n_spots - job.start, batch_size),
            )
            if len(rows)
        ]
        self._open_job: int | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> tuple[int, int, np.ndarray]:
        job, rows = self.items[item]
        image, centers, size0, px = self.sources[job]
        if self._open_job is not None and self._open_job != job:
            self.sources[self._open_job][0].close()
        self._open_job = job
        tiles = np.empty((len(rows), px, px, 3), dtype=np.uint8)
        for out, row in enumerate(rows):
            tiles[out], _ = read_tile(image, centers[row], size0, px)
        return job, int(rows[0]), tiles


def _single_threaded_worker(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def _to_tensor(item: tuple[int, int, np.ndarray]) -> tuple[int, int, torch.Tensor]:
    import torch

    return item[0], item[1], torch.from_numpy(item[2])


def iter_tile_batches(
    dataset: TileBatches, num_workers: int, pin_memory: bool
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(job, first_row, uint8 tensor (B, H, W, 3))`` in order through a DataLoader."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        dataset,
        batch_size=None,  # items are already batches
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_single_threaded_worker if num_workers else None,
        prefetch_factor=8 if num_workers else None,
        collate_fn=_to_tensor,
    )
    yield from loader
