"""Sample readers: one module per input format, tried in order by :func:`read`.

Each reader module provides ``NAME``, ``DESCRIPTION``, ``detect(path) -> bool``,
``list_samples(path) -> list[str]`` and ``read(path, *, sample_id=None,
patient_id=None, image=None, **kw) -> Sample``. Order matters: the more
specific layouts (Visium, HEST) come before the generic ``.h5ad`` reader.

Examples
--------
>>> import virtualst
>>> sample = virtualst.read("data/her2st", sample_id="C2")          # doctest: +SKIP
>>> sections = virtualst.embed.readers.read_all("data/her2st")      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from virtualst.errors import InputError
from virtualst.sample import Sample

from . import anndata_reader, hest, legacy_st, visium


@dataclass(frozen=True)
class Reader:
    """A named input format."""

    name: str
    description: str
    detect: Callable[[Path], bool]
    read: Callable[..., Sample]
    list_samples: Callable[[Path], list[str]]

    @classmethod
    def from_module(cls, module: ModuleType) -> Reader:
        """Build a reader from a module following the reader protocol."""
        return cls(module.NAME, module.DESCRIPTION, module.detect, module.read, module.list_samples)


#: Registered readers, tried in this order.
READERS: list[Reader] = [Reader.from_module(m) for m in (visium, hest, legacy_st, anndata_reader)]


def register(reader: Reader, *, first: bool = False) -> Reader:
    """Add a reader (at the end, or before the others with ``first=True``)."""
    if any(r.name == reader.name for r in READERS):
        raise ValueError(f"a reader named {reader.name!r} is already registered")
    READERS.insert(0, reader) if first else READERS.append(reader)
    return reader


def find_reader(path: str | Path) -> Reader:
    """The first registered reader that recognises ``path``.

    Raises
    ------
    InputError
        When ``path`` does not exist or no reader recognises it.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or directory")
    for reader in READERS:
        if reader.detect(path):
            return reader
    expected = "; ".join(r.description for r in READERS)
    raise InputError(path, f"not a recognised sample: expected {expected}")


def read(
    path: str | Path,
    *,
    sample_id: str | None = None,
    patient_id: str | None = None,
    image: Any = None,
    **kw: Any,
) -> Sample:
    """Read one sample from any supported format.

    Parameters
    ----------
    path
        File or directory (her2st root, STUtility folder, Space Ranger
        ``outs/``, HEST-1k root, ``.h5ad``...).
    sample_id
        Which section to read when ``path`` holds several; for single-sample
        formats, a name overriding the default.
    patient_id
        Overrides the patient found in the files.
    image
        Image path or handle overriding the one found in the files.
    **kw
        Reader-specific options (e.g. ``um_per_px``, ``spot_diameter_um``).

    Returns
    -------
    Sample
        A validated sample.
    """
    reader = find_reader(path)
    return reader.read(Path(path), sample_id=sample_id, patient_id=patient_id, image=image, **kw)


def list_samples(path: str | Path) -> list[str]:
    """Sample ids available at ``path``."""
    return find_reader(path).list_samples(Path(path))


def read_all(path: str | Path, **kw: Any) -> list[Sample]:
    """Read every sample at ``path`` (e.g. all sections of a her2st root)."""
    reader = find_reader(path)
    path = Path(path)
    return [reader.read(path, sample_id=sid, **kw) for sid in reader.list_samples(path)]


__all__ = ["READERS", "Reader", "find_reader", "list_samples", "read", "read_all", "register"]
