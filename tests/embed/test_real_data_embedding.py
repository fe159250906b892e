"""End to end on the real sections: her2st C2–C5 and the three STUtility MOB sections."""

from __future__ import annotations

import numpy as np
import pytest

import virtualst
from virtualst.embed.cache import partial_path, read_embeddings
from virtualst.embed.runner import EmbedSettings, FeatureExtractor, embed_samples


@pytest.fixture(scope="module")
def real_samples(her2st_dir, mob_dir):
    samples = [s.in_tissue() for s in virtualst.read_all(her2st_dir) + virtualst.read_all(mob_dir)]
    assert sorted(s.sample_id for s in samples) == ["C2", "C3", "C4", "C5", "MOB1", "MOB2", "MOB3"]
    return samples


@pytest.mark.realdata
def test_embed_real_sections_with_resume(real_samples, tmp_path, monkeypatch):
    settings = EmbedSettings(batch_size=64, cpu_replicas=1)  # one process: the interruption below counts its batches
    cache = tmp_path / "cache"

    # Interrupt the first run part-way through the third section.
    real_call = FeatureExtractor.__call__
    budget = {"tiles": real_samples[0].n_spots + real_samples[1].n_spots + 70}

    def interrupted(self, tiles):
        budget["tiles"] -= len(tiles)
        if budget["tiles"] < 0:
            raise KeyboardInterrupt
        return real_call(self, tiles)

    monkeypatch.setattr(FeatureExtractor, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed_samples(real_samples, cache, settings, show_progress=False)
    done = sorted(p.name for p in (cache / "efficientnet_lite0").iterdir())
    third = real_samples[2].sample_id
    assert done == sorted([f"{real_samples[0].sample_id}.h5", f"{real_samples[1].sample_id}.h5", f"{third}.h5.partial"])

    monkeypatch.setattr(FeatureExtractor, "__call__", real_call)
    paths = embed_samples(real_samples, cache, settings, show_progress=False)
    assert not partial_path(paths[2]).exists()

    for sample, path in zip(real_samples, paths):
        emb = read_embeddings(path)
        assert emb.features.shape == (sample.n_spots, 1280)
        assert np.isfinite(emb.features).all()
        np.testing.assert_array_equal(emb.barcodes, sample.barcodes)
        np.testing.assert_array_equal(emb.coords, np.round(sample.centers - emb.attrs["tile_um"] / sample.um_per_px / 2))
        assert emb.attrs["encoder"] == "efficientnet_lite0" and emb.attrs["complete"]
        assert emb.attrs["tile_um"] == pytest.approx(112.0, rel=1e-3)
        assert emb.attrs["um_per_px"] == pytest.approx(sample.um_per_px)
        assert emb.attrs["sample_id"] == sample.sample_id and emb.attrs["patient_id"] == sample.patient_id
        # Tiles differ across the tissue, so must their embeddings.
        assert emb.features.std(axis=0).mean() > 1e-3
