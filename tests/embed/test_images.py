"""Tests for virtualst.embed.images: lazy handles, backends, region reads."""

from __future__ import annotations

import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from virtualst.embed import images
from virtualst.embed.images import open_image
from virtualst.errors import InputError

W, H = 1024, 768  # native size of the synthetic slide
MPP = 0.25  # µm per native pixel written into the TIFF tags
TIFF_RES = {"resolution": (1e4 / MPP, 1e4 / MPP), "resolutionunit": "CENTIMETER"}


def coord_pattern(w: int = W, h: int = H) -> np.ndarray:
    """Every pixel encodes its own (x, y): R = x % 256, G = y % 256, B = blocks."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], axis=-1).astype(np.uint8)


def smooth_pattern(w: int = W, h: int = H) -> np.ndarray:
    """Gradients plus a slow wave: survives JPEG and resampling almost unchanged."""
    y, x = np.mgrid[0:h, 0:w].astype(float)
    wave = 128 + 100 * np.sin(x / 50) * np.cos(y / 50)
    return np.stack([x / w * 255, y / h * 255, wave], axis=-1).round().astype(np.uint8)


def box_downsample(arr: np.ndarray, factor: int) -> np.ndarray:
    h, w, c = arr.shape
    blocks = arr.reshape(h // factor, factor, w // factor, factor, c).astype(float)
    return blocks.mean(axis=(1, 3)).round().astype(np.uint8)


def write_pyramid(path: Path, arr: np.ndarray, subifds: bool) -> Path:
    """3-level tiled pyramid: SubIFDs (tifffile style) or successive IFDs (SVS-like)."""
    levels = [arr, box_downsample(arr, 2), box_downsample(arr, 4)]
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(levels):
            extra = {"subifds": 2} if subifds and i == 0 else {}
            tw.write(level, tile=(64, 64), photometric="rgb", subfiletype=int(i > 0), **TIFF_RES, **extra)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slides")
    coord, smooth = coord_pattern(), smooth_pattern()
    out = {
        "png": root / "coord.png",
        "jpeg": root / "smooth.jpg",
        "smooth_png": root / "smooth.png",
        "half_png": root / "smooth_half.png",
        "tiff": root / "coord.tif",
        "tiff_zlib": root / "coord_zlib.tif",
        "pyramid": write_pyramid(root / "pyramid.tif", smooth, subifds=True),
        "pyramid_ifds": write_pyramid(root / "pyramid_ifds.tif", smooth, subifds=False),
    }
    Image.fromarray(coord).save(out["png"])
    Image.fromarray(smooth).save(out["jpeg"], quality=95)
    Image.fromarray(smooth).save(out["smooth_png"])
    Image.fromarray(box_downsample(smooth, 2)).save(out["half_png"])
    tifffile.imwrite(out["tiff"], coord, photometric="rgb", **TIFF_RES)
    tifffile.imwrite(out["tiff_zlib"], coord, photometric="rgb", tile=(64, 64), compression="zlib")
    return out


# --------------------------------------------------------------------- metadata
@pytest.mark.parametrize(
    "kind, backend, mpp",
    [("png", "pil", None), ("jpeg", "pil", None), ("tiff", "tiffslide", MPP), ("pyramid", "tiffslide", MPP)],
)
def test_dimensions_mpp_backend(files, kind, backend, mpp):
    img = open_image(files[kind])
    assert img.dimensions == (W, H)
    assert img.backend == backend
    assert img.mpp == mpp


def test_open_reads_header_only(files):
    img = open_image(files["jpeg"])
    _ = img.dimensions, img.mpp
    assert img._reader._pixels is None  # nothing decoded yet


def test_pyramid_levels(files):
    img = open_image(files["pyramid"])
    assert img.level_dimensions == ((W, H), (W // 2, H // 2), (W // 4, H // 4))


def test_scale_maps_dimensions_and_mpp(files):
    img = open_image(files["tiff"], scale=0.5)
    assert img.dimensions == (2 * W, 2 * H)
    assert img.mpp == pytest.approx(MPP * 0.5)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_pixels_match_pil(tmp_path, mode):
    """simplejpeg decodes RGB and grey JPEGs exactly as PIL does; CMYK goes through PIL."""
    path = tmp_path / f"{mode}.jpg"
    Image.fromarray(coord_pattern()).convert(mode).save(path, quality=90)
    with Image.open(path) as ref:
        expected = np.asarray(ref.convert("RGB"))
    img = open_image(path)
    tile, _ = img.read_region(0, 0, (W, H), (W, H))
    np.testing.assert_array_equal(tile, expected)
    assert isinstance(img._reader._pixels, np.ndarray) == (mode != "CMYK")


# ------------------------------------------------------------------------ reads
@pytest.mark.parametrize("kind", ["png", "tiff"])
def test_one_to_one_read_is_exact(files, kind):
    img = open_image(files[kind])
    tile, crossed = img.read_region(300, 200, (64, 32), (64, 32))
    assert not crossed
    np.testing.assert_array_equal(tile, coord_pattern()[200:232, 300:364])


@pytest.mark.parametrize("kind", ["jpeg", "smooth_png", "pyramid", "pyramid_ifds"])
def test_downsampled_read_matches_reference(files, kind):
    img = open_image(files[kind])
    tile, _ = img.read_region(256, 128, 256, 64)  # 4x shrink
    ref = box_downsample(smooth_pattern()[128:384, 256:512], 4)
    assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8
    assert np.abs(tile.astype(int) - ref).mean() < 2.0


@pytest.mark.parametrize("out_px", [16, 96])  # shrink 2.5x, enlarge 2.4x (rounding dithers)
def test_fractional_box_is_subpixel_correct(tmp_path, out_px):
    """Shifting the box by a fraction of a pixel shifts a ramp by that fraction."""
    ramp = np.tile((np.arange(80) * 3).astype(np.uint8), (40, 1))[..., None].repeat(3, axis=2)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    img = open_image(tmp_path / "ramp.png")
    base, _ = img.read_region(20.0, 10.0, (40.0, 20.0), (out_px, out_px // 2))
    for shift in (0.25, 0.5, 0.75):
        moved, _ = img.read_region(20.0 + shift, 10.0, (40.0, 20.0), (out_px, out_px // 2))
        delta = (moved[..., 0].astype(float) - base[..., 0]).mean()
        assert delta == pytest.approx(3 * shift, abs=0.35)


def test_pyramid_read_close_to_level0_read(files):
    img = open_image(files["pyramid"])
    coarse, _ = img.read_region(100.3, 50.7, 400.0, 100)
    box = (100.3, 50.7, 500.3, 450.7)
    fine = np.asarray(Image.fromarray(smooth_pattern()).resize((100, 100), images.RESAMPLE, box=box))
    assert np.abs(coarse.astype(int) - fine).mean() < 1.5


@pytest.mark.parametrize("out_px, level", [(128, 2), (129, 1), (256, 1), (257, 0), (1000, 0)])
def test_best_level_is_coarsest_sufficient(files, monkeypatch, out_px, level):
    img = open_image(files["pyramid"])
    reader = img._get_reader()
    seen = []
    original = reader.read
    monkeypatch.setattr(reader, "read", lambda lvl, *a: seen.append(lvl) or original(lvl, *a))
    tile, _ = img.read_region(0, 0, 512, out_px)
    assert seen == [level]
    assert tile.shape == (out_px, out_px, 3)


def test_pyramid_reads_only_needed_tiles(files, monkeypatch):
    img = open_image(files["pyramid"])
    reader = img._get_reader()
    sizes = []
    original = reader._slide.read_region
    monkeypatch.setattr(reader._slide, "read_region", lambda *a, **k: sizes.append(a[2]) or original(*a, **k))
    img.read_region(500, 400, 64, 64)
    assert len(sizes) == 1 and max(sizes[0]) < 80  # the box plus a small margin, not the slide


def test_outside_is_white_and_flagged(files):
    img = open_image(files["png"])
    tile, crossed = img.read_region(-10, -20, 40, 40)
    assert crossed
    assert (tile[:20] == 255).all() and (tile[:, :10] == 255).all()
    np.testing.assert_array_equal(tile[20:, 10:], coord_pattern()[:20, :30])
    tile, crossed = img.read_region(W - 40, H - 40, 40, 20)
    assert not crossed  # touching the edge is not crossing it ...
    assert abs(int(tile[-1, -1, 2]) - 50) <= 2  # ... and pulls in no white (B = 3*16 + 2 there)
    tile, crossed = img.read_region(W + 100, 0, 40, 40)
    assert crossed and (tile == 255).all()


def test_scale_reads_the_half_size_image(files):
    full = open_image(files["smooth_png"])
    half = open_image(files["half_png"], scale=0.5)
    assert half.dimensions == full.dimensions
    # level-0 box (200, 100, 200x100) is native box (100, 50, 100x50) of the half image
    tile, _ = half.read_region(200, 100, (200, 100), (100, 50))
    np.testing.assert_array_equal(tile, box_downsample(smooth_pattern(), 2)[50:100, 100:200])
    ref, _ = full.read_region(200, 100, (200, 100), (100, 50))
    assert np.abs(tile.astype(int) - ref).max() <= 1


def test_upsampling_uses_native_pixels(files):
    img = open_image(files["png"])
    tile, _ = img.read_region(10, 10, 4, 16)  # 4x enlargement, smooth interpolation
    assert tile.shape == (16, 16, 3)
    assert abs(int(tile[8, 8, 0]) - 12) <= 1  # centre of the box is x = 12


def test_rgba_png_composited_on_white(tmp_path):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 16:, 3] = 255  # left half fully transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    tile, _ = open_image(tmp_path / "a.png").read_region(0, 0, 32, 32)
    assert (tile[:, :16] == 255).all()
    assert (tile[:, 16:] == [200, 0, 0]).all()


def test_thumbnail(files):
    img = open_image(files["pyramid"])
    thumb = img.thumbnail(200)
    assert thumb.shape == (150, 200, 3) and thumb.dtype == np.uint8
    assert open_image(files["png"]).thumbnail(5000).shape == (H, W, 3)  # never enlarged


# ------------------------------------------------------------- process safety
@pytest.mark.parametrize("kind", ["png", "pyramid"])
def test_pickle_roundtrip(files, kind):
    img = open_image(files[kind])
    before, _ = img.read_region(123.4, 56.7, 80, 40)
    blob = pickle.dumps(img)
    assert len(blob) < 1000  # path, scale, backend only: no pixels, no handles
    clone = pickle.loads(blob)
    assert (clone.path, clone.scale, clone.backend) == (img.path, img.scale, img.backend)
    after, _ = clone.read_region(123.4, 56.7, 80, 40)
    np.testing.assert_array_equal(before, after)


def _read_in_child(img):
    return img.read_region(300, 200, 64, 64)[0]


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_fork_reopens_file_handles(files):
    img = open_image(files["pyramid"])
    parent, _ = img.read_region(300, 200, 64, 64)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply(_read_in_child, (img,))
    np.testing.assert_array_equal(parent, child)
    after_fork, _ = img.read_region(300, 200, 64, 64)  # the parent's handle still works
    np.testing.assert_array_equal(parent, after_fork)


def test_close_then_read_reopens(files):
    img = open_image(files["tiff"])
    img.close()
    tile, _ = img.read_region(0, 0, 8, 8)
    np.testing.assert_array_equal(tile, coord_pattern()[:8, :8])


# ---------------------------------------------------------------------- errors
def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image")
    with pytest.raises(InputError, match="cannot read image") as info:
        open_image(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_image(tmp_path / "absent.jpg")


@pytest.mark.parametrize("kind", ["jpeg", "png", "tiff", "tiff_zlib", "pyramid"])
def test_truncated_file_raises_input_error(files, tmp_path, kind):
    data = files[kind].read_bytes()
    path = tmp_path / f"cut{files[kind].suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        img = open_image(path)
        img.read_region(0, 0, (W, H), 64)  # at the latest on the first read
    assert str(path) in str(info.value)


def test_unknown_and_missing_backend(files, monkeypatch):
    with pytest.raises(ValueError, match="unknown image backend"):
        open_image(files["png"], backend="nope")
    monkeypatch.setitem(images.BACKENDS, "fake", images.Backend("fake", images.PILReader, module="no_such_module_x"))
    with pytest.raises(ImportError, match="no_such_module_x"):
        open_image(files["png"], backend="fake")


def test_openslide_backend_agrees_with_tiffslide(files):
    if not images.BACKENDS["openslide"].available():
        pytest.skip("openslide not installed")
    ts = open_image(files["pyramid_ifds"], backend="tiffslide")
    osl = open_image(files["pyramid_ifds"], backend="openslide")
    assert osl.dimensions == ts.dimensions and osl.mpp == pytest.approx(MPP)
    a, _ = ts.read_region(256, 128, 256, 64)
    b, _ = osl.read_region(256, 128, 256, 64)
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------- real data
def test_her2st_jpeg(her2st_dir):
    path = sorted(her2st_dir.glob("ST-imgs/*/*/*.jpg"))[0]
    img = open_image(path)
    width, height = img.dimensions
    assert 9000 < width < 9600 and 9600 < height < 10200
    assert img.mpp is None
    tile, crossed = img.read_region(width / 2 - 89, height / 2 - 89, 178, 224)
    assert tile.shape == (224, 224, 3) and not crossed
    assert tile.std() > 5  # not blank


def test_visium_hires_with_scalefactor(visium_dir):
    import json

    scalef = json.loads((visium_dir / "spatial" / "scalefactors_json.json").read_text())["tissue_hires_scalef"]
    img = open_image(visium_dir / "spatial" / "tissue_hires_image.png", scale=scalef)
    assert img.dimensions == (round(2000 / scalef), round(2000 / scalef))
    tile, _ = img.read_region(5000, 5000, 200, 32)
    assert tile.shape == (32, 32, 3)
