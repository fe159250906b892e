"""Writing output files so that a crash or a kill never leaves a half-written one that looks valid."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp)`` on a hidden temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic within one file system: readers see the old file or
    the complete new one. The temporary file is opened like any other, so the
    result gets the usual permissions (umask), and it is removed on failure.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """:func:`write_atomically` for UTF-8 text."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes_atomically(path: str | Path, data: bytes) -> Path:
    """:func:`write_atomically` for bytes."""
    return write_atomically(path, lambda tmp: tmp.write_bytes(data))
