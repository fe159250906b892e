"""Tests for virtualst.embed.tiling: fixed-µm tiles centred on spots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from virtualst.embed.images import open_image
from virtualst.embed.tiling import (
    TileSpec,
    edge_flags,
    iter_tiles,
    read_tile,
    tile_geometry,
)
from virtualst.errors import InputError
from virtualst.sample import Sample

W, H = 1024, 768
MPP = 0.25  # native µm/px: a 112 µm tile spans 448 native pixels


def coord_pattern() -> np.ndarray:
    """R = x % 256, G = y % 256, B = 16 * (x // 256) + y // 256."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], axis=-1).astype(np.uint8)


def smooth_pattern() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W].astype(float)
    return np.stack([x / W * 255, y / H * 255, 128 + 100 * np.sin(x / 50)], axis=-1).round().astype(np.uint8)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiling")
    coord, smooth = coord_pattern(), smooth_pattern()
    paths = {"png": root / "coord.png", "jpeg": root / "smooth.jpg", "smooth_png": root / "smooth.png"}
    Image.fromarray(coord).save(paths["png"])
    Image.fromarray(smooth).save(paths["jpeg"], quality=95)
    Image.fromarray(smooth).save(paths["smooth_png"])
    paths["pyramid"] = root / "smooth_pyramid.tif"
    res = {"resolution": (1e4 / MPP, 1e4 / MPP), "resolutionunit": "CENTIMETER", "photometric": "rgb"}
    with tifffile.TiffWriter(paths["pyramid"]) as tw:
        tw.write(smooth, tile=(64, 64), subifds=2, **res)
        for factor in (2, 4):
            level = smooth.reshape(H // factor, factor, W // factor, factor, 3).mean(axis=(1, 3)).round()
            tw.write(level.astype(np.uint8), tile=(64, 64), subfiletype=1, **res)
    return paths


def make_sample(image, centers, um_per_px: float = MPP, spot_diameter_um: float = 55.0) -> Sample:
    centers = np.asarray(centers, dtype=float)
    spots = pd.DataFrame(
        {"barcode": [f"s{i}" for i in range(len(centers))], "x": centers[:, 0], "y": centers[:, 1], "in_tissue": True}
    )
    return Sample("toy", spots, um_per_px=um_per_px, spot_diameter_um=spot_diameter_um, image=image)


# ------------------------------------------------------------------- TileSpec
def test_tilespec_defaults_and_dict():
    spec = TileSpec()
    assert (spec.px, spec.um, spec.spot_factor) == (224, 112.0, None)
    assert json.loads(json.dumps(spec.to_dict())) == {"px": 224, "um": 112.0, "spot_factor": None}
    assert TileSpec.from_dict(spec.to_dict()) == spec


def test_tilespec_spot_matched(slides):
    spec = TileSpec(spot_factor=2.0)  # overrides the default µm size
    assert spec.um is None
    sample = make_sample(open_image(slides["png"]), [[500, 400]], spot_diameter_um=55.0)
    assert spec.tile_um(sample) == pytest.approx(110.0)
    assert tile_geometry(sample, spec).size0 == pytest.approx(440.0)


@pytest.mark.parametrize("kwargs", [{"um": 50.0, "spot_factor": 1.0}, {"um": None}, {"px": 0}, {"um": -1.0}])
def test_tilespec_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        TileSpec(**kwargs)


# ------------------------------------------------------------------ geometry
def test_physical_size(slides):
    """112 µm at 0.25 µm/px native covers 448 native pixels, wherever it is resampled to."""
    sample = make_sample(open_image(slides["png"]), [[500, 400], [600.4, 300.6]])
    geometry = tile_geometry(sample, TileSpec())
    assert geometry.size0 == pytest.approx(448.0)
    np.testing.assert_array_equal(geometry.top_left, [[276, 176], [376, 77]])
    assert geometry.top_left.dtype == np.int64
    # read 1:1 (448 px): first and last pixels are the box corners of the native image
    tile, crossed = read_tile(sample.image, (500, 400), geometry.size0, 448)
    assert not crossed
    np.testing.assert_array_equal(tile, coord_pattern()[176:624, 276:724])


def test_geometry_follows_scale(slides):
    """A half-resolution image opened with scale=0.5 keeps level-0 geometry."""
    image = open_image(slides["png"], scale=0.5)
    sample = make_sample(image, [[1000, 800]], um_per_px=MPP / 2)
    geometry = tile_geometry(sample, TileSpec(px=224, um=56.0))
    assert geometry.size0 == pytest.approx(448.0)  # level-0 px; 224 native px
    tile, _ = read_tile(image, geometry.centers[0], geometry.size0, 224)
    np.testing.assert_array_equal(tile, coord_pattern()[288:512, 388:612])


@pytest.mark.parametrize("kind", ["png", "smooth_png", "jpeg", "pyramid"])
def test_tile_centre_is_spot_centre(slides, kind):
    """The middle output pixel shows the image at the spot centre."""
    image = open_image(slides[kind])
    centres = [[300, 250], [700, 500], [512.0, 384.0]]
    sample = make_sample(image, centres)
    for i, tile, _ in iter_tiles(sample, TileSpec()):
        cx, cy = (int(v) for v in centres[i])
        expected = (coord_pattern() if kind == "png" else smooth_pattern())[cy, cx].astype(int)
        if kind == "png":  # exact-copy check: the pattern is not smooth, read 1:1
            tile, _ = read_tile(image, centres[i], 448.0, 448)
            np.testing.assert_array_equal(tile[224, 224], expected)
        else:  # 448 native px -> 224 px: the centre pixel averages a 2x2 neighbourhood
            assert np.abs(tile[112, 112].astype(int) - expected).max() <= 3


def test_pyramid_tiles_match_flat_tiles(slides):
    centres = [[300.3, 250.8], [700, 500], [520, 380]]
    flat = make_sample(open_image(slides["smooth_png"]), centres)
    pyramid = make_sample(open_image(slides["pyramid"]), centres)
    spec = TileSpec(px=56)  # 8x shrink: the pyramid serves it from its 4x level
    for (_, a, _), (_, b, _) in zip(iter_tiles(flat, spec), iter_tiles(pyramid, spec), strict=True):
        assert np.abs(a.astype(int) - b).mean() < 1.5


# --------------------------------------------------------------------- edges
def test_edge_tiles_white_and_flagged(slides):
    image = open_image(slides["png"])
    centres = [[10, 10], [500, 400], [W - 5, 400], [224, 224], [W - 224, H - 224]]
    sample = make_sample(image, centres)
    spec = TileSpec()
    flags = edge_flags(sample, spec)
    np.testing.assert_array_equal(flags, [True, False, True, False, False])
    read_flags = []
    for i, tile, crossed in iter_tiles(sample, spec):
        read_flags.append(crossed)
        if i == 0:  # 214 of 448 level-0 px lie outside on the top and left: 107 output px
            assert (tile[:100] == 255).all() and (tile[:, :100] == 255).all()
            assert tile[120:, 120:].mean() < 250
    np.testing.assert_array_equal(flags, read_flags)


def test_iter_tiles_indices_and_shapes(slides):
    sample = make_sample(open_image(slides["jpeg"]), [[300, 250], [700, 500], [500, 400]])
    got = list(iter_tiles(sample, TileSpec(px=32), indices=[2, 0]))
    assert [i for i, _, _ in got] == [2, 0]
    assert all(t.shape == (32, 32, 3) and t.dtype == np.uint8 for _, t, _ in got)


def test_sample_without_image():
    sample = make_sample(None, [[1, 1]])
    with pytest.raises(InputError, match="no image"):
        next(iter_tiles(sample, TileSpec()))
    with pytest.raises(InputError):
        edge_flags(sample, TileSpec())


# ------------------------------------------------------------------ real data
@pytest.mark.realdata
def test_her2st_tiles(her2st_dir):
    path = sorted(her2st_dir.glob("ST-imgs/*/*/*.jpg"))[0]
    image = open_image(path)
    width, height = image.dimensions
    sample = make_sample(image, [[width / 2, height / 2], [5, 5]], um_per_px=0.63, spot_diameter_um=100.0)
    tiles = list(iter_tiles(sample, TileSpec()))
    assert tiles[0][1].shape == (224, 224, 3) and tiles[0][1].std() > 5
    assert [c for _, _, c in tiles] == [False, True] == list(edge_flags(sample, TileSpec()))
