"""The HDF5 embedding cache: ``{cache}/{encoder}/{sample_id}.h5``.

Layout (DESIGN.md §2): ``features`` (N, D) float32/float16, ``coords``
(N, 2) int64 top-left level-0 pixels, ``barcodes`` (N,) UTF-8, plus
provenance attributes.

Crash safety: a run writes ``{sample_id}.h5.partial``, batch by batch, and
records how many rows are done in the ``n_done`` attribute after each
flushed batch. Only a finished file is renamed to ``{sample_id}.h5`` (an
atomic rename on one file system), so a file with the final name is always
complete; a killed run resumes from the partial file when the settings
that produced it (its fingerprint) are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from virtualst.errors import InputError

FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
#: Dataset names other tools use for the same arrays (HEST, TRIDENT).
FEATURE_KEYS = ("features", "embeddings", "feats")
BARCODE_KEYS = ("barcodes", "barcode")


def cache_path(cache_dir: str | Path, encoder: str, sample_id: str) -> Path:
    """Return the cache file of one sample embedded by one encoder."""
    safe_encoder = encoder.replace("/", "__").replace(":", "_")
    return Path(cache_dir) / safe_encoder / f"{sample_id}.h5"


def partial_path(path: Path) -> Path:
    """Return where an unfinished cache file lives while it is written."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def fingerprint(settings: dict[str, Any]) -> str:
    """Hash the settings that must match for a cache to be reused or resumed."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass
class Embeddings:
    """Embeddings of one sample read back from a cache file.

    Attributes
    ----------
    features
        (N, D) float array.
    coords
        (N, 2) int64 top-left level-0 pixel of each tile.
    barcodes
        (N,) spot barcodes as ``str``.
    attrs
        Provenance attributes (empty for foreign files that carry none).
    path
        The file read.
    """

    features: np.ndarray
    coords: np.ndarray
    barcodes: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.features)


def decode_strings(values: np.ndarray) -> np.ndarray:
    flat = np.asarray(values).reshape(len(values), -1)[:, 0]
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in flat], dtype=object).astype(str)


def _attr_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(path: str | Path) -> dict[str, Any]:
    """Return the attributes of a cache file without reading its arrays."""
    with h5py.File(path, "r") as f:
        return {k: _attr_value(v) for k, v in f.attrs.items()}


def read_embeddings(path: str | Path) -> Embeddings:
    """Read a cache file written by virtualst, HEST or TRIDENT.

    Parameters
    ----------
    path
        An ``.h5`` file.

    Raises
    ------
    InputError
        When the file is unreadable, unfinished, or lacks the arrays.
    """
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        raise InputError(path, "is an unfinished embedding cache (the run was interrupted); re-run embed to resume")
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read HDF5 file: {exc}") from None
    with f:
        attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
        if "complete" in attrs and not attrs["complete"]:
            raise InputError(path, "embedding cache is marked incomplete")
        feature_key = next((k for k in FEATURE_KEYS if k in f), None)
        if feature_key is None:
            raise InputError(path, f"no feature array (looked for {', '.join(FEATURE_KEYS)})")
        features = np.asarray(f[feature_key][()])
        # TRIDENT/HEST sometimes store (1, N, D) or (N, 1, D).
        features = features.reshape(-1, features.shape[-1])
        if "coords" not in f:
            raise InputError(path, "no 'coords' array")
        coords = np.asarray(f["coords"][()]).reshape(-1, 2).astype(np.int64)
        barcode_key = next((k for k in BARCODE_KEYS if k in f), None)
        barcodes = decode_strings(f[barcode_key][()]) if barcode_key else np.array([f"{x}_{y}" for x, y in coords])
    if not (len(features) == len(coords) == len(barcodes)):
        raise InputError(
            path, f"arrays disagree: {len(features)} features, {len(coords)} coords, {len(barcodes)} barcodes"
        )
    return Embeddings(features=features, coords=coords, barcodes=barcodes, attrs=attrs, path=path)


def is_complete(path: str | Path, expected_fingerprint: str | None = None) -> bool:
    """Whether ``path`` is a finished virtualst cache (with matching settings)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        attrs = read_attrs(path)
    except OSError:
        return False
    if not attrs.get("complete", False):
        return False
    return expected_fingerprint is None or attrs.get("fingerprint") == expected_fingerprint


def resume_point(path: str | Path, expected_fingerprint: str, n: int, dim: int) -> int:
    """Rows already done in the unfinished cache of ``path`` (0 when there is none to resume).

    Reads only: a partial file made with other settings is left for
    :class:`CacheWriter` to replace.
    """
    partial = partial_path(Path(path))
    try:
        with h5py.File(partial, "r") as f:
            if _matches(f, expected_fingerprint, n, dim):
                return int(f.attrs["n_done"])
    except OSError:
        pass
    return 0


def _matches(f: h5py.File, expected_fingerprint: str, n: int, dim: int) -> bool:
    return f.attrs.get("fingerprint") == expected_fingerprint and "features" in f and f["features"].shape == (n, dim)


class CacheWriter:
    """Write one sample's embeddings batch by batch, resumably.

    Parameters
    ----------
    path
        Final cache file (``{cache}/{encoder}/{sample_id}.h5``).
    barcodes, coords
        Per-tile barcodes and top-left coordinates, written up front.
    dim
        Feature dimension.
    attrs
        Provenance attributes; must contain ``fingerprint``.
    dtype
        Storage dtype of ``features`` (float32 or float16).
    extra
        Other per-tile arrays to store (e.g. ``edge`` flags).

    Notes
    -----
    Use as a context manager; call :meth:`write` with consecutive batches
    starting at :attr:`n_done`, then :meth:`finalize`. An exception leaves
    the partial file in place so the next run resumes.
    """

    def __init__(
        self,
        path: str | Path,
        barcodes: np.ndarray,
        coords: np.ndarray,
        dim: int,
        attrs: dict[str, Any],
        dtype: str = "float32",
        extra: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.n = len(barcodes)
        self.dim = dim
        self.fingerprint = attrs["fingerprint"]
        self._file = self._open_or_create(np.asarray(barcodes), np.asarray(coords), attrs, np.dtype(dtype), extra or {})

    # ----------------------------------------------------------------- set-up
    def _resumable(self) -> h5py.File | None:
        if not self.partial.exists():
            return None
        try:
            f = h5py.File(self.partial, "a")
        except OSError:
            # A kill during a metadata write can leave an unreadable file: start over.
            self.partial.unlink()
            return None
        if not _matches(f, self.fingerprint, self.n, self.dim):
            f.close()
            self.partial.unlink()
            return None
        return f

    def _open_or_create(self, barcodes, coords, attrs, dtype, extra) -> h5py.File:
        f = self._resumable()
        if f is not None:
            return f
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.partial, "w")
        chunk_rows = max(1, min(self.n, 1024))
        f.create_dataset("features", shape=(self.n, self.dim), dtype=dtype, chunks=(chunk_rows, self.dim))
        f.create_dataset("coords", data=coords.astype(np.int64))
        f.create_dataset("barcodes", data=barcodes.astype(object), dtype=h5py.string_dtype("utf-8"))
        for name, values in extra.items():
            f.create_dataset(name, data=values)
        for key, value in attrs.items():
            f.attrs[key] = value if not isinstance(value, (dict, list)) else json.dumps(value)
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["complete"] = False
        f.attrs["n_done"] = 0
        f.flush()
        return f

    # ---------------------------------------------------------------- writing
    @property
    def n_done(self) -> int:
        """Rows already written (and flushed)."""
        return int(self._file.attrs["n_done"])

    def write(self, start: int, features: np.ndarray) -> None:
        """Write rows ``start:start+len(features)``; ``start`` must equal :attr:`n_done`."""
        if start != self.n_done:
            raise RuntimeError(f"batch starts at row {start} but {self.n_done} rows are done")
        stop = start + len(features)
        self._file["features"][start:stop] = features
        # Data first, then the counter: a kill between the two only redoes a batch.
        self._file.flush()
        self._file.attrs["n_done"] = stop
        self._file.flush()

    def finalize(self) -> Path:
        """Mark the file complete and move it to its final name."""
        if self.n_done != self.n:
            raise RuntimeError(f"cannot finalise {self.partial}: {self.n_done}/{self.n} rows written")
        self._file.attrs["complete"] = True
        self._file.attrs["completed_at"] = datetime.now(timezone.utc).isoformat()
        self._file.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close the partial file (kept on disk for resuming)."""
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
