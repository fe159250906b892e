"""Gene maps, signature score maps and tissue overlays drawn over the H&E thumbnail.

Every figure is a :class:`matplotlib.figure.Figure` rendered with the Agg
canvas directly -- no pyplot, so no global figure registry: safe to call from
threads and nothing leaks. Each public ``*_figure`` function returns the
Figure (for embedding or inspection); the matching function without the
suffix renders it to PNG bytes and, given ``out``, writes them atomically.

Spots are drawn as filled circles of their true diameter. A gene map always
states the model's cross-validated Pearson for that gene; a gene below the
reliability threshold gets a red "UNRELIABLE" banner, a grey hatched colour
map and a red frame, so it is never mistaken for a trustworthy prediction.

Typical use on :meth:`virtualst.heads.predictor.GenePredictor.predict` output::

    from virtualst.predict.maps import gene_maps
    paths = gene_maps(adata, out_dir="maps")          # the 12 best-predicted genes
"""

from __future__ import annotations

import io
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
import numpy as np
import pandas as pd
import scipy.sparse as sp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import EllipseCollection
from matplotlib.colors import Colormap, ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from virtualst.files import write_bytes_atomically

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad
    from matplotlib.axes import Axes

#: Human-readable units of the target normalisations of :mod:`virtualst.heads.targets`.
NORMALIZATION_LABELS: dict[str, str] = {
    "log1p": "log1p(counts)",
    "cpm-log1p": "log1p(counts per 10k)",
}


@dataclass(frozen=True)
class MapStyle:
    """Sizes and colours shared by every figure.

    Parameters
    ----------
    panel_width, height
        Inches per map panel (its colour bar included) and figure height.
    dpi
        Pixels per inch of the PNG; the PNG is exactly :meth:`pixel_size`.
    cmap, unreliable_cmap, score_cmap
        Colour maps for expression, for unreliable genes (greyed out) and
        for signature scores (diverging, centred on 0).
    spot_alpha
        Opacity of the spot fill over the H&E.
    percentiles
        Robust colour limits: these percentiles over all panels' values.
    hot_colour, cold_colour
        Outline colours of hot and cold spots on score maps.
    hexbin_above
        Scatter plots switch to a hexbin density above this many spots.
    """

    panel_width: float = 5.0
    height: float = 5.6
    dpi: int = 100
    cmap: str = "viridis"
    unreliable_cmap: str = "Greys"
    score_cmap: str = "RdBu_r"
    spot_alpha: float = 0.9
    percentiles: tuple[float, float] = (1.0, 99.0)
    hot_colour: str = "#000000"
    cold_colour: str = "#00d4ff"
    hexbin_above: int = 2000

    def figsize(self, n_panels: int = 1) -> tuple[float, float]:
        """Figure size in inches for ``n_panels`` side by side."""
        return (self.panel_width * n_panels, self.height)

    def pixel_size(self, n_panels: int = 1) -> tuple[int, int]:
        """``(width, height)`` in pixels of the PNG of ``n_panels`` side by side."""
        width, height = self.figsize(n_panels)
        return (int(round(width * self.dpi)), int(round(height * self.dpi)))


DEFAULT_STYLE = MapStyle()


# --------------------------------------------------------------------- reliability
@dataclass(frozen=True)
class Reliability:
    """How far a gene's prediction can be trusted, from its cross-validated Pearson.

    Parameters
    ----------
    cv_pearson
        The model's cross-validated Pearson for the gene; ``None``/NaN when unknown.
    threshold
        The model's reliability threshold (``uns['virtualst']['reliable_pearson']``).
    """

    cv_pearson: float | None
    threshold: float

    @property
    def known(self) -> bool:
        """Whether a CV value exists."""
        return self.cv_pearson is not None and bool(np.isfinite(self.cv_pearson))

    @property
    def status(self) -> str:
        """``"reliable"``, ``"unreliable"`` or ``"unknown"``."""
        if not self.known:
            return "unknown"
        return "reliable" if self.cv_pearson >= self.threshold else "unreliable"

    @property
    def label(self) -> str:
        """``"CV r = 0.41"``, or a note that there is no CV value."""
        return f"CV r = {self.cv_pearson:.2f}" if self.known else "CV r = n/a (no cross-validation value)"

    @property
    def banner(self) -> str:
        """Warning to print over the map; empty for a reliable gene."""
        if self.status == "unreliable":
            return f"UNRELIABLE: CV r {self.cv_pearson:.2f} < {self.threshold:.2f}"
        if self.status == "unknown":
            return "RELIABILITY UNKNOWN: no cross-validated Pearson for this gene"
        return ""


# --------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class SlideCanvas:
    """Where spots sit on the slide and the picture to draw them on.

    Parameters
    ----------
    coords_px
        ``(n_spots, 2)`` spot centres (x, y) in level-0 pixels.
    spot_diameter_px
        Spot diameter in level-0 pixels.
    image
        The thumbnail (``(h, w, 3)`` uint8 or float RGB); ``None`` draws on white.
    scalef
        Thumbnail pixels per level-0 pixel (``tissue_hires_scalef``).
    um_per_px
        Level-0 µm per pixel; enables the scale bar.
    """

    coords_px: np.ndarray
    spot_diameter_px: float
    image: np.ndarray | None = None
    scalef: float = 1.0
    um_per_px: float | None = None

    def __post_init__(self) -> None:
        coords = np.asarray(self.coords_px, dtype=np.float64)
        if coords.ndim != 2 or coords.shape[1] < 2:
            raise ValueError(f"coords_px must be (n_spots, 2), got shape {coords.shape}")
        object.__setattr__(self, "coords_px", coords[:, :2])
        if not self.spot_diameter_px > 0 or not self.scalef > 0:
            raise ValueError(f"spot_diameter_px and scalef must be > 0, got {self.spot_diameter_px} and {self.scalef}")

    @property
    def n_spots(self) -> int:
        """Number of spots."""
        return len(self.coords_px)

    @property
    def xy(self) -> np.ndarray:
        """Spot centres in thumbnail pixels."""
        return self.coords_px * self.scalef

    @property
    def diameter(self) -> float:
        """Spot diameter in thumbnail pixels."""
        return float(self.spot_diameter_px * self.scalef)

    def view(self) -> tuple[float, float, float, float]:
        """``(x0, x1, y0, y1)`` thumbnail-pixel box around the spots, one spot diameter of margin."""
        if self.n_spots == 0:
            if self.image is not None:
                return (0.0, float(self.image.shape[1]), 0.0, float(self.image.shape[0]))
            return (0.0, 1.0, 0.0, 1.0)
        xy, margin = self.xy, self.diameter
        x0, y0 = xy.min(axis=0) - margin
        x1, y1 = xy.max(axis=0) + margin
        if self.image is not None:
            height, width = self.image.shape[:2]
            x0, x1 = max(x0, 0.0), min(x1, float(width))
            y0, y1 = max(y0, 0.0), min(y1, float(height))
            if x1 <= x0 or y1 <= y0:  # spots off the thumbnail: show them anyway
                x0, y0 = xy.min(axis=0) - margin
                x1, y1 = xy.max(axis=0) + margin
        return (float(x0), float(x1), float(y0), float(y1))

    @classmethod
    def from_anndata(cls, adata: ad.AnnData, library_id: str | None = None) -> SlideCanvas:
        """Geometry and thumbnail from virtualst/scanpy AnnData conventions.

        Reads ``obsm['spatial']``, ``uns['spatial'][library_id]`` (``images/hires``,
        ``scalefactors``) and ``uns['virtualst']`` (``um_per_px``,
        ``spot_diameter_um``). Without ``uns['spatial']`` the spots are drawn
        on white in level-0 pixels.

        Parameters
        ----------
        adata
            The AnnData.
        library_id
            Key of ``uns['spatial']``; ``None``: its only key, else
            ``uns['virtualst']['sample_id']``.
        """
        coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        meta = dict(adata.uns.get("virtualst", {}))
        um_per_px = float(meta["um_per_px"]) if meta.get("um_per_px") else None
        spatial = _library(adata, library_id)
        scalefactors = dict(spatial.get("scalefactors", {}))
        images = dict(spatial.get("images", {}))
        image, scalef = None, 1.0
        for key in ("hires", "lowres"):  # the sharper picture first
            factor = scalefactors.get(f"tissue_{key}_scalef")
            if key in images and factor:
                image, scalef = np.asarray(images[key]), float(factor)
                break
        diameter = scalefactors.get("spot_diameter_fullres")
        if not diameter and meta.get("spot_diameter_um") and um_per_px:
            diameter = float(meta["spot_diameter_um"]) / um_per_px
        if not diameter:
            diameter = 0.5 * _pitch(coords)  # ST and Visium spots are about half their pitch
        return cls(coords, float(diameter), image, scalef, um_per_px)


def _library(adata: ad.AnnData, library_id: str | None) -> Mapping[str, Any]:
    """``uns['spatial'][library_id]`` (see :meth:`SlideCanvas.from_anndata`), or ``{}`` when absent."""
    spatial = adata.uns.get("spatial")
    if not spatial:
        return {}
    if library_id is None:
        if len(spatial) == 1:
            library_id = next(iter(spatial))
        else:
            library_id = adata.uns.get("virtualst", {}).get("sample_id")
            if library_id not in spatial:
                raise ValueError(f"uns['spatial'] has several libraries ({', '.join(map(str, spatial))}); pass library_id")
    if library_id not in spatial:
        raise KeyError(f"library {library_id!r} not in uns['spatial'] (has: {', '.join(map(str, spatial))})")
    return spatial[library_id]


def _pitch(coords: np.ndarray) -> float:
    """Median nearest-neighbour distance; 1 when it cannot be measured."""
    if len(coords) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(coords).query(coords, k=2)
    pitch = float(np.median(dist[:, 1]))
    return pitch if pitch > 0 else 1.0


# --------------------------------------------------------------------- helpers
def robust_limits(*values, percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    """Shared colour limits: the given percentiles over all finite values of all arrays.

    Returns ``(vmin, vmax)`` with ``vmin < vmax`` (widened around a constant).
    """
    finite = [np.asarray(v, dtype=np.float64).ravel() for v in values]
    pooled = np.concatenate(finite) if finite else np.empty(0)
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        return (0.0, 1.0)
    low, high = (float(v) for v in np.percentile(pooled, percentiles))
    if high <= low:
        pad = 0.5 * max(abs(low), 1.0) * 1e-2
        low, high = low - pad, high + pad
    return (low, high)


def pearson(a, b) -> float:
    """Pearson r over the spots where both are finite; NaN when undefined (fewer than 2, or constant)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan")
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def _fmt_r(r: float) -> str:
    return f"{r:.2f}" if np.isfinite(r) else "n/a"


def _cmap(name: str, low: float = 0.0) -> Colormap:
    """Colour map ``name`` from fraction ``low`` of its range upwards; NaN spots light grey."""
    cmap = mpl.colormaps[name]
    if low > 0:  # e.g. Greys starts at white, which would hide low spots on a white background
        cmap = ListedColormap(cmap(np.linspace(low, 1.0, 256)), name=cmap.name)
    return cmap.with_extremes(bad="#d9d9d9")


def _values(values, n: int, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if len(x) != n:
        raise ValueError(f"{what} has {len(x)} values but the canvas has {n} spots")
    return x


def _new_figure(n_panels: int, style: MapStyle) -> Figure:
    fig = Figure(figsize=style.figsize(n_panels), dpi=style.dpi, layout="constrained", facecolor="white")
    FigureCanvasAgg(fig)
    return fig


#: Header geometry, in inches: title line, each info line, the banner, margins.
_TITLE_IN, _LINE_IN, _BANNER_IN, _PAD_IN = 0.32, 0.2, 0.34, 0.1


def _wrap(items: Sequence[str], width_chars: int) -> list[str]:
    """Join ``items`` with " · " into lines of at most ``width_chars`` (an item is never split)."""
    lines: list[str] = []
    pieces = [piece for item in items if item for piece in textwrap.wrap(item, width_chars)]
    for item in pieces:
        if lines and len(lines[-1]) + 5 + len(item) <= width_chars:
            lines[-1] += "  ·  " + item
        else:
            lines.append(item)
    return lines


def _header(fig: Figure, title: str, info: Sequence[str], banner: str = "", banner_colour: str = "#c00000") -> None:
    """Title, info lines and an optional coloured banner in a band reserved at the top of ``fig``.

    The band is kept out of the constrained layout (``rect``), so a long line
    can never squeeze the maps; lines wrap to the figure width instead.
    """
    width_in, height_in = fig.get_size_inches()
    lines = _wrap(info, int(13 * width_in))  # ~13 characters per inch at 9.5 pt
    band = _PAD_IN + _TITLE_IN + _LINE_IN * len(lines) + (_BANNER_IN if banner else 0.0) + _PAD_IN
    y = 1.0 - _PAD_IN / height_in
    fig.text(0.5, y, title, ha="center", va="top", fontsize=14, fontweight="bold")
    y -= _TITLE_IN / height_in
    for line in lines:
        fig.text(0.5, y, line, ha="center", va="top", fontsize=9.5, color="#333333")
        y -= _LINE_IN / height_in
    if banner:
        box = {"boxstyle": "round,pad=0.3", "facecolor": banner_colour, "edgecolor": "none"}
        fig.text(0.5, y - 0.06 / height_in, banner, ha="center", va="top", fontsize=10, fontweight="bold", color="white", bbox=box)
    fig.get_layout_engine().set(rect=(0.0, 0.0, 1.0, 1.0 - band / height_in))


#: Longest side a background image is drawn at: a panel is ~500 px wide, and
#: matplotlib resampling a 2000-px thumbnail costs ~1 s per panel.
BACKGROUND_MAX_PX = 1000


def _shrunk(image: np.ndarray, max_px: int = BACKGROUND_MAX_PX) -> np.ndarray:
    """``image`` reduced (Pillow, antialiased) so its longest side is at most ``max_px``."""
    height, width = image.shape[:2]
    if max(height, width) <= max_px:
        return image
    from PIL import Image

    factor = max_px / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    rgb = np.asarray(image)
    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def _background(ax: Axes, canvas: SlideCanvas) -> None:
    """The thumbnail cropped to the spots (or nothing), equal aspect, image y downwards."""
    x0, x1, y0, y1 = canvas.view()
    if canvas.image is not None:
        height, width = canvas.image.shape[:2]
        c0, c1 = int(np.clip(np.floor(x0), 0, width)), int(np.clip(np.ceil(x1), 0, width))
        r0, r1 = int(np.clip(np.floor(y0), 0, height)), int(np.clip(np.ceil(y1), 0, height))
        if c1 > c0 and r1 > r0:  # crop first: drawing a 2000-px thumbnail to show a corner is slow
            ax.imshow(_shrunk(canvas.image[r0:r1, c0:c1]), extent=(c0, c1, r1, r0), interpolation="antialiased", zorder=0)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _spots(ax: Axes, canvas: SlideCanvas, values: np.ndarray | None = None, **kwargs) -> EllipseCollection:
    """Circles of the true spot diameter at the spot centres (``units='xy'``: sized in data units)."""
    d = np.full(canvas.n_spots, canvas.diameter)
    collection = EllipseCollection(d, d, np.zeros(canvas.n_spots), units="xy", offsets=canvas.xy, offset_transform=ax.transData, **kwargs)
    if values is not None:
        collection.set_array(values)
    ax.add_collection(collection)
    return collection


def _scale_bar(ax: Axes, canvas: SlideCanvas) -> None:
    """A 'nice' length bar (e.g. 1 mm) in the lower left, when µm per pixel is known."""
    if not canvas.um_per_px:
        return
    x0, x1, y0, y1 = canvas.view()
    width_um = (x1 - x0) / canvas.scalef * canvas.um_per_px
    target = width_um / 5
    nice = max((v for v in (50, 100, 200, 250, 500, 1000, 2000, 5000, 10000) if v <= target), default=None)
    if nice is None:
        return
    length = nice / canvas.um_per_px * canvas.scalef
    bx, by = x0 + 0.04 * (x1 - x0), y1 - 0.05 * (y1 - y0)
    ax.plot([bx, bx + length], [by, by], color="black", lw=3, solid_capstyle="butt", zorder=5)
    label = f"{nice // 1000} mm" if nice >= 1000 and nice % 1000 == 0 else f"{nice} µm"
    ax.text(bx + length / 2, by - 0.015 * (y1 - y0), label, ha="center", va="bottom", fontsize=8, zorder=5)


def _flag_unreliable(ax: Axes) -> None:
    """Red frame and light hatching over a panel whose gene is unreliable."""
    ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, edgecolor="#c00000", lw=3, clip_on=False, zorder=6))
    ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, hatch="//", edgecolor="#c0000040", lw=0, clip_on=False, zorder=4))


def render_png(fig: Figure, out: str | Path | None = None) -> bytes:
    """PNG bytes of ``fig`` at its own dpi; also written atomically to ``out`` when given.

    The PNG goes to a hidden temporary file beside ``out`` and is renamed
    over it, so a crash never leaves a half-written image.
    """
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")
    # 256 colours, dithered so colour bars stay smooth: a quarter of the bytes over an H&E photo (reports inline every map).
    palette = rgb.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    data = buffer.getvalue()
    if out is not None:
        write_bytes_atomically(out, data)
    return data


# --------------------------------------------------------------------- gene maps
def gene_map_figure(
    canvas: SlideCanvas,
    predicted,
    gene: str,
    measured=None,
    cv_pearson: float | None = None,
    reliable_pearson: float = 0.1,
    units: str = "",
    style: MapStyle = DEFAULT_STYLE,
) -> Figure:
    """Predicted expression of one gene over the H&E, beside the measured one when given.

    Parameters
    ----------
    canvas
        Spot geometry and thumbnail (:meth:`SlideCanvas.from_anndata`).
    predicted
        ``(n_spots,)`` predicted values.
    gene
        Gene name, for the title.
    measured
        ``(n_spots,)`` measured values; drawn left of the prediction with ONE
        shared colour scale (robust percentiles over both), Pearson r in the header.
    cv_pearson
        The model's cross-validated Pearson for the gene (``None``/NaN: unknown).
    reliable_pearson
        Threshold below which the gene is flagged UNRELIABLE (banner, grey
        hatched colour map, red frame).
    units
        Colour-bar label (e.g. ``"log1p(counts per 10k)"``).
    style
        Sizes and colours.

    Returns
    -------
    matplotlib.figure.Figure
        One or two map panels; :meth:`MapStyle.pixel_size` gives its PNG size.
    """
    pred = _values(predicted, canvas.n_spots, "predicted")
    meas = None if measured is None else _values(measured, canvas.n_spots, "measured")
    trust = Reliability(None if cv_pearson is None else float(cv_pearson), float(reliable_pearson))
    panels = [("Predicted", pred)] if meas is None else [("Measured", meas), ("Predicted", pred)]
    fig = _new_figure(len(panels), style)
    grid = fig.add_gridspec(1, len(panels))
    cells = [grid[0, i] for i in range(len(panels))]
    info = [trust.label]
    if meas is not None:
        info.insert(0, f"r(measured, predicted) = {_fmt_r(pearson(meas, pred))}")
    info.append(f"{canvas.n_spots} spots")
    colour = "#c00000" if trust.status == "unreliable" else "#b36b00"
    _header(fig, gene, info, trust.banner, colour)
    norm = Normalize(*robust_limits(*(v for _, v in panels), percentiles=style.percentiles))
    cmap = _cmap(style.unreliable_cmap, low=0.25) if trust.status == "unreliable" else _cmap(style.cmap)
    axes = []
    for cell, (name, values) in zip(cells, panels):
        ax = fig.add_subplot(cell)
        _background(ax, canvas)
        _spots(ax, canvas, values, cmap=cmap, norm=norm, alpha=style.spot_alpha, linewidths=0)
        _scale_bar(ax, canvas)
        ax.set_title(name, fontsize=11)
        if trust.status == "unreliable" and name == "Predicted":
            _flag_unreliable(ax)
        axes.append(ax)
    mappable = mpl.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(mappable, ax=axes, shrink=0.75, extend="both", label=units or None)
    return fig


def gene_map(
    canvas: SlideCanvas,
    predicted,
    gene: str,
    measured=None,
    cv_pearson: float | None = None,
    reliable_pearson: float = 0.1,
    units: str = "",
    out: str | Path | None = None,
    style: MapStyle = DEFAULT_STYLE,
) -> bytes:
    """PNG of :func:`gene_map_figure` (same parameters), written to ``out`` when given."""
    return render_png(gene_map_figure(canvas, predicted, gene, measured, cv_pearson, reliable_pearson, units, style), out)


# --------------------------------------------------------------------- scatter
def scatter_figure(
    measured,
    predicted,
    gene: str,
    cv_pearson: float | None = None,
    reliable_pearson: float = 0.1,
    units: str = "",
    style: MapStyle = DEFAULT_STYLE,
) -> Figure:
    """Predicted against measured values of one gene, one point per spot, with the y = x line.

    Above ``style.hexbin_above`` spots, a hexbin density replaces the points.
    The header gives Pearson r and the reliability, as on the gene map.
    """
    meas = np.asarray(measured, dtype=np.float64).ravel()
    pred = np.asarray(predicted, dtype=np.float64).ravel()
    if meas.shape != pred.shape:
        raise ValueError(f"measured has {meas.size} values, predicted {pred.size}")
    ok = np.isfinite(meas) & np.isfinite(pred)
    trust = Reliability(None if cv_pearson is None else float(cv_pearson), float(reliable_pearson))
    fig = _new_figure(1, style)
    info = [f"r = {_fmt_r(pearson(meas, pred))}", trust.label, f"{int(ok.sum())} spots"]
    colour = "#c00000" if trust.status == "unreliable" else "#b36b00"
    _header(fig, gene, info, trust.banner, colour)
    ax = fig.add_subplot()
    grey = trust.status == "unreliable"
    if ok.sum() > style.hexbin_above:
        density = _cmap(style.unreliable_cmap, low=0.25) if grey else _cmap(style.cmap)
        hexes = ax.hexbin(meas[ok], pred[ok], gridsize=40, mincnt=1, bins="log", cmap=density)
        fig.colorbar(hexes, ax=ax, shrink=0.75, label="spots")
    else:
        ax.scatter(meas[ok], pred[ok], s=10, alpha=0.5, color="#7f7f7f" if grey else "#1f77b4", edgecolors="none")
    low, high = robust_limits(meas[ok], pred[ok], percentiles=(0.0, 100.0))
    pad = 0.03 * (high - low)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="#c00000" if grey else "black", lw=1, ls="--", label="y = x")
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_aspect("equal")
    suffix = f" ({units})" if units else ""
    ax.set_xlabel(f"measured{suffix}")
    ax.set_ylabel(f"predicted{suffix}")
    ax.legend(loc="upper left", frameon=False, fontsize=9)
    return fig


def scatter_plot(
    measured,
    predicted,
    gene: str,
    cv_pearson: float | None = None,
    reliable_pearson: float = 0.1,
    units: str = "",
    out: str | Path | None = None,
    style: MapStyle = DEFAULT_STYLE,
) -> bytes:
    """PNG of :func:`scatter_figure` (same parameters), written to ``out`` when given."""
    return render_png(scatter_figure(measured, predicted, gene, cv_pearson, reliable_pearson, units, style), out)


# --------------------------------------------------------------------- score maps
def _hotspot_labels(hotspots, n: int) -> np.ndarray:
    if hotspots is None:
        return np.full(n, "", dtype=object)
    labels = hotspots["hotspot"] if isinstance(hotspots, pd.DataFrame) else hotspots
    labels = np.asarray(labels, dtype=object).ravel()
    if len(labels) != n:
        raise ValueError(f"hotspots has {len(labels)} labels but the canvas has {n} spots")
    return labels


def score_map_figure(
    canvas: SlideCanvas,
    scores,
    name: str,
    hotspots=None,
    units: str = "mean z-score",
    subtitle: str = "",
    style: MapStyle = DEFAULT_STYLE,
) -> Figure:
    """A signature score per spot over the H&E, hot and cold spots outlined.

    Parameters
    ----------
    canvas
        Spot geometry and thumbnail.
    scores
        ``(n_spots,)`` scores (e.g. a column of
        :func:`virtualst.predict.signatures.score_gene_sets`' scores).
    name
        Signature name, for the title.
    hotspots
        :func:`virtualst.predict.hotspots.hotspots` table (its ``hotspot``
        column, and ``attrs`` radius / FDR for the caption) or a sequence of
        ``"hot"`` / ``"cold"`` / ``""`` labels; ``None``: no outlines.
    units
        Colour-bar label.
    subtitle
        Extra header line, e.g. which genes the score used.
    style
        Sizes and colours: hot spots get a ``hot_colour`` ring, cold spots a
        ``cold_colour`` ring; the fill is a diverging map centred on 0.
    """
    values = _values(scores, canvas.n_spots, "scores")
    labels = _hotspot_labels(hotspots, canvas.n_spots)
    hot, cold = labels == "hot", labels == "cold"
    fig = _new_figure(1, style)
    info = [subtitle] if subtitle else []
    if hotspots is not None:
        attrs = hotspots.attrs if isinstance(hotspots, pd.DataFrame) else {}
        how = "Getis-Ord Gi*"
        if "radius_um" in attrs:
            how += f", radius {attrs['radius_um']:.0f} µm"
        if "fdr" in attrs:
            how += f", FDR {attrs['fdr']:.0%}"
        info.append(f"{how}: {int(hot.sum())} hot, {int(cold.sum())} cold spots")
    _header(fig, name, info or [f"{canvas.n_spots} spots"])
    ax = fig.add_subplot()
    _background(ax, canvas)
    finite = values[np.isfinite(values)]
    bound = float(np.percentile(np.abs(finite), style.percentiles[1])) if finite.size else 1.0
    norm = Normalize(-bound, bound) if bound > 0 else Normalize(-1.0, 1.0)
    cmap = _cmap(style.score_cmap)
    _spots(ax, canvas, values, cmap=cmap, norm=norm, alpha=style.spot_alpha, linewidths=0)
    handles = []
    for mask, colour, label in ((hot, style.hot_colour, "hot"), (cold, style.cold_colour, "cold")):
        if hotspots is None:
            break
        if mask.any():
            sub = SlideCanvas(canvas.coords_px[mask], canvas.spot_diameter_px, None, canvas.scalef)
            _spots(ax, sub, facecolors="none", edgecolors=colour, linewidths=2.0, zorder=3)
        ring = {"marker": "o", "markersize": 10, "markerfacecolor": "none", "markeredgecolor": colour, "markeredgewidth": 2}
        handles.append(Line2D([], [], ls="none", label=f"{label} ({int(mask.sum())})", **ring))
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False, fontsize=9)
    _scale_bar(ax, canvas)
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.75, extend="both", label=units or None)
    return fig


def score_map(
    canvas: SlideCanvas,
    scores,
    name: str,
    hotspots=None,
    units: str = "mean z-score",
    subtitle: str = "",
    out: str | Path | None = None,
    style: MapStyle = DEFAULT_STYLE,
) -> bytes:
    """PNG of :func:`score_map_figure` (same parameters), written to ``out`` when given."""
    return render_png(score_map_figure(canvas, scores, name, hotspots, units, subtitle, style), out)


# --------------------------------------------------------------------- tissue mask
def _fit_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    """``mask`` as bool at ``shape``: nearest-neighbour resampled when the size differs but the aspect agrees."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"the tissue mask must be 2-D (h, w), got shape {mask.shape}")
    mask = mask.astype(bool)
    if mask.shape == shape:
        return mask
    if abs(mask.shape[0] / mask.shape[1] - shape[0] / shape[1]) > 0.02 * shape[0] / shape[1]:
        raise ValueError(f"the tissue mask {mask.shape} does not match the thumbnail {shape}")
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(int), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(int), mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def tissue_mask_figure(image, mask, title: str = "Tissue mask", canvas: SlideCanvas | None = None, style: MapStyle = DEFAULT_STYLE) -> Figure:
    """The whole thumbnail with the detected tissue shaded and outlined.

    Parameters
    ----------
    image
        ``(h, w, 3)`` thumbnail.
    mask
        Bool/uint8 ``(h, w)`` (non-zero = tissue) at the thumbnail scale; a
        mask of another size with the same aspect ratio is resampled.
    title
        Header title.
    canvas
        When given, its spots are outlined too (e.g. the grid placed on tissue);
        its ``scalef`` must refer to this thumbnail.
    style
        Sizes and colours.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (h, w) or (h, w, 3), got shape {image.shape}")
    tissue = _fit_mask(mask, image.shape[:2])
    fig = _new_figure(1, style)
    info = [f"tissue covers {tissue.mean():.0%} of the image"]
    if canvas is not None:
        info.append(f"{canvas.n_spots} spots")
    _header(fig, title, info)
    ax = fig.add_subplot()
    height, width = tissue.shape
    ax.imshow(image, extent=(0, width, height, 0), interpolation="antialiased")
    overlay = np.zeros((height, width, 4))
    overlay[tissue] = (0.1, 0.8, 0.3, 0.35)
    ax.imshow(overlay, extent=(0, width, height, 0), interpolation="nearest")
    if tissue.any() and not tissue.all():
        # Pixel centres in image coordinates (y down, like the imshow above).
        centres_x, centres_y = np.arange(width) + 0.5, np.arange(height) + 0.5
        ax.contour(centres_x, centres_y, tissue.astype(float), levels=[0.5], colors=["#00a040"], linewidths=1.2)
    if canvas is not None and canvas.n_spots:
        _spots(ax, canvas, facecolors="none", edgecolors="#222222", linewidths=0.6)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.legend(
        handles=[Rectangle((0, 0), 1, 1, facecolor=(0.1, 0.8, 0.3, 0.35), edgecolor="#00a040", label="tissue")],
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        frameon=False,
        fontsize=9,
    )
    return fig


def tissue_mask_map(
    image, mask, title: str = "Tissue mask", canvas: SlideCanvas | None = None, out: str | Path | None = None, style: MapStyle = DEFAULT_STYLE
) -> bytes:
    """PNG of :func:`tissue_mask_figure` (same parameters), written to ``out`` when given."""
    return render_png(tissue_mask_figure(image, mask, title, canvas, style), out)


# --------------------------------------------------------------------- AnnData bridge
def _reliable_threshold(adata: ad.AnnData) -> float:
    threshold = adata.uns.get("virtualst", {}).get("reliable_pearson")
    if threshold is None:
        from virtualst.heads.predictor import DEFAULT_RELIABLE_PEARSON

        return float(DEFAULT_RELIABLE_PEARSON)
    return float(threshold)


def units_label(adata: ad.AnnData) -> str:
    """Colour-bar label from ``uns['virtualst']['normalization']`` (``""`` when unknown)."""
    normalization = adata.uns.get("virtualst", {}).get("normalization")
    return NORMALIZATION_LABELS.get(str(normalization), str(normalization)) if normalization else ""


def select_genes(adata: ad.AnnData, genes: Sequence[str] | None = None, top: int = 12) -> list[str]:
    """``genes`` checked against ``var_names``, or the ``top`` genes by ``var['cv_pearson']``.

    Without a ``cv_pearson`` column, the first ``top`` genes. Genes with no
    CV value come after every gene with one.

    Raises
    ------
    KeyError
        Naming the requested genes that are not in the AnnData.
    """
    if genes is not None:
        genes = [str(g) for g in ([genes] if isinstance(genes, str) else genes)]
        missing = [g for g in genes if g not in adata.var_names]
        if missing:
            raise KeyError(f"{len(missing)} gene(s) not in the predictions: {', '.join(missing[:10])}")
        return genes
    names = [str(g) for g in adata.var_names]
    if "cv_pearson" not in adata.var:
        return names[:top]
    cv = adata.var["cv_pearson"].to_numpy(dtype=np.float64)
    order = np.argsort(-np.where(np.isfinite(cv), cv, -np.inf), kind="stable")
    return [names[i] for i in order[:top]]


def _column(matrix, j: int) -> np.ndarray:
    column = matrix[:, j]
    column = column.toarray() if sp.issparse(column) else np.asarray(column)
    return column.astype(np.float64).ravel()


def safe_filename(name: str) -> str:
    """``name`` with everything but letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "unnamed"


def _outputs(names: Sequence[str], out_dir: str | Path | None, suffix: str) -> dict[str, Path | None]:
    """Name -> unique PNG path in ``out_dir`` (``None`` when only bytes are wanted)."""
    if out_dir is None:
        return {n: None for n in names}
    paths, used = {}, set()
    for name in names:
        stem = safe_filename(name) + suffix
        candidate, k = stem, 1
        while candidate.lower() in used:  # case-insensitive file systems too
            k += 1
            candidate = f"{stem}-{k}"
        used.add(candidate.lower())
        paths[name] = Path(out_dir) / f"{candidate}.png"
    return paths


def gene_maps(
    adata: ad.AnnData,
    genes: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    top: int = 12,
    style: MapStyle = DEFAULT_STYLE,
) -> dict[str, bytes | Path]:
    """Gene maps of a prediction AnnData, everything read from its conventions.

    Predicted values from ``X``, measured from ``layers['measured']`` when
    present (then measured and predicted side by side on one colour scale),
    ``var['cv_pearson']`` and ``uns['virtualst']['reliable_pearson']`` for the
    reliability flag, geometry and thumbnail via :meth:`SlideCanvas.from_anndata`.

    Parameters
    ----------
    adata
        Output of :meth:`virtualst.heads.predictor.GenePredictor.predict`.
    genes
        Genes to draw; ``None``: the ``top`` genes by cross-validated Pearson.
    out_dir
        Write ``{gene}.png`` files there and return their paths; ``None``:
        return PNG bytes.
    top
        How many genes when ``genes`` is ``None``.
    style
        Sizes and colours.

    Returns
    -------
    dict[str, bytes | Path]
        Gene -> PNG bytes, or gene -> written path when ``out_dir`` is given.
    """
    canvas = SlideCanvas.from_anndata(adata)
    measured = adata.layers["measured"] if "measured" in adata.layers else None

    def draw(j: int, gene: str, cv: float | None, threshold: float, units: str, out: Path | None) -> bytes:
        measured_j = None if measured is None else _column(measured, j)
        return gene_map(canvas, _column(adata.X, j), gene, measured_j, cv, threshold, units, out, style)

    return _per_gene(adata, genes, top, out_dir, "", draw)


def _per_gene(
    adata: ad.AnnData, genes: Sequence[str] | None, top: int, out_dir: str | Path | None, suffix: str, draw
) -> dict[str, bytes | Path]:
    """Call ``draw(column, gene, cv_pearson, threshold, units, out)`` for each chosen gene; bytes or written paths by gene."""
    chosen = select_genes(adata, genes, top)
    threshold, units = _reliable_threshold(adata), units_label(adata)
    cv = adata.var["cv_pearson"] if "cv_pearson" in adata.var else None
    paths = _outputs(chosen, out_dir, suffix)
    result: dict[str, bytes | Path] = {}
    for gene in chosen:
        j = adata.var_names.get_loc(gene)
        data = draw(j, gene, None if cv is None else float(cv.iloc[j]), threshold, units, paths[gene])
        result[gene] = data if paths[gene] is None else paths[gene]
    return result


def gene_scatters(
    adata: ad.AnnData,
    genes: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    top: int = 12,
    style: MapStyle = DEFAULT_STYLE,
) -> dict[str, bytes | Path]:
    """Predicted-vs-measured scatter plots (as :func:`gene_maps`; files ``{gene}_scatter.png``).

    Returns an empty dict when the AnnData has no ``layers['measured']``.
    """
    if "measured" not in adata.layers:
        return {}
    measured = adata.layers["measured"]

    def draw(j: int, gene: str, cv: float | None, threshold: float, units: str, out: Path | None) -> bytes:
        return scatter_plot(_column(measured, j), _column(adata.X, j), gene, cv, threshold, units, out, style)

    return _per_gene(adata, genes, top, out_dir, "_scatter", draw)


def score_maps(
    adata: ad.AnnData,
    scores: pd.DataFrame,
    hotspot_tables: Mapping[str, pd.DataFrame] | None = None,
    report: pd.DataFrame | None = None,
    out_dir: str | Path | None = None,
    style: MapStyle = DEFAULT_STYLE,
) -> dict[str, bytes | Path]:
    """Score maps of every column of ``scores`` (files ``{name}_score.png``).

    Parameters
    ----------
    adata
        The AnnData the scores were computed on (geometry and thumbnail).
    scores
        Spots × signatures, rows in ``adata``'s order.
    hotspot_tables
        Signature -> :func:`virtualst.predict.hotspots.hotspots` table, to outline.
    report
        :func:`virtualst.predict.signatures.score_gene_sets` report; adds
        "n of m genes used" to each header.
    out_dir
        As in :func:`gene_maps`.
    style
        Sizes and colours.
    """
    canvas = SlideCanvas.from_anndata(adata)
    names = [str(c) for c in scores.columns]
    paths = _outputs(names, out_dir, "_score")
    result: dict[str, bytes | Path] = {}
    for name in names:
        subtitle = ""
        if report is not None and name in report.index:
            row = report.loc[name]
            subtitle = f"{int(row['n_genes_used'])} of {int(row['n_genes'])} genes used"
        tables = hotspot_tables or {}
        data = score_map(canvas, scores[name].to_numpy(), name, tables.get(name), subtitle=subtitle, out=paths[name], style=style)
        result[name] = data if paths[name] is None else paths[name]
    return result
