"""Stored folds: reused only for the same row, data and fold; half-written ones are recomputed."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from virtualst.bench.data import SampleData
from virtualst.bench.fold_store import fingerprint, fold_key, load_fold, save_fold
from virtualst.bench.protocols import FoldResult


def sample(seed=0, sid="s"):
    rng = np.random.default_rng(seed)
    return SampleData(
        sample_id=sid,
        patient_id="p",
        features=rng.normal(size=(5, 3)),
        counts=sp.csr_matrix(rng.poisson(2, size=(5, 4))),
        genes=np.array(["a", "b", "c", "d"]),
        coords_um=rng.uniform(size=(5, 2)),
        barcodes=np.array([f"b{i}" for i in range(5)]),
    )


def result():
    rng = np.random.default_rng(1)
    return FoldResult(
        genes=["a", "b"],
        predictions={"x": rng.normal(size=(3, 2)), "y": rng.normal(size=(2, 2))},
        truths={"x": rng.normal(size=(3, 2)), "y": rng.normal(size=(2, 2))},
        metadata={"alpha": np.float64(0.5), "fold": "f0"},
    )


def test_fingerprint_changes_with_any_part_of_the_data():
    base = fingerprint(sample())
    assert fingerprint(sample()) == base
    changed = sample()
    changed.features[0, 0] += 1e-6
    assert fingerprint(changed) != base
    changed = sample()
    changed.counts.data[0] += 1
    assert fingerprint(changed) != base
    changed = sample()
    changed.genes[0] = "z"
    assert fingerprint(changed) != base


def test_key_depends_on_config_and_data():
    key = fold_key({"row": "ridge", "norm": "log1p"}, ["abc"])
    assert key == fold_key({"norm": "log1p", "row": "ridge"}, ["abc"])
    assert key != fold_key({"row": "ridge", "norm": "cpm-log1p"}, ["abc"])
    assert key != fold_key({"row": "ridge", "norm": "log1p"}, ["abd"])


def test_round_trip_and_stale_or_broken_folds_are_not_reused(tmp_path):
    base, r = tmp_path / "folds" / "f0", result()
    save_fold(base, "k1", r)
    back = load_fold(base, "k1")
    assert back.genes == r.genes and list(back.predictions) == ["x", "y"]
    for sid in r.predictions:
        np.testing.assert_array_equal(back.predictions[sid], r.predictions[sid])
        np.testing.assert_array_equal(back.truths[sid], r.truths[sid])
    assert back.metadata == {"alpha": 0.5, "fold": "f0"}
    assert load_fold(base, "k2") is None, "another key: recompute"
    base.with_suffix(".npz").write_bytes(b"truncated")
    assert load_fold(base, "k1") is None, "a damaged array file is recomputed, not an error"
    base.with_suffix(".json").unlink()
    assert load_fold(base, "k1") is None
    assert not [p for p in base.parent.iterdir() if p.name.startswith(".")], "no temp files left"
