"""Fixtures of the bench tests: a tiny HEST-Benchmark task folder written on demand."""

from __future__ import annotations

import json
from types import SimpleNamespace

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

SPOTS = {"S1": 12, "S2": 15, "S3": 10}
UM_PER_PX = 0.5
GENES = [f"G{i}" for i in range(8)]


def make_hest_bench(task_dir, spots=SPOTS, um_per_px=UM_PER_PX, split_columns=None):
    """adata/, patches/, splits/ (2 official folds) and var_50genes.json for a few samples."""
    rng = np.random.default_rng(0)
    for sub in ("adata", "patches", "splits"):
        (task_dir / sub).mkdir(parents=True, exist_ok=True)
    half = 56 / um_per_px  # a 112 µm patch centred on its spot
    for k, (sid, n) in enumerate(spots.items()):
        barcodes = [f"{sid}-bc{i}" for i in range(n)]
        top_left = np.stack([1000 + np.arange(n) * 220, 500 + (np.arange(n) % 4) * 220], axis=1)
        coarse = rng.integers(0, 255, size=(n, 14, 14, 3), dtype=np.uint8)
        with h5py.File(task_dir / "patches" / f"{sid}.h5", "w") as f:
            f["img"] = coarse.repeat(16, axis=1).repeat(16, axis=2)
            f["coords"] = top_left
            f["barcode"] = np.array([b.encode() for b in barcodes]).reshape(-1, 1)
        # The h5ad lists its spots in another order, plus one spot without a patch.
        order = rng.permutation(n)
        obs_barcodes = [barcodes[i] for i in order] + [f"{sid}-nopatch"]
        centres = np.vstack([top_left[order] + half, [[0.0, 0.0]]])
        counts = rng.poisson(2 + k, size=(n + 1, len(GENES))).astype(np.float32)
        adata = ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame(index=obs_barcodes), var=pd.DataFrame(index=GENES))
        adata.obsm["spatial"] = centres
        adata.write_h5ad(task_dir / "adata" / f"{sid}.h5ad")
    folds = [(["S1", "S2"], ["S3"]), (["S3"], ["S1", "S2"])]
    for k, sides in enumerate(folds):
        for side, ids in zip(("train", "test"), sides):
            table = pd.DataFrame(
                {"sample_id": ids, "patches_path": [f"patches/{s}.h5" for s in ids], "expr_path": [f"adata/{s}.h5ad" for s in ids]}
            )
            for column, values in (split_columns or {}).items():
                table[column] = [values[s] for s in ids]
            table.to_csv(task_dir / "splits" / f"{side}_{k}.csv", index=False)
    (task_dir / "var_50genes.json").write_text(json.dumps({"genes": GENES[:5]}))
    return task_dir


@pytest.fixture(scope="session")
def hest_bench() -> SimpleNamespace:
    """``make(task_dir, spots=..., um_per_px=..., split_columns=...)`` and the constants it uses."""
    return SimpleNamespace(make=make_hest_bench, SPOTS=SPOTS, UM_PER_PX=UM_PER_PX, GENES=GENES)
