"""A tiny HEST-Benchmark task folder, written here, read end to end."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from virtualst.bench.hest_bench import HestBenchTask, estimate_um_per_px
from virtualst.bench.tasks import get_task
from virtualst.embed.cache import partial_path, read_embeddings
from virtualst.embed.runner import EmbedSettings, FeatureExtractor
from virtualst.errors import InputError


def _adata_rows(task_dir, sid, barcodes):
    adata = ad.read_h5ad(task_dir / "adata" / f"{sid}.h5ad")
    return adata, [list(adata.obs_names).index(b) for b in barcodes]


@pytest.fixture(scope="module")
def encoder():
    from virtualst.embed.encoders import load_encoder

    return load_encoder("efficientnet_lite0")


def test_task_folder_lists_samples_genes_and_official_folds(hest_bench, tmp_path):
    bench = HestBenchTask(hest_bench.make(tmp_path / "IDC"))
    assert bench.sample_ids == ["S1", "S2", "S3"]
    assert bench.genes() == hest_bench.GENES[:5]
    assert bench.patient_ids() == {"S1": None, "S2": None, "S3": None}
    folds = bench.folds()
    assert [(f.name, f.train, f.test) for f in folds] == [("official-0", ("S1", "S2"), ("S3",)), ("official-1", ("S3",), ("S1", "S2"))]
    # HEST-bench names no patients: each sample stands for itself, and the folds say so.
    assert all(f.patient_disjoint and not f.patients_known for f in folds)


def test_patients_come_from_split_columns_metadata_or_overrides(hest_bench, tmp_path):
    task_dir = hest_bench.make(tmp_path / "T", split_columns={"patient": {"S1": "A", "S2": "A", "S3": "B"}})
    bench = HestBenchTask(task_dir)
    assert bench.patient_ids() == {"S1": "A", "S2": "A", "S3": "B"}
    assert all(f.patient_disjoint and f.patients_known for f in bench.folds())
    assert [f.name for f in bench.folds("leave-one-patient-out")] == ["test-patient-A", "test-patient-B"]

    pd.DataFrame({"id": ["S1", "S2", "S3"], "patient": ["X", "Y", "nan"], "pixel_size_um_estimated": [0.25, "", 0.5]}).to_csv(
        task_dir / "metadata.csv", index=False
    )
    bench = HestBenchTask(task_dir, patients={"S2": "X"})
    assert bench.patient_ids() == {"S1": "X", "S2": "X", "S3": "B"}  # override > metadata > split columns
    assert bench.um_per_px("S1") == 0.25 and bench.um_per_px("S2") is None
    assert [f.patient_disjoint for f in bench.folds()] == [True, True]  # S3 (B) vs S1, S2 (X)


def test_hest_bench_task_end_to_end_with_a_killed_run_resumed(hest_bench, tmp_path, encoder, monkeypatch):
    task_dir = hest_bench.make(tmp_path / "bench" / "IDC")
    monkeypatch.setattr("virtualst.embed.encoders.load_encoder", lambda *a, **k: encoder)
    task = get_task("IDC", tmp_path / "bench")
    assert task.gene_spec().genes == tuple(hest_bench.GENES[:5]) and task.normalization[0] == "log1p"
    settings = EmbedSettings(batch_size=8, num_workers=0, device="cpu")
    cache = tmp_path / "cache"

    real_call = FeatureExtractor.__call__
    calls = {"n": 0}

    def dies_on_fourth_batch(self, tiles):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_call(self, tiles)

    monkeypatch.setattr(FeatureExtractor, "__call__", dies_on_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        task.load("efficientnet_lite0", cache, settings, show_progress=False)
    # S1 (12 patches) finished in batches of 8 + 4; S2 (15) died after its first batch.
    assert (cache / "efficientnet_lite0" / "S1.h5").exists()
    assert partial_path(cache / "efficientnet_lite0" / "S2.h5").exists()

    seen = []
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, tiles: seen.append(len(tiles)) or real_call(self, tiles))
    data = task.load("efficientnet_lite0", cache, settings, show_progress=False)
    assert seen == [7, 8, 2], "S2 resumes at row 8; S3 is embedded whole"

    assert [d.sample_id for d in data] == ["S1", "S2", "S3"]
    for d in data:
        emb = read_embeddings(cache / "efficientnet_lite0" / f"{d.sample_id}.h5")
        assert d.n_spots == hest_bench.SPOTS[d.sample_id] and d.features.shape == (hest_bench.SPOTS[d.sample_id], 1280)
        np.testing.assert_array_equal(d.features, emb.features)
        np.testing.assert_array_equal(d.barcodes, [f"{d.sample_id}-bc{i}" for i in range(d.n_spots)])
        adata, rows = _adata_rows(task_dir, d.sample_id, d.barcodes)
        np.testing.assert_array_equal(d.counts.toarray(), adata.X[rows].toarray())  # aligned by barcode, the extra spot dropped
        assert list(d.genes) == hest_bench.GENES and d.patient_id == d.sample_id
        # Pixel size estimated from the centred patches: 0.5 µm/px.
        np.testing.assert_allclose(d.coords_um, adata.obsm["spatial"][rows] * hest_bench.UM_PER_PX)
        assert emb.attrs["input"] == "patches" and emb.attrs["tile_um"] == pytest.approx(112.0)

    seen.clear()
    again = task.load("efficientnet_lite0", cache, settings, show_progress=False)
    assert seen == [] and len(again) == 3, "complete caches are reused"
    assert [f.name for f in task.folds()] == ["official-0", "official-1"]


def test_sample_data_uses_metadata_pixel_size_or_warns_when_unknown(hest_bench, tmp_path, encoder, monkeypatch):
    task_dir = hest_bench.make(tmp_path / "T", spots={"S1": 6, "S2": 5, "S3": 4})
    monkeypatch.setattr("virtualst.embed.encoders.load_encoder", lambda *a, **k: encoder)
    pd.DataFrame({"sample_id": ["S1"], "pixel_size_um_estimated": [0.25]}).to_csv(task_dir / "meta.csv", index=False)
    bench = HestBenchTask(task_dir, metadata=task_dir / "meta.csv")
    data = bench.load("efficientnet_lite0", tmp_path / "cache", EmbedSettings(num_workers=0, device="cpu"), show_progress=False)
    adata, rows = _adata_rows(task_dir, "S1", data[0].barcodes)
    np.testing.assert_allclose(data[0].coords_um, adata.obsm["spatial"][rows] * 0.25)

    # No metadata and no obsm['spatial']: the pixel size is unknown.
    adata = ad.read_h5ad(task_dir / "adata" / "S2.h5ad")
    del adata.obsm["spatial"]
    adata.write_h5ad(task_dir / "adata" / "S2.h5ad")
    emb = read_embeddings(tmp_path / "cache" / "efficientnet_lite0" / "S2.h5")
    with pytest.warns(UserWarning, match="pixel size unknown"):
        d = bench.sample_data("S2", emb)
    assert np.isnan(d.coords_um).all()


def test_estimate_um_per_px_refuses_uncentred_patches():
    top_left = np.array([[0, 0], [300, 0], [0, 300]])
    assert estimate_um_per_px(top_left + 224, top_left) == pytest.approx(0.25)
    assert estimate_um_per_px(top_left + [[224, 224], [100, 100], [224, 224]], top_left) is None
    assert estimate_um_per_px(top_left - 5, top_left) is None


def test_bad_task_folders_give_clear_errors(hest_bench, tmp_path):
    with pytest.raises(InputError, match="task folder not found"):
        HestBenchTask(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a HEST-Benchmark task folder"):
        HestBenchTask(tmp_path / "empty")

    task_dir = hest_bench.make(tmp_path / "T")
    (task_dir / "patches" / "S3.h5").unlink()
    with pytest.raises(InputError, match=r"S3\.h5: patch file of sample 'S3' not found \(listed in test_0\.csv\)"):
        HestBenchTask(task_dir).patch_files()

    task_dir = hest_bench.make(tmp_path / "U")
    (task_dir / "var_50genes.json").unlink()
    with pytest.raises(InputError, match="var_50genes.json"):
        HestBenchTask(task_dir).genes()

    bench = HestBenchTask(task_dir)
    emb = type("E", (), {"barcodes": np.array(["S1-bc0", "S1-zzz"]), "features": np.zeros((2, 3)), "coords": np.zeros((2, 2)), "attrs": {}})()
    with pytest.raises(InputError, match=r"S1\.h5ad: 1 of 2 patch barcodes have no expression row \(e\.g\. S1-zzz\)"):
        bench.sample_data("S1", emb)

    # A split file naming a sample that has no files fails before any embedding.
    pd.DataFrame({"sample_id": ["S1", "S9"]}).to_csv(task_dir / "splits" / "train_0.csv", index=False)
    with pytest.raises(InputError, match=r"S9\.h5: patch file of sample 'S9' not found \(listed in train_0\.csv\)"):
        HestBenchTask(task_dir).load("efficientnet_lite0", tmp_path / "cache")
    pd.DataFrame({"sample_id": ["S1"], "patches_path": ["patches/other.h5"]}).to_csv(task_dir / "splits" / "test_1.csv", index=False)
    with pytest.raises(InputError, match="sample 'S1' has other file paths"):
        HestBenchTask(task_dir).sample_ids
