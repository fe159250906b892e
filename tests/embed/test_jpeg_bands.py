"""Tests for virtualst.embed.jpeg_bands: row bands of JPEGs with restart markers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from virtualst.embed.images import open_image
from virtualst.embed.jpeg_bands import BandedJpeg, restart_layout

W, H = 203, 157  # neither a multiple of 16: partial MCUs on the right and at the bottom


def texture(w: int = W, h: int = H, seed: int = 0) -> np.ndarray:
    """Gradients plus noise: every MCU row decodes to different pixels, chroma included."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, mode: str = "RGB", **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(out, format="JPEG", quality=90, **options)
    return out.getvalue()


def full_decode(data: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


CUTTABLE = {
    "4:2:0, a marker every MCU row": ({"subsampling": 2, "restart_marker_rows": 1}, 16),
    "4:2:0, every 3 MCU rows": ({"subsampling": 2, "restart_marker_rows": 3}, 48),
    "4:2:2, every MCU row": ({"subsampling": 1, "restart_marker_rows": 1}, 8),
    "4:4:4, every MCU row": ({"subsampling": 0, "restart_marker_rows": 1}, 8),
    "4:2:0, 13 markers per MCU row": ({"subsampling": 2, "restart_marker_blocks": 1}, 16),
}


@pytest.mark.parametrize("options, unit_px", CUTTABLE.values(), ids=CUTTABLE.keys())
def test_every_band_equals_the_full_decode(options, unit_px):
    data = jpeg_bytes(texture(), **options)
    layout = restart_layout(data)
    assert layout is not None and (layout.width, layout.height, layout.unit_px) == (W, H, unit_px)
    full = full_decode(data)
    for first in range(layout.n_units):
        for stop in range(first + 1, layout.n_units + 1):
            y, rows = first * unit_px, min(H, stop * unit_px) - first * unit_px
            band = BandedJpeg(data, layout).read(0, y, W, rows)  # fresh: decoded with its own context units
            np.testing.assert_array_equal(band, full[y : y + rows], err_msg=f"units {first}:{stop}")


def test_region_reads_in_any_order_reuse_units():
    data = jpeg_bytes(texture(), subsampling=2, restart_marker_rows=1)
    full, bands = full_decode(data), BandedJpeg(data, restart_layout(data))
    rng = np.random.default_rng(1)
    for _ in range(60):
        x, y = int(rng.integers(0, W - 1)), int(rng.integers(0, H - 1))
        w, h = int(rng.integers(1, W - x + 1)), int(rng.integers(1, H - y + 1))
        region = bands.read(x, y, w, h)
        np.testing.assert_array_equal(region, full[y : y + h, x : x + w])
        assert region.flags.owndata  # never a view of the cached units


def test_grey_jpeg_has_one_block_mcus():
    data = jpeg_bytes(texture(), mode="L", restart_marker_rows=1)
    layout = restart_layout(data)
    assert layout is not None and layout.unit_px == 8
    np.testing.assert_array_equal(BandedJpeg(data, layout).read(5, 30, 100, 41), full_decode(data)[30:71, 5:105])


def truncated_after_first_interval(data: bytes) -> bytes:
    first_marker = data.index(b"\xff\xd0", data.index(b"\xff\xda"))
    return data[:first_marker] + b"\xff\xd9"


UNCUTTABLE = {
    "no restart markers": lambda: jpeg_bytes(texture()),
    "progressive": lambda: jpeg_bytes(texture(), progressive=True, restart_marker_rows=1),
    "intervals across row ends": lambda: jpeg_bytes(texture(), restart_marker_blocks=5),  # 13 MCUs a row
    "intervals missing": lambda: truncated_after_first_interval(jpeg_bytes(texture(), restart_marker_rows=1)),
    "not a JPEG": lambda: b"\x89PNG\r\n\x1a\n",
}


@pytest.mark.parametrize("make", UNCUTTABLE.values(), ids=UNCUTTABLE.keys())
def test_files_that_cannot_be_cut_have_no_layout(make):
    assert restart_layout(make()) is None


# ----------------------------------------------------------------- through the reader
def test_reader_decodes_tiles_by_band_and_thumbnails_whole(tmp_path):
    path = tmp_path / "slide.jpg"
    path.write_bytes(jpeg_bytes(texture(600, 500), restart_marker_rows=1))
    full = full_decode(path.read_bytes())
    img = open_image(path)
    tile, _ = img.read_region(100, 200, 64, 64)  # 1:1, pixel-aligned: the pixels themselves
    np.testing.assert_array_equal(tile, full[200:264, 100:164])
    reader = img._reader
    assert reader._pixels is None and 0 < len(reader._bands._units) < reader._bands.layout.n_units
    whole, _ = img.read_region(0, 0, (600, 500), (600, 500))
    np.testing.assert_array_equal(whole, full)
    assert isinstance(reader._pixels, np.ndarray)  # most rows asked for: decoded whole once


@pytest.mark.parametrize("banded", [True, False])
def test_resampled_tiles_do_not_depend_on_the_decode(tmp_path, banded):
    path = tmp_path / ("banded.jpg" if banded else "plain.jpg")
    options = {"restart_marker_rows": 1} if banded else {}
    path.write_bytes(jpeg_bytes(texture(600, 500), **options))
    whole = open_image(path)
    whole.read_region(0, 0, (600, 500), (600, 500))  # decode the whole image first
    tiled = open_image(path)
    for x, y in [(13.3, 7.9), (250.5, 301.25), (480.1, 390.7)]:
        expected, _ = whole.read_region(x, y, 97.4, 224)
        tile, _ = tiled.read_region(x, y, 97.4, 224)
        np.testing.assert_array_equal(tile, expected)
    assert (tiled._reader._pixels is None) == banded


def test_her2st_rows_by_band_equal_the_full_decode(her2st_dir):
    data = sorted((her2st_dir / "ST-imgs").glob("*/*/*.jpg"))[0].read_bytes()
    layout = restart_layout(data)
    assert layout is not None and layout.unit_px == 16  # one restart interval per 16 px MCU row
    full, bands = full_decode(data), BandedJpeg(data, layout)
    rng = np.random.default_rng(2)
    for unit in rng.integers(3, layout.n_units - 13, 8):
        x = int(rng.integers(0, layout.width - 180))
        # Rows starting and ending on band edges, then around them: the bands' edge rows are read.
        for first, stop in [(unit, unit + 10), (unit - 3, unit + 13)]:
            y, h = int(first) * 16, int(stop - first) * 16
            np.testing.assert_array_equal(bands.read(x, y, 180, h), full[y : y + h, x : x + 180])
    np.testing.assert_array_equal(bands.read(0, layout.height - 40, 50, 40), full[-40:, :50])
