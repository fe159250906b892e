"""Fitted folds on disk, so that re-running a benchmark only computes what changed.

A fold result (:class:`~virtualst.bench.protocols.FoldResult`) is saved as
``{name}.npz`` (predictions and truths of every test sample, no pickle) and
``{name}.json`` (genes, metadata and the *key*). The key is a sha256 of
everything the result depends on: the row's configuration, normalisation,
gene spec, the fold's sample ids and a fingerprint of each sample's data
(embeddings, counts, genes, coordinates). A stored fold is reused only when
its key matches; the JSON is written last, so a run killed between the two
files leaves a fold that is simply recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from virtualst._version import __version__
from virtualst.bench.data import SampleData
from virtualst.bench.protocols import FoldResult
from virtualst.files import write_atomically, write_text_atomically
from virtualst.heads.base import jsonable

STORE_VERSION = 1


def fingerprint(sample: SampleData) -> str:
    """sha256 over a sample's embeddings, counts, genes, coordinates and barcodes."""
    h = hashlib.sha256()
    counts = sample.counts.tocsr()
    for part in (sample.features, counts.data, counts.indices, counts.indptr, sample.coords_um):
        a = np.ascontiguousarray(part)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    for names in (sample.genes, sample.barcodes):
        h.update("\x1f".join(map(str, names)).encode())
    return h.hexdigest()


def fold_key(config: dict[str, Any], fingerprints: Iterable[str]) -> str:
    """sha256 of a JSON-able run description, the data fingerprints it reads and the virtualst version."""
    text = json.dumps(
        {"store": STORE_VERSION, "virtualst": __version__, "config": jsonable(config), "data": list(fingerprints)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def save_fold(base: Path, key: str, result: FoldResult) -> None:
    """Write ``base.npz`` then ``base.json`` (the JSON marks the pair complete)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    ids = list(result.predictions)
    arrays = {f"pred_{i}": result.predictions[sid] for i, sid in enumerate(ids)}
    arrays.update({f"truth_{i}": result.truths[sid] for i, sid in enumerate(ids)})

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    npz = base.with_suffix(".npz")
    write_atomically(npz, write_npz)
    record = {"key": key, "genes": result.genes, "test_samples": ids, "metadata": jsonable(result.metadata)}
    write_text_atomically(base.with_suffix(".json"), json.dumps(record))


def load_fold(base: Path, key: str) -> FoldResult | None:
    """The stored result at ``base`` when its key is ``key``, else ``None`` (missing, stale or unreadable)."""
    try:
        record = json.loads(base.with_suffix(".json").read_text())
        if record.get("key") != key:
            return None
        with np.load(base.with_suffix(".npz"), allow_pickle=False) as data:
            ids = record["test_samples"]
            predictions = {sid: data[f"pred_{i}"] for i, sid in enumerate(ids)}
            truths = {sid: data[f"truth_{i}"] for i, sid in enumerate(ids)}
    except (OSError, ValueError, KeyError):
        return None
    return FoldResult(genes=list(record["genes"]), predictions=predictions, truths=truths, metadata=record["metadata"])
