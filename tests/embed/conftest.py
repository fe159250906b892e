"""Tiny synthetic samples for the embedding tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from virtualst.sample import Sample


def make_sample(tmp_path, n_side: int = 4, um_per_px: float = 0.5, sample_id: str = "toy", margin: int = 150) -> Sample:
    """A textured PNG with an ``n_side`` x ``n_side`` grid of spots 100 µm apart."""
    from virtualst.embed.images import open_image

    rng = np.random.default_rng(0)
    pitch = int(round(100 / um_per_px))
    size = 2 * margin + (n_side - 1) * pitch
    # Smooth random texture so different tiles give different features.
    coarse = rng.integers(0, 255, size=(size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    path = tmp_path / f"{sample_id}.png"
    Image.fromarray(pixels).save(path)
    xs, ys = np.meshgrid(np.arange(n_side), np.arange(n_side))
    spots = pd.DataFrame(
        {
            "barcode": [f"{x}x{y}" for x, y in zip(xs.ravel(), ys.ravel())],
            "x": margin + xs.ravel() * pitch,
            "y": margin + ys.ravel() * pitch,
            "in_tissue": True,
        }
    )
    counts = sp.csr_matrix(rng.poisson(3, size=(len(spots), 5)))
    return Sample(
        sample_id=sample_id,
        spots=spots,
        um_per_px=um_per_px,
        spot_diameter_um=100.0,
        image=open_image(path),
        counts=counts,
        genes=np.array([f"G{i}" for i in range(5)]),
        patient_id="P1",
        source=path,
    )


@pytest.fixture
def toy_sample(tmp_path) -> Sample:
    """16 spots on a 0.5 µm/px PNG."""
    return make_sample(tmp_path)


@pytest.fixture
def interrupt_at_batch(monkeypatch):
    """``interrupt_at_batch(n)``: the n-th encoder batch from now raises KeyboardInterrupt (a killed run)."""
    from virtualst.embed.extractor import FeatureExtractor

    def arm(n: int) -> None:
        calls = {"n": 0}
        real_call = FeatureExtractor.__call__

        def dies(self, tiles):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real_call(self, tiles)

        monkeypatch.setattr(FeatureExtractor, "__call__", dies)

    return arm
