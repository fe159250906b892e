"""The HDF5 cache: layout, crash safety, foreign (HEST/TRIDENT) files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from virtualst.embed.cache import (
    CacheWriter,
    cache_path,
    fingerprint,
    is_complete,
    partial_path,
    read_embeddings,
)
from virtualst.errors import InputError


def _writer(path, n=10, dim=4, fp="abc"):
    barcodes = np.array([f"b{i}" for i in range(n)])
    coords = np.arange(2 * n, dtype=np.int64).reshape(n, 2)
    return CacheWriter(path, barcodes, coords, dim, {"fingerprint": fp, "encoder": "toy"})


def test_cache_path_layout(tmp_path):
    assert cache_path(tmp_path, "uni_v1", "C2") == tmp_path / "uni_v1" / "C2.h5"
    assert cache_path(tmp_path, "hf-hub:org/name", "s").parent.name == "hf-hub_org__name"


def test_fingerprint_depends_on_settings_only():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_write_finalize_read_roundtrip(tmp_path):
    path = tmp_path / "enc" / "s.h5"
    features = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    with _writer(path) as writer:
        writer.write(0, features[:6])
        writer.write(6, features[6:])
        assert not path.exists(), "the final name must only appear when complete"
        writer.finalize()
    assert not partial_path(path).exists()
    emb = read_embeddings(path)
    np.testing.assert_array_equal(emb.features, features)
    assert emb.coords.dtype == np.int64 and emb.coords.shape == (10, 2)
    assert list(emb.barcodes[:2]) == ["b0", "b1"]
    assert emb.attrs["complete"] is True or emb.attrs["complete"] == 1
    assert emb.attrs["encoder"] == "toy"
    assert is_complete(path, "abc") and not is_complete(path, "other")


def test_interrupted_write_resumes_and_never_looks_complete(tmp_path):
    path = tmp_path / "s.h5"
    features = np.ones((10, 4), np.float32)
    writer = _writer(path)
    writer.write(0, features[:4])
    writer.close()  # as if killed after one batch
    assert not path.exists() and partial_path(path).exists()
    with pytest.raises(InputError, match="unfinished"):
        read_embeddings(partial_path(path))

    resumed = _writer(path)
    assert resumed.n_done == 4
    with pytest.raises(RuntimeError, match="starts at row 0"):
        resumed.write(0, features[:4])
    resumed.write(4, features[4:])
    resumed.finalize()
    np.testing.assert_array_equal(read_embeddings(path).features, features)


def test_partial_with_other_settings_is_restarted(tmp_path):
    path = tmp_path / "s.h5"
    writer = _writer(path, fp="old")
    writer.write(0, np.ones((4, 4), np.float32))
    writer.close()
    assert _writer(path, fp="new").n_done == 0


def test_corrupt_partial_is_restarted(tmp_path):
    path = tmp_path / "s.h5"
    partial_path(path).write_bytes(b"not hdf5 at all")
    assert _writer(path).n_done == 0


def test_finalize_refuses_missing_rows(tmp_path):
    writer = _writer(tmp_path / "s.h5")
    writer.write(0, np.ones((3, 4), np.float32))
    with pytest.raises(RuntimeError, match="3/10"):
        writer.finalize()


@pytest.mark.parametrize("layout", ["hest", "trident"])
def test_reads_foreign_layouts(tmp_path, layout):
    path = tmp_path / f"{layout}.h5"
    emb = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    coords = np.arange(10).reshape(5, 2)
    with h5py.File(path, "w") as f:
        if layout == "hest":
            f["embeddings"] = emb
            f["barcode"] = np.array([[f"spot{i}".encode()] for i in range(5)])
            f["coords"] = coords
        else:
            f["features"] = emb[None]  # TRIDENT stores (1, N, D) in some versions
            f["coords"] = coords[None]
    out = read_embeddings(path)
    np.testing.assert_allclose(out.features, emb)
    np.testing.assert_array_equal(out.coords, coords)
    assert len(out.barcodes) == 5
    if layout == "hest":
        assert out.barcodes[3] == "spot3"


def test_unreadable_and_incomplete_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("nope")
    with pytest.raises(InputError, match="bad.h5: cannot read HDF5"):
        read_embeddings(bad)
    marked = tmp_path / "marked.h5"
    with h5py.File(marked, "w") as f:
        f["features"] = np.zeros((2, 2))
        f["coords"] = np.zeros((2, 2))
        f.attrs["complete"] = False
    with pytest.raises(InputError, match="incomplete"):
        read_embeddings(marked)
    mismatched = tmp_path / "mismatch.h5"
    with h5py.File(mismatched, "w") as f:
        f["features"] = np.zeros((3, 2))
        f["coords"] = np.zeros((2, 2))
    with pytest.raises(InputError, match="arrays disagree"):
        read_embeddings(mismatched)
