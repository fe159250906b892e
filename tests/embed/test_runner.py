"""The embedding runner: cache contents, resume, reuse, TTA, workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from virtualst.embed.cache import partial_path, read_embeddings
from virtualst.embed.runner import (
    EmbedSettings,
    FeatureExtractor,
    embed_samples,
    embed_with,
)
from virtualst.embed.tiling import TileSpec, read_tile
from virtualst.errors import InputError

from .conftest import make_sample


@pytest.fixture(scope="module")
def encoder():
    from virtualst.embed.encoders import load_encoder

    return load_encoder("efficientnet_lite0")


@pytest.fixture(scope="module")
def extractor(encoder):
    return FeatureExtractor(encoder, torch.device("cpu"))


def _run(sample, extractor, cache, **kw):
    settings = EmbedSettings(batch_size=kw.pop("batch_size", 5), num_workers=kw.pop("num_workers", 0), **kw)
    (path,) = embed_with(extractor, [sample], cache, settings)
    return path


def test_cache_holds_features_coords_barcodes_and_provenance(toy_sample, extractor, tmp_path):
    path = _run(toy_sample, extractor, tmp_path)
    assert path == tmp_path / "efficientnet_lite0" / "toy.h5"
    emb = read_embeddings(path)
    assert emb.features.shape == (16, 1280) and emb.features.dtype == np.float32
    assert np.isfinite(emb.features).all()
    # 112 µm at 0.5 µm/px = 224 level-0 px: the top-left corner is 112 px above-left of the centre.
    np.testing.assert_array_equal(emb.coords, (toy_sample.centers - 112).round().astype(np.int64))
    np.testing.assert_array_equal(emb.barcodes, toy_sample.barcodes)
    attrs = emb.attrs
    assert attrs["encoder"] == "efficientnet_lite0"
    assert len(attrs["weights_sha256"]) == 64
    assert attrs["tile_px"] == 224 and attrs["tile_um"] == pytest.approx(112.0)
    assert attrs["um_per_px"] == pytest.approx(0.5) and attrs["sample_id"] == "toy"
    assert attrs["complete"] and attrs["n_done"] == 16 and attrs["fingerprint"]
    # Features are the encoder's output on the tile centred on the spot.
    tile, _ = read_tile(toy_sample.image, toy_sample.centers[7], 224.0, 224)
    direct = extractor(torch.from_numpy(tile[None]))
    np.testing.assert_allclose(emb.features[7], direct[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(emb.features[0], emb.features[5]), "different tiles must give different features"


def test_killed_run_resumes_and_matches_uninterrupted_run(toy_sample, extractor, tmp_path, monkeypatch, interrupt_at_batch):
    reference = read_embeddings(_run(toy_sample, extractor, tmp_path / "ref")).features

    real_call = FeatureExtractor.__call__
    interrupt_at_batch(3)
    final = tmp_path / "run" / "efficientnet_lite0" / "toy.h5"
    with pytest.raises(KeyboardInterrupt):
        _run(toy_sample, extractor, tmp_path / "run")
    assert not final.exists() and partial_path(final).exists()
    with pytest.raises(InputError):
        read_embeddings(final)

    seen = []
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, t: seen.append(len(t)) or real_call(self, t))
    assert _run(toy_sample, extractor, tmp_path / "run") == final
    assert sum(seen) == 16 - 10, "only the tiles after the two finished batches are recomputed"
    np.testing.assert_allclose(read_embeddings(final).features, reference, rtol=1e-4, atol=1e-5)


def test_complete_cache_is_reused_and_other_settings_refused(toy_sample, extractor, tmp_path, monkeypatch):
    path = _run(toy_sample, extractor, tmp_path)
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda *a: pytest.fail("a complete cache must be reused"))
    assert _run(toy_sample, extractor, tmp_path) == path
    with pytest.raises(InputError, match="tile_um 112.0 vs 56.0.*--overwrite"):
        _run(toy_sample, extractor, tmp_path, tile=TileSpec(px=224, um=56.0))
    monkeypatch.undo()
    _run(toy_sample, extractor, tmp_path, tile=TileSpec(px=224, um=56.0), overwrite=True)
    assert read_embeddings(path).attrs["tile_um"] == pytest.approx(56.0)


def test_worker_processes_give_the_same_cache(toy_sample, extractor, tmp_path):
    in_process = read_embeddings(_run(toy_sample, extractor, tmp_path / "a", num_workers=0)).features
    workers = read_embeddings(_run(toy_sample, extractor, tmp_path / "b", num_workers=2)).features
    np.testing.assert_allclose(workers, in_process, rtol=1e-5, atol=1e-6)


def test_tta_features_are_invariant_to_rotations_and_flips(encoder):
    extractor = FeatureExtractor(encoder, torch.device("cpu"), tta=True)
    tile = np.random.default_rng(0).integers(0, 255, (1, 224, 224, 3), dtype=np.uint8)
    rotated = np.ascontiguousarray(np.rot90(tile, 1, axes=(1, 2))[:, :, ::-1])
    a, b = extractor(torch.from_numpy(tile)), extractor(torch.from_numpy(rotated))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    plain = FeatureExtractor(encoder, torch.device("cpu"))(torch.from_numpy(tile))
    assert not np.allclose(a, plain, atol=1e-3)


def test_edge_tiles_are_flagged(tmp_path, extractor):
    sample = make_sample(tmp_path, n_side=2, margin=60)  # 60 px < half a tile (112 px)
    path = _run(sample, extractor, tmp_path)
    import h5py

    with h5py.File(path) as f:
        assert f["edge"][()].all()


def test_embed_samples_float16_storage(toy_sample, tmp_path):
    (path,) = embed_samples([toy_sample], tmp_path, EmbedSettings(storage_dtype="float16", num_workers=0), False)
    assert read_embeddings(path).features.dtype == np.float16


def test_complete_caches_are_reused_without_building_the_encoder(tmp_path, monkeypatch):
    from virtualst.embed import runner

    first, second = make_sample(tmp_path, n_side=2, sample_id="a"), make_sample(tmp_path, n_side=2, sample_id="b")
    settings = EmbedSettings(batch_size=4, num_workers=0)
    paths = embed_samples([first], tmp_path / "cache", settings, show_progress=False)
    built = []
    real_make = runner.make_extractor
    monkeypatch.setattr(runner, "make_extractor", lambda s: built.append(s) or real_make(s))
    assert embed_samples([first], tmp_path / "cache", settings, show_progress=False) == paths
    assert built == [], "nothing to do: the encoder is identified from its weights, not built"
    embed_samples([first, second], tmp_path / "cache", settings, show_progress=False)
    assert len(built) == 1, "one cache missing: the encoder is built"


def test_the_engine_is_chosen_for_the_tiles_still_to_embed(tmp_path, monkeypatch):
    from virtualst.embed import runner

    done, new = make_sample(tmp_path, n_side=3, sample_id="done"), make_sample(tmp_path, n_side=2, sample_id="new")
    settings = EmbedSettings(batch_size=4, num_workers=0, device="cpu")
    embed_samples([done], tmp_path / "cache", settings, show_progress=False)
    asked = []
    real_open = runner.open_engine
    monkeypatch.setattr(runner, "open_engine", lambda s, n: asked.append(n) or real_open(s, n))
    embed_samples([done, new], tmp_path / "cache", settings, show_progress=False)
    assert asked == [4], "the 9 tiles of the complete cache do not count towards starting replicas"


def test_encoder_identity_matches_the_loaded_encoder(encoder):
    from virtualst.embed.encoders import describe_encoder

    identity = describe_encoder("efficientnet_lite0")
    assert identity.provenance == encoder.provenance and identity.config == encoder.config
    assert (identity.dim, identity.input_size, identity.mean, identity.std, identity.precision) == (
        encoder.dim, encoder.input_size, encoder.mean, encoder.std, encoder.precision
    )
    assert describe_encoder("local-dir:/nowhere") is None  # its feature size is only known by running it


def test_sample_without_image_is_refused(toy_sample, extractor, tmp_path):
    toy_sample.image = None
    with pytest.raises(InputError, match="no image"):
        _run(toy_sample, extractor, tmp_path)
