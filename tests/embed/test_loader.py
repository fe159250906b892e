"""Tile batches for the encoder: order, contents and memory."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from virtualst.embed.loader import TileBatches
from virtualst.embed.tiling import TileSpec, read_tile, tile_geometry

from .conftest import make_sample


def _jobs(samples, start=0):
    spec = TileSpec()
    return [SimpleNamespace(sample=s, geometry=tile_geometry(s, spec), start=start) for s in samples]


def test_batches_cover_every_remaining_row_in_order(tmp_path):
    sample = make_sample(tmp_path, n_side=3)
    batches = TileBatches(_jobs([sample], start=2), batch_size=4)
    items = [batches[i] for i in range(len(batches))]
    assert [(job, first, len(tiles)) for job, first, tiles in items] == [(0, 2, 4), (0, 6, 3)]
    geometry = tile_geometry(sample, TileSpec())
    expected, _ = read_tile(sample.image, geometry.centers[6], geometry.size0, geometry.px)
    np.testing.assert_array_equal(items[1][2][0], expected)


def test_an_image_is_released_once_the_next_sample_is_read(tmp_path):
    """One decoded image per process, not one per sample (her2st: 275 MB each)."""
    first, second = make_sample(tmp_path, sample_id="a"), make_sample(tmp_path, sample_id="b")
    batches = TileBatches(_jobs([first, second]), batch_size=16)
    batches[0]
    assert first.image._reader is not None
    batches[1]
    assert first.image._reader is None and second.image._reader is not None
