"""Tiny H&E-like slides and a tiny fitted GenePredictor for the whole-slide prediction tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image
from scipy import ndimage

from virtualst.sample import Sample

#: Colours of eosin-rich stroma and haematoxylin-rich nuclei, and of bare glass.
PINK = np.array([230.0, 150.0, 190.0])
PURPLE = np.array([120.0, 60.0, 150.0])
GLASS = 245.0

#: Tiles for the test model: 64 px instead of 224 keeps the encoder fast; 112 µm as the default.
TEST_TILE_PX = 64


def he_image(width: int, height: int, seed: int = 0, margin: float = 0.12) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like RGB image: textured pink/purple ellipse of tissue on white glass.

    Returns ``(rgb uint8 (h, w, 3), tissue bool (h, w))``; ``margin`` is the
    fraction of each side left as glass around the ellipse.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rx, ry = width * (0.5 - margin), height * (0.5 - margin)
    tissue = ((xx - width / 2) / rx) ** 2 + ((yy - height / 2) / ry) ** 2 <= 1
    texture = ndimage.gaussian_filter(rng.normal(size=(height, width)), 6)
    texture = (texture - texture.min()) / (np.ptp(texture) + 1e-9)
    rgb = PINK * (1 - texture[..., None]) + PURPLE * texture[..., None]
    rgb = np.where(tissue[..., None], rgb, GLASS) + rng.normal(0, 4, size=(height, width, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8), tissue


def write_tiff(path: Path, rgb: np.ndarray, mpp: float | None, levels: int = 2) -> Path:
    """A tiled, JPEG-compressed pyramidal TIFF; resolution tags (pixels per cm) carry ``mpp``."""
    import tifffile

    def resolution(factor: int) -> dict:
        if mpp is None:
            return {}
        return {"resolution": (1e4 / (mpp * factor), 1e4 / (mpp * factor)), "resolutionunit": "CENTIMETER"}

    options = {"tile": (256, 256), "compression": "jpeg", "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(rgb, subifds=levels, **options, **resolution(1))
        for level in range(1, levels + 1):
            factor = 2**level
            small = np.asarray(Image.fromarray(rgb).reduce(factor))
            tif.write(small, subfiletype=1, **options, **resolution(factor))
    return path


def training_sample(directory: Path, n_side: int = 6, um_per_px: float = 0.5) -> Sample:
    """A measured sample whose counts follow how dark (purple) each spot is, so the heads learn something."""
    from virtualst.embed.images import open_image

    pitch = 200
    size = pitch * (n_side + 1)
    rgb, _ = he_image(size, size, seed=1, margin=0.0)
    path = directory / "train.png"
    Image.fromarray(rgb).save(path)
    xs, ys = np.meshgrid(np.arange(1, n_side + 1) * pitch, np.arange(1, n_side + 1) * pitch)
    spots = pd.DataFrame({"barcode": [f"{x}x{y}" for x, y in zip(xs.ravel(), ys.ravel())], "x": xs.ravel(), "y": ys.ravel(), "in_tissue": True})
    darkness = np.array([255 - rgb[y - 50 : y + 50, x - 50 : x + 50].mean() for x, y in zip(spots.x, spots.y)])
    rng = np.random.default_rng(0)
    rates = np.exp(darkness[:, None] / 40 + rng.normal(0, 0.1, size=(len(spots), 4)))
    return Sample(
        sample_id="train",
        spots=spots,
        um_per_px=um_per_px,
        spot_diameter_um=100.0,
        image=open_image(path),
        counts=sp.csr_matrix(rng.poisson(rates)),
        genes=np.array(["GA", "GB", "GC", "GD"]),
        patient_id="P1",
        source=path,
    )


@pytest.fixture(scope="session")
def train_sample(tmp_path_factory) -> Sample:
    """36 measured spots with 4 genes on a 0.5 µm/px PNG."""
    return training_sample(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="session")
def fitted_model(train_sample, tmp_path_factory):
    """A ridge GenePredictor (3 genes) on efficientnet_lite0 embeddings of 64 px / 112 µm tiles."""
    from virtualst.embed.runner import EmbedSettings, embed_samples
    from virtualst.embed.tiling import TileSpec
    from virtualst.heads.predictor import GenePredictor
    from virtualst.heads.targets import TargetSpec

    settings = EmbedSettings(tile=TileSpec(px=TEST_TILE_PX), batch_size=32, device="cpu")
    (cache,) = embed_samples([train_sample], tmp_path_factory.mktemp("train-cache"), settings, show_progress=False)
    return GenePredictor(head="ridge", target=TargetSpec("log1p", "hvg:3")).fit([cache], [train_sample])


@pytest.fixture(scope="session")
def saved_model(fitted_model, tmp_path_factory) -> Path:
    """``fitted_model`` saved as a model directory."""
    return fitted_model.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def he_jpeg(tmp_path_factory) -> Path:
    """A 1600x1200 H&E-like JPEG (no pixel size in its metadata)."""
    rgb, _ = he_image(1600, 1200, seed=2)
    path = tmp_path_factory.mktemp("jpeg") / "slide.jpg"
    Image.fromarray(rgb).save(path, quality=90)
    return path


@pytest.fixture(scope="session")
def he_tiff(tmp_path_factory) -> Path:
    """A 2048x1536 pyramidal TIFF at 0.5 µm/px (resolution tags), tissue covering ~60%."""
    rgb, _ = he_image(2048, 1536, seed=3)
    return write_tiff(tmp_path_factory.mktemp("tiff") / "slide.tif", rgb, mpp=0.5)
