"""Tissue detection: Otsu on saturation, brightness test, morphology, level-0 lookups."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from virtualst.embed.images import open_image
from virtualst.errors import InputError
from virtualst.predict.tissue import TissueMask, detect_tissue, otsu_threshold, saturation_value, tissue_from_rgb

from .conftest import GLASS, PINK, he_image


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_otsu_splits_two_modes_between_them():
    rng = np.random.default_rng(0)
    low, high = rng.normal(0.1, 0.02, 5000).clip(0, 1), rng.normal(0.6, 0.05, 3000).clip(0, 1)
    threshold = otsu_threshold(np.concatenate([low, high]))
    assert (low <= threshold).all() and (high > threshold).all()
    assert otsu_threshold(np.full(100, 0.3)) == 0.0  # nothing to split


def test_saturation_and_value_follow_hsv():
    rgb = np.array([[[255, 255, 255], [255, 0, 0], [0, 0, 0], [200, 100, 100]]], dtype=np.uint8)
    saturation, value = saturation_value(rgb)
    np.testing.assert_allclose(saturation[0], [0.0, 1.0, 0.0, 0.5])
    np.testing.assert_allclose(value[0], [1.0, 1.0, 0.0, 200 / 255])


def test_finds_the_tissue_ellipse():
    rgb, truth = he_image(800, 600)
    mask, threshold = tissue_from_rgb(rgb)
    assert iou(mask, truth) > 0.97
    assert 0.1 < threshold < 0.3  # between glass (~0.02) and stained tissue (>= 0.35)


def test_drops_black_pen_dust_and_fills_lumina():
    rgb, truth = he_image(800, 600)
    rgb[20:30, 50:750] = 10  # black pen line on the glass
    rgb[5:8, 5:8] = PINK.astype(np.uint8)  # a 3x3 speck of dust
    yy, xx = np.mgrid[0:600, 0:800]
    lumen = (xx - 400) ** 2 + (yy - 300) ** 2 < 30**2
    rgb[lumen] = GLASS  # a gland lumen: white, but inside the tissue
    mask, _ = tissue_from_rgb(rgb)
    assert not mask[20:30, 50:750].any()
    assert not mask[5:8, 5:8].any()
    assert mask[lumen].all()
    assert iou(mask, truth) > 0.97


def test_pale_tissue_is_kept_when_tissue_fills_the_image():
    rgb, _ = he_image(400, 300, margin=0.0)
    pale = (255 - (255 - rgb.astype(float)) * 0.45).astype(np.uint8)  # faintly stained half
    rgb[:, :200] = pale[:, :200]
    mask, _ = tissue_from_rgb(rgb)
    yy, xx = np.mgrid[0:300, 0:400]
    inside = ((xx - 200) / 200) ** 2 + ((yy - 150) / 150) ** 2 <= 0.9
    assert mask[inside].mean() > 0.99


def test_blank_slide_is_an_input_error(tmp_path):
    path = tmp_path / "blank.png"
    rgb = np.full((300, 400, 3), 240, dtype=np.uint8) + np.random.default_rng(0).integers(0, 6, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    with pytest.raises(InputError, match=r"blank\.png: no tissue found"):
        detect_tissue(open_image(path))


def test_detect_tissue_scale_maps_level0_points(tmp_path):
    rgb, truth = he_image(1000, 600)
    path = tmp_path / "slide.png"
    Image.fromarray(rgb).save(path)
    tissue = detect_tissue(open_image(path), max_px=250)
    assert tissue.mask.shape == (150, 250) and tissue.scale == pytest.approx(0.25)
    assert tissue.fraction == pytest.approx(truth.mean(), abs=0.02)
    points = np.array([[500, 300], [5, 5], [995, 300], [-10, 300], [500, 600], [1e6, 0]])
    np.testing.assert_array_equal(tissue.contains(points), [True, False, False, False, False, False])
    rng = np.random.default_rng(1)
    xy = np.column_stack([rng.uniform(0, 1000, 2000), rng.uniform(0, 600, 2000)])
    agree = tissue.contains(xy) == truth[xy[:, 1].astype(int), xy[:, 0].astype(int)]
    assert agree.mean() > 0.97  # only points near the outline may differ


def test_resized_mask_is_uint8_nearest():
    mask = np.zeros((4, 6), dtype=bool)
    mask[:2, :3] = True
    out = TissueMask(mask, scale=1.0, threshold=0.1).resized((8, 12))
    assert out.dtype == np.uint8 and out.shape == (8, 12)
    assert out[:4, :6].all() and not out[4:].any() and not out[:, 6:].any()
