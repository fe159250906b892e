"""The pipeline-vs-forward benchmark: its measurements, in one process and through encoder replicas."""

from __future__ import annotations

import numpy as np
import pytest

from virtualst.bench.embed_throughput import StoredTileBatches, measure


def test_stored_batches_give_back_the_tiles(tmp_path):
    tiles = np.random.default_rng(0).integers(0, 255, (10, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "t.npy", tiles)
    batches = StoredTileBatches(tmp_path / "t.npy", 10, 4)
    assert [rows.tolist() for _, rows in batches.items] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    job, first, got = batches[2]
    assert (job, first) == (0, 8)
    np.testing.assert_array_equal(got, tiles[8:])


@pytest.mark.realdata
def test_measure_compares_the_pipeline_with_both_forward_arrangements(visium_dir):
    r = measure([visium_dir], batch_size=8, device="cpu", repeats=1, cpu_replicas=2)
    assert (r["replicas"], r["threads"], r["device"]) == (2, 1, "cpu")
    assert len(r["forward_single"]) == len(r["forward_replicas"]) == len(r["pipeline"]) == 1
    assert r["forward_median"] == max(r["forward_single"][0], r["forward_replicas"][0])
    assert r["ratio"] == pytest.approx(r["pipeline"][0] / r["forward_median"])
    assert r["n_tiles"] > 0 and 0 < r["ratio"] < 10
