"""Lazy slide images with region reads in level-0 coordinates.

:func:`open_image` returns a :class:`SlideImage`: a small, picklable handle
(path, scale, backend) that opens the file lazily in each process and reads
only the region a tile needs, from the best pyramid level when there is one.

Coordinates
-----------
*Level-0* pixels are the coordinates of the spot table (for Visium: the
full-resolution image, even when only the hires PNG exists). ``scale`` is the
number of native image pixels per level-0 pixel. Pixel ``i`` covers the
continuous interval ``[i, i + 1)``, so a box ``[x0, x0 + w0)`` maps to
``[x0 * f, (x0 + w0) * f)`` on a level with ``f`` level pixels per level-0
pixel.

Backends
--------
A registry maps the *kind* of a file (sniffed from its first bytes, or its
suffix for vendor formats) to backends in order of preference:

========  ==================================
kind      backends
========  ==================================
jpeg/png  pil (decoded once, then sliced; JPEGs with restart markers by row bands)
tiff      tiffslide, openslide, pil
wsi       openslide, tiffslide (SVS, NDPI...)
========  ==================================
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from virtualst.embed.jpeg_bands import BandedJpeg, decode_rgb, restart_layout
from virtualst.errors import InputError, MissingDependencyError

# A her2st JPEG is 92 Mpx, above PIL's 89 Mpx bomb warning; 1 Gpx (3 GB decoded
# RGB) still protects against absurd files. Only ever raise the limit.
_PIL_MAX_PIXELS = 1_000_000_000
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < _PIL_MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = _PIL_MAX_PIXELS

#: Relative slack when comparing level resolutions (level sizes are rounded).
_LEVEL_TOL = 1e-3


# --------------------------------------------------------------------------- readers
class Reader(Protocol):
    """What a backend opens: a multi-level RGB raster, read in level pixels."""

    #: (width, height) of every level, finest first.
    level_dimensions: tuple[tuple[int, int], ...]
    #: µm per native (level 0) pixel, when the file says so.
    mpp: float | None
    #: Whether the object may be used in a forked child (no open file handles).
    fork_safe: bool

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Return ``(h, w, 3)`` uint8 RGB of a region lying inside ``level``."""

    def close(self) -> None:
        """Release file handles and decoded pixels."""


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """Convert a (h, w[, c]) array of any common layout to uint8 RGB."""
    if arr.dtype == np.uint16:  # 16-bit scans: keep the high byte
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    channels = arr.shape[2]
    if channels == 1:
        return np.repeat(arr, 3, axis=2)
    if channels == 4:  # straight alpha: composite onto white background
        alpha = arr[..., 3:4].astype(np.uint16)
        rgb = arr[..., :3].astype(np.uint16)
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


class PILReader:
    """JPEG/PNG (and other rasters PIL knows), decoded on the first read.

    JPEGs with restart markers at row boundaries (her2st's) are decoded band
    by band, only the rows that reads ask for (:mod:`~virtualst.embed.jpeg_bands`,
    bit-identical to a whole decode); other compressed rasters cannot be read
    by region, so the first read decodes the whole image (her2st: 275 MB) and
    later reads slice it, as do reads of most of the image's rows (thumbnails).
    JPEGs go through simplejpeg when it can: the same libjpeg-turbo decode,
    bit-identical to PIL's, in half the time (her2st: 0.14 s vs 0.28 s),
    because it writes packed RGB straight into an array.
    """

    fork_safe = True  # holds no open file, only (maybe) a decoded array

    def __init__(self, path: Path) -> None:
        self.path = path
        with Image.open(path) as img:  # header only
            self.level_dimensions = (tuple(img.size),)
            fmt = img.format
            self._turbo = fmt == "JPEG" and img.mode in ("RGB", "L")  # CMYK etc. stay with PIL
        if fmt == "JPEG":
            _check_jpeg_end(path)
        elif fmt == "PNG":
            with Image.open(path) as img:
                img.verify()  # CRCs of every chunk; reads but does not inflate
        # DPI in JPEG/PNG headers is a print setting (72, 96...), not a scan resolution.
        self.mpp: float | None = None
        self._pixels: np.ndarray | Image.Image | None = None
        self._bands: BandedJpeg | None = None
        self._bands_checked = False

    def _decode(self, data: bytes | None = None) -> np.ndarray | Image.Image:
        """The whole image; ``data``: the file's bytes when already read."""
        if self._turbo:
            return decode_rgb(data or self.path.read_bytes())
        with Image.open(self.path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                return _to_rgb(np.asarray(img.convert("RGBA")))
            if img.mode.startswith("I;16"):
                return _to_rgb(np.asarray(img).astype(np.uint16))
            # Plain RGB stays a PIL image: converting a her2st slide to an array
            # would double the decode time, and crops of it are cheap.
            return img if img.mode == "RGB" else img.convert("RGB")

    def _banded(self) -> BandedJpeg | None:
        if not self._bands_checked:
            self._bands_checked = True
            if self._turbo:
                data = self.path.read_bytes()
                layout = restart_layout(data)
                self._bands = BandedJpeg(data, layout) if layout else None
        return self._bands

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._pixels is None:
            bands = self._banded()
            if bands is not None and 2 * h <= bands.height:
                return bands.read(x, y, w, h)
            # Most rows wanted: one whole decode beats bands and their copies.
            self._pixels = self._decode(bands.data if bands is not None else None)
            self._bands = None
        if isinstance(self._pixels, Image.Image):
            return np.asarray(self._pixels.crop((x, y, x + w, y + h)))
        return self._pixels[y : y + h, x : x + w]

    def close(self) -> None:
        self._pixels = None
        self._bands = None
        self._bands_checked = False


def _check_jpeg_end(path: Path) -> None:
    """Detect a truncated JPEG cheaply: the end-of-image marker must be near the end."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 4096))
        tail = fh.read()
    if b"\xff\xd9" not in tail:
        raise OSError("truncated JPEG (no end-of-image marker)")


class TiffSlideReader:
    """Plain and pyramidal TIFF through tiffslide: decodes only the tiles a read touches."""

    fork_safe = False  # an open file handle and per-thread zarr stores

    def __init__(self, path: Path) -> None:
        import tiffslide

        self._slide = tiffslide.TiffSlide(path)
        props = self._slide.properties
        self.level_dimensions = tuple(tuple(map(int, d)) for d in self._slide.level_dimensions)
        mpp = props.get(tiffslide.PROPERTY_NAME_MPP_X)
        self.mpp = float(mpp) if mpp else None
        # Strip-organised (untiled) levels may be one compressed strip: decode once.
        self._untiled = {
            lvl for lvl in range(len(self.level_dimensions)) if not props.get(f"tiffslide.level[{lvl}].tile-width")
        }
        self._cache: dict[int, np.ndarray] = {}

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if level in self._untiled:
            if level not in self._cache:
                self._cache[level] = self._read_exact(level, 0, 0, *self.level_dimensions[level])
            return self._cache[level][y : y + h, x : x + w]
        return self._read_exact(level, x, y, w, h)

    def _read_exact(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        # tiffslide takes a level-0 location and maps it back with int(loc / ds);
        # ask for one pixel more on the low side and crop, so rounding never shifts us.
        ds = self._slide.level_downsamples[level]
        x1, y1 = max(x - 1, 0), max(y - 1, 0)
        loc = (math.ceil(x1 * ds), math.ceil(y1 * ds))
        rx, ry = int(loc[0] / ds), int(loc[1] / ds)
        arr = self._slide.read_region(loc, level, (x + w - rx, y + h - ry), as_array=True, padding=False)
        return _to_rgb(np.asarray(arr)[y - ry : y - ry + h, x - rx : x - rx + w])

    def close(self) -> None:
        self._cache.clear()
        self._slide.close()


class OpenSlideReader:
    """Vendor whole-slide formats (SVS, NDPI, MRXS...) through OpenSlide."""

    fork_safe = False

    def __init__(self, path: Path) -> None:
        import openslide

        self._slide = openslide.OpenSlide(str(path))
        self.level_dimensions = tuple(tuple(map(int, d)) for d in self._slide.level_dimensions)
        mpp = self._slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        self.mpp = float(mpp) if mpp else None

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        # OpenSlide locates by level-0 pixels; its downsamples are (near) integers.
        ds = self._slide.level_downsamples[level]
        region = self._slide.read_region((round(x * ds), round(y * ds)), level, (w, h))
        arr = np.asarray(region)  # premultiplied RGBA: transparent (no tissue scanned) -> white
        return (arr[..., :3].astype(np.uint16) + 255 - arr[..., 3:4]).clip(0, 255).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


# -------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Backend:
    """A named way to open files into a :class:`Reader`."""

    name: str
    opener: Callable[[Path], Reader]
    module: str | None = None  # optional dependency that must import
    extra: str | None = None  # pip extra that provides it

    def available(self) -> bool:
        if self.module is None:
            return True
        try:
            __import__(self.module)
        except Exception:  # openslide raises OSError when its C library is missing
            return False
        return True


BACKENDS: dict[str, Backend] = {}

#: Backends tried, in order, for each kind of file.
KIND_BACKENDS: dict[str, tuple[str, ...]] = {
    "jpeg": ("pil",),
    "png": ("pil",),
    "raster": ("pil",),
    "tiff": ("tiffslide", "openslide", "pil"),
    "wsi": ("openslide", "tiffslide"),
}

_MAGIC: dict[bytes, str] = {
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
    b"II+\x00": "tiff",  # BigTIFF
    b"MM\x00+": "tiff",
}

#: Vendor formats OpenSlide reads best (several are TIFF inside).
WSI_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide"})


def register_backend(backend: Backend) -> Backend:
    """Add ``backend`` to :data:`BACKENDS` (name it in :data:`KIND_BACKENDS` to use it)."""
    BACKENDS[backend.name] = backend
    return backend


register_backend(Backend("pil", PILReader))
register_backend(Backend("tiffslide", TiffSlideReader, module="tiffslide"))
register_backend(Backend("openslide", OpenSlideReader, module="openslide", extra="openslide"))


def file_kind(path: Path) -> str:
    """Kind of image file: vendor suffix first, then magic bytes, else ``'raster'``."""
    if path.suffix.lower() in WSI_SUFFIXES:
        return "wsi"
    with open(path, "rb") as fh:
        head = fh.read(8)
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    return "raster"


def _open_reader(path: Path, backend: str | None) -> tuple[str, Reader]:
    """Open ``path`` with ``backend`` or the first backend of its kind that works."""
    if not path.is_file():
        problem = "not a file" if path.exists() else "no such file"
        raise InputError(path, f"cannot read image: {problem}")
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown image backend {backend!r}; known: {', '.join(sorted(BACKENDS))}")
        chosen = BACKENDS[backend]
        if not chosen.available():
            raise MissingDependencyError(chosen.module or backend, chosen.extra, f"the {backend} image backend")
        candidates = [chosen]
    else:
        try:
            kind = file_kind(path)
        except OSError as exc:
            raise InputError(path, f"cannot read image: {exc}") from exc
        candidates = [BACKENDS[n] for n in KIND_BACKENDS[kind] if BACKENDS[n].available()]
    reasons = []
    for candidate in candidates:
        try:
            reader = candidate.opener(path)
        except Exception as exc:  # any backend failure means "try the next one"
            reasons.append(f"{candidate.name}: {exc}" if len(candidates) > 1 else str(exc))
            continue
        if not reader.level_dimensions or min(reader.level_dimensions[0]) <= 0:
            reader.close()
            reasons.append(f"{candidate.name}: empty image")
            continue
        return candidate.name, reader
    raise InputError(path, f"cannot read image: {'; '.join(reasons) or 'no backend available'}")


# ----------------------------------------------------------------------- resampling
#: One filter both ways. Pillow's BOX weights whole source pixels (box edges snap
#: to the pixel grid, up to half a source pixel off), so it cannot honour a
#: fractional box; BILINEAR is a continuous kernel (exact sub-pixel placement)
#: that Pillow widens by the shrink factor, so shrinking is antialiased, and it
#: enlarges low-resolution scans (MOB, 4.5 µm/px) smoothly instead of blockily.
#: LANCZOS does the same with a sharper response at twice the cost (0.9 vs 0.45 ms
#: a 224 px tile), which the encoder would notice on a 2-core CPU.
RESAMPLE = Image.Resampling.BILINEAR
_FILTER_SUPPORT = 1


def _margin(src_per_out: float) -> int:
    """Source pixels the filter reaches beyond the box (kernel half-width)."""
    return math.ceil(_FILTER_SUPPORT * max(src_per_out, 1.0)) + 1


def best_level(level_dimensions: tuple[tuple[int, int], ...], scale: float, need: float) -> int:
    """Coarsest level whose resolution is still >= ``need`` level px per level-0 px.

    Parameters
    ----------
    level_dimensions
        (width, height) per level, finest first.
    scale
        Native (level 0 of the file) pixels per level-0 pixel of the handle.
    need
        Output pixels per level-0 pixel the caller asks for.
    """
    width0 = level_dimensions[0][0]
    best = 0
    for level, (width, _) in enumerate(level_dimensions):
        if scale * width / width0 >= need * (1 - _LEVEL_TOL):
            best = level
    return best


def crosses_edge(x0, y0, w0, h0, extent: tuple[float, float]):
    """Whether boxes ``[x0, x0 + w0) x [y0, y0 + h0)`` leave ``[0, W) x [0, H)``.

    Works on scalars and (broadcast) arrays alike.
    """
    width, height = extent
    return (np.asarray(x0) < 0) | (np.asarray(y0) < 0) | (np.asarray(x0) + w0 > width) | (np.asarray(y0) + h0 > height)


def _pair(value, cast) -> tuple:
    if np.ndim(value) == 0:
        return cast(value), cast(value)
    first, second = value
    return cast(first), cast(second)


# -------------------------------------------------------------------------- handle
class SlideImage:
    """Lazy, picklable handle on one slide image.

    Parameters
    ----------
    path
        Image file.
    scale
        Native image pixels per level-0 pixel (Visium hires PNG:
        ``tissue_hires_scalef``).
    backend
        Backend name from :data:`BACKENDS`; ``None`` picks by file kind.

    Notes
    -----
    The state that travels to DataLoader workers (fork or pickle) is only
    ``(path, scale, backend)``; each process reopens the file on its first
    read. Readers without open file handles (decoded JPEG/PNG) are kept
    across ``fork`` so the decode is shared copy-on-write.
    """

    def __init__(self, path: str | Path, scale: float = 1.0, backend: str | None = None) -> None:
        self.path = Path(path)
        self.scale = float(scale)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive number, got {scale}")
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.backend, self._reader = _open_reader(self.path, backend)
        self._native = self._reader.level_dimensions

    # ------------------------------------------------------------ process safety
    def __getstate__(self) -> dict:
        return {"path": self.path, "scale": self.scale, "backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        self.path, self.scale, self.backend = state["path"], state["scale"], state["backend"]
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._reader = None
        self._native = None

    def _get_reader(self) -> Reader:
        if self._pid != os.getpid():  # forked: never share file handles with the parent
            self._lock = threading.Lock()
            self._pid = os.getpid()
            if self._reader is not None and not self._reader.fork_safe:
                self._reader = None  # the parent still owns that handle; do not close it
        if self._reader is None:
            with self._lock:
                if self._reader is None:
                    _, self._reader = _open_reader(self.path, self.backend)
                    self._native = self._reader.level_dimensions
        return self._reader

    # ------------------------------------------------------------------ geometry
    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """Native (width, height) of every pyramid level of the file, finest first."""
        if self._native is None:
            self._get_reader()
        return self._native

    @property
    def extent(self) -> tuple[float, float]:
        """Exact (width, height) in level-0 pixels (native size / scale)."""
        width, height = self.level_dimensions[0]
        return width / self.scale, height / self.scale

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) in level-0 pixels, rounded; never decodes pixels."""
        width, height = self.extent
        return round(width), round(height)

    @property
    def mpp(self) -> float | None:
        """µm per level-0 pixel from the file's metadata, or ``None``."""
        native = self._get_reader().mpp
        return None if native is None else native * self.scale

    # --------------------------------------------------------------------- reads
    def read_region(self, x0: float, y0: float, size0, out_px) -> tuple[np.ndarray, bool]:
        """Read a level-0 box resampled to ``out_px``.

        Parameters
        ----------
        x0, y0
            Top-left corner of the box in level-0 pixels (may be fractional
            or negative).
        size0
            Box side, or (width, height), in level-0 pixels.
        out_px
            Output side, or (width, height), in pixels.

        Returns
        -------
        tile : np.ndarray
            ``(h, w, 3)`` uint8 RGB; pixels outside the image are white.
        crossed_edge : bool
            Whether any part of the box lies outside the image.
        """
        w0, h0 = _pair(size0, float)
        out_w, out_h = _pair(out_px, int)
        if w0 <= 0 or h0 <= 0 or out_w <= 0 or out_h <= 0:
            raise ValueError(f"box size {size0} and output size {out_px} must be positive")
        reader = self._get_reader()
        dims = reader.level_dimensions
        level = best_level(dims, self.scale, max(out_w / w0, out_h / h0))
        lw, lh = dims[level]
        fx = self.scale * lw / dims[0][0]  # level pixels per level-0 pixel, per axis
        fy = self.scale * lh / dims[0][1]
        bx0, by0, bx1, by1 = x0 * fx, y0 * fy, (x0 + w0) * fx, (y0 + h0) * fy
        margin = _margin(max((bx1 - bx0) / out_w, (by1 - by0) / out_h))
        # Read the box plus the filter's reach, but pad white only where the box
        # itself leaves the image: Pillow renormalises the kernel at the canvas
        # edge, so a box that merely touches the border is not whitened.
        rx0 = min(max(math.floor(bx0) - margin, 0), math.floor(bx0))
        ry0 = min(max(math.floor(by0) - margin, 0), math.floor(by0))
        rx1 = max(min(math.ceil(bx1) + margin, lw), math.ceil(bx1))
        ry1 = max(min(math.ceil(by1) + margin, lh), math.ceil(by1))

        cx0, cy0, cx1, cy1 = max(rx0, 0), max(ry0, 0), min(rx1, lw), min(ry1, lh)
        pixels = None
        if cx1 > cx0 and cy1 > cy0:
            try:
                pixels = reader.read(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
            except MemoryError:
                raise
            except Exception as exc:  # decoders raise their own types (DeflateError, OSError...)
                raise InputError(self.path, f"cannot read image: {type(exc).__name__}: {exc}") from exc
        if (cx0, cy0, cx1, cy1) == (rx0, ry0, rx1, ry1):
            canvas = pixels  # inside the image: no white canvas, no extra copy
        else:
            canvas = np.full((ry1 - ry0, rx1 - rx0, 3), 255, dtype=np.uint8)
            if pixels is not None:
                canvas[cy0 - ry0 : cy1 - ry0, cx0 - rx0 : cx1 - rx0] = pixels

        box = (bx0 - rx0, by0 - ry0, bx1 - rx0, by1 - ry0)
        tile = _resize(canvas, box, out_w, out_h)
        crossed = bool(crosses_edge(x0, y0, w0, h0, self.extent))
        return tile, crossed

    def thumbnail(self, max_px: int) -> np.ndarray:
        """Whole image, longest side ``<= max_px``, aspect preserved, never enlarged."""
        width, height = self.extent
        factor = min(max_px / max(width, height), self.scale)  # output px per level-0 px
        out = (max(1, min(max_px, math.floor(width * factor))), max(1, min(max_px, math.floor(height * factor))))
        tile, _ = self.read_region(0.0, 0.0, (width, height), out)
        return tile

    def close(self) -> None:
        """Release file handles and decoded pixels; the handle reopens on next use."""
        if self._reader is not None and (self._pid == os.getpid() or self._reader.fork_safe):
            self._reader.close()
        self._reader = None

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SlideImage({str(self.path)!r}, scale={self.scale:g}, backend={self.backend!r})"


def _resize(canvas: np.ndarray, box: tuple[float, float, float, float], out_w: int, out_h: int) -> np.ndarray:
    """Resample the fractional ``box`` of ``canvas`` to (out_h, out_w, 3)."""
    bx0, by0, bx1, by1 = box
    if (out_w, out_h) == (bx1 - bx0, by1 - by0) and float(bx0).is_integer() and float(by0).is_integer():
        x, y = int(bx0), int(by0)  # 1:1 and pixel-aligned: a plain copy
        return canvas[y : y + out_h, x : x + out_w].copy()
    src = max((bx1 - bx0) / out_w, (by1 - by0) / out_h)  # source pixels per output pixel
    # reducing_gap: large shrinks (thumbnails) first average integer blocks;
    # several times faster, at a sub-pixel cost only there.
    gap = 3.0 if src > 6 else None
    image = Image.fromarray(canvas)
    return np.asarray(image.resize((out_w, out_h), resample=RESAMPLE, box=box, reducing_gap=gap))


def open_image(path: str | Path, scale: float = 1.0, backend: str | None = None) -> SlideImage:
    """Open an image lazily (header only).

    Parameters
    ----------
    path
        JPEG, PNG, plain or pyramidal TIFF, or a vendor whole-slide file.
    scale
        Native image pixels per level-0 pixel.
    backend
        Force a backend (``'pil'``, ``'tiffslide'``, ``'openslide'``).

    Raises
    ------
    InputError
        The file is missing, corrupt, or no backend can read it.
    """
    return SlideImage(path, scale=scale, backend=backend)
