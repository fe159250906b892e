"""Embedding pre-cut HEST patch files into the cache: contents, provenance, resume, reuse, bad files."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from virtualst.embed.cache import partial_path, read_embeddings
from virtualst.embed.patches import PatchFile, embed_patches_with, read_patch_index
from virtualst.embed.runner import EmbedSettings, FeatureExtractor
from virtualst.errors import InputError


def write_patches(path, n=12, px=224, seed=0, barcodes=None):
    """A HEST-style patch file: img (N, px, px, 3) uint8, coords (N, 2) top-left, barcode (N, 1) bytes."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, size=(n, px // 16, px // 16, 3), dtype=np.uint8)
    img = coarse.repeat(16, axis=1).repeat(16, axis=2)  # blocky texture: distinct, encoder-friendly tiles
    barcodes = barcodes if barcodes is not None else [f"spot{i}" for i in range(n)]
    with h5py.File(path, "w") as f:
        f["img"] = img
        f["coords"] = np.stack([np.arange(n) * 200, np.arange(n) * 100 + 50], axis=1).astype(np.int64)
        f["barcode"] = np.array([b.encode() for b in barcodes]).reshape(-1, 1)
    return img


@pytest.fixture(scope="module")
def extractor():
    from virtualst.embed.encoders import load_encoder

    return FeatureExtractor(load_encoder("efficientnet_lite0"), torch.device("cpu"))


def _run(patches, extractor, cache, **kw):
    settings = EmbedSettings(batch_size=kw.pop("batch_size", 5), num_workers=kw.pop("num_workers", 0), **kw)
    return embed_patches_with(extractor, patches, cache, settings)


def test_cache_holds_patch_features_coords_barcodes_and_provenance(extractor, tmp_path):
    img = write_patches(tmp_path / "S1.h5")
    write_patches(tmp_path / "S2.h5", n=4, seed=1)
    patches = [PatchFile("S1", tmp_path / "S1.h5", patient_id="P1"), PatchFile("S2", tmp_path / "S2.h5", um_per_px=0.25)]
    paths = _run(patches, extractor, tmp_path / "cache")
    assert paths == [tmp_path / "cache" / "efficientnet_lite0" / f"{s}.h5" for s in ("S1", "S2")]
    emb = read_embeddings(paths[0])
    index = read_patch_index(tmp_path / "S1.h5")
    assert emb.features.shape == (12, 1280) and emb.features.dtype == np.float32
    np.testing.assert_array_equal(emb.coords, index.coords)
    np.testing.assert_array_equal(emb.barcodes, [f"spot{i}" for i in range(12)])
    # Features are the encoder's output on the stored patch, unresampled.
    direct = extractor(torch.from_numpy(img[7:8]))
    np.testing.assert_allclose(emb.features[7], direct[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(emb.features[0], emb.features[5])

    attrs = emb.attrs
    assert attrs["complete"] and attrs["n_done"] == 12 and attrs["input"] == "patches"
    assert attrs["encoder"] == "efficientnet_lite0" and len(attrs["weights_sha256"]) == 64
    assert attrs["tile_px"] == 224 and attrs["tile_um"] == pytest.approx(112.0) and attrs["tile_um_per_px"] == pytest.approx(0.5)
    assert math.isnan(attrs["um_per_px"]) and not attrs["um_per_px_known"], "the slide's pixel size is not in a patch file"
    assert attrs["sample_id"] == "S1" and attrs["patient_id"] == "P1"
    assert "none: pre-cut" in attrs["transform"]
    other = read_embeddings(paths[1]).attrs
    assert other["um_per_px"] == pytest.approx(0.25) and other["um_per_px_known"]


def test_killed_patch_run_resumes_and_matches_uninterrupted_run(extractor, tmp_path, monkeypatch, interrupt_at_batch):
    write_patches(tmp_path / "S1.h5", n=13)
    patches = [PatchFile("S1", tmp_path / "S1.h5")]
    reference = read_embeddings(_run(patches, extractor, tmp_path / "ref")[0]).features

    real_call = FeatureExtractor.__call__
    interrupt_at_batch(3)
    final = tmp_path / "run" / "efficientnet_lite0" / "S1.h5"
    with pytest.raises(KeyboardInterrupt):
        _run(patches, extractor, tmp_path / "run")
    assert not final.exists() and partial_path(final).exists()
    with h5py.File(partial_path(final)) as f:
        assert f.attrs["n_done"] == 10 and not f.attrs["complete"]

    seen = []
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, tiles: seen.append(len(tiles)) or real_call(self, tiles))
    (path,) = _run(patches, extractor, tmp_path / "run")
    assert seen == [3], "only the rows after the last flushed batch are computed"
    assert path == final and not partial_path(final).exists()
    np.testing.assert_allclose(read_embeddings(path).features, reference, rtol=1e-5, atol=1e-5)

    seen.clear()
    # Reused as is, even when the slide's pixel size is now known (metadata, not a setting of the features).
    _run([PatchFile("S1", tmp_path / "S1.h5", um_per_px=0.3)], extractor, tmp_path / "run")
    assert seen == []


def test_other_settings_never_silently_replace_a_cache(extractor, tmp_path):
    write_patches(tmp_path / "S1.h5", n=3)
    patches = [PatchFile("S1", tmp_path / "S1.h5")]
    _run(patches, extractor, tmp_path)
    with pytest.raises(InputError, match="cache exists with other settings.*storage_dtype"):
        _run(patches, extractor, tmp_path, storage_dtype="float16")
    (path,) = _run(patches, extractor, tmp_path, storage_dtype="float16", overwrite=True)
    assert read_embeddings(path).features.dtype == np.float16


def test_bad_patch_files_are_refused(tmp_path):
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["img"] = np.zeros((2, 224, 224, 3), np.uint8)
        f["coords"] = np.zeros((2, 2))
    with pytest.raises(InputError, match="bad.h5: no 'barcode' array"):
        read_patch_index(bad)
    with h5py.File(bad, "w") as f:
        f["img"] = np.zeros((2, 224, 200, 3), np.uint8)
    with pytest.raises(InputError, match=r"'img' must be \(N, H, H, 3\) uint8"):
        read_patch_index(bad)
    write_patches(bad, n=3, barcodes=["a", "b", "a"])
    with pytest.raises(InputError, match="duplicate barcode 'a'"):
        read_patch_index(bad)
    bad.write_text("not hdf5")
    with pytest.raises(InputError, match="cannot read patch file"):
        read_patch_index(bad)


def test_worker_processes_give_the_same_features(extractor, tmp_path):
    write_patches(tmp_path / "S1.h5", n=7)
    patches = [PatchFile("S1", tmp_path / "S1.h5")]
    (serial,) = _run(patches, extractor, tmp_path / "serial")
    (parallel,) = _run(patches, extractor, tmp_path / "workers", num_workers=2, batch_size=3)
    np.testing.assert_allclose(read_embeddings(parallel).features, read_embeddings(serial).features, rtol=1e-5, atol=1e-5)
