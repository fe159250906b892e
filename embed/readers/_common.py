"""Small checks shared by the readers: files, columns, images, one-line errors."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from virtualst.errors import InputError


def one_line(exc: BaseException) -> str:
    """Describe ``exc`` on a single line (error messages must stay one line)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` or raise :class:`InputError` saying which file is missing."""
    if not path.is_file():
        raise InputError(path, f"{what} not found")
    return path


def require_columns(table: pd.DataFrame, columns: Iterable[str], path: Path) -> None:
    """Raise :class:`InputError` naming the columns ``table`` lacks."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(
            path, f"missing column(s) {', '.join(missing)} (found: {', '.join(map(str, table.columns))})"
        )


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, turning parse errors into :class:`InputError`."""
    require_file(path, what)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"malformed {what}: {one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise InputError(path, f"malformed {what}: expected a JSON object, got {type(data).__name__}")
    return data


def positive_number(value: Any, path: Path, key: str) -> float:
    """Return ``value`` as a positive finite float or raise :class:`InputError`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(path, f"{key} must be a number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise InputError(path, f"{key} must be a positive number, got {value!r}")
    return number


def open_checked(image: Any, scale: float = 1.0) -> Any:
    """Open an image lazily and fail now, cheaply, if it cannot be read.

    Parameters
    ----------
    image
        A path, or an image handle that already has ``dimensions``.
    scale
        Image pixels per level-0 pixel (e.g. Visium ``tissue_hires_scalef``).

    Returns
    -------
    The image handle from :func:`virtualst.embed.images.open_image`.
    """
    if not isinstance(image, (str, Path)):
        return image  # already a handle
    path = Path(image)
    require_file(path, "image file")
    # imported here: the image backends are heavier than the readers
    from virtualst.embed.images import open_image

    try:
        handle = open_image(path, scale=scale)
        width, height = handle.dimensions  # reads the header only, catches corrupt files early
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001  (any backend failure means an unreadable file)
        raise InputError(path, f"cannot read image ({one_line(exc)})") from exc
    if width <= 0 or height <= 0:
        raise InputError(path, f"image has empty size {width}x{height}")
    return handle


def check_unique(values: pd.Series, path: Path, what: str) -> None:
    """Raise :class:`InputError` when ``values`` holds duplicates."""
    duplicated = values.duplicated()
    if duplicated.any():
        first = values[duplicated].iloc[0]
        raise InputError(path, f"duplicate {what} {first!r} ({int(duplicated.sum())} duplicates)")


def preview(items: Iterable[Any], n: int = 3) -> str:
    """First ``n`` items, comma separated, for short messages."""
    items = list(items)
    head = ", ".join(map(str, items[:n]))
    return head + (", ..." if len(items) > n else "")
