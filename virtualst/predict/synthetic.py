"""A deterministic synthetic H&E data set whose expression is a known function of morphology.

``virtualst demo`` needs data that exists without downloads and carries real,
checkable signal: heads fitted on frozen-encoder embeddings of these sections
must recover the genes that the morphology drives, and must not invent signal
for the genes it does not drive.

Each section is a legacy ST (her2st layout) section that
:func:`virtualst.read` / :func:`virtualst.embed.readers.read_all` read as is:

``ST-cnts/{id}.tsv``
    counts, rows ``"{x}x{y}"``, one column per gene;
``ST-spotfiles/{id}_selection.tsv``
    ``x y new_x new_y pixel_x pixel_y selected``;
``ST-imgs/{patient}/{id}/{id}.jpg``
    the H&E-like image (the folder names the patient, as in her2st);
``truth/{id}_morphology.tsv``
    the measured morphology and library-size factor of every spot;
``synthetic_truth.json``
    the morphology features, the gene model and the sections.

The generative model
--------------------
1. Three smooth random *tissue states* per section (Gaussian-filtered white
   noise, correlation length about a spot pitch): cellularity, nuclear size
   and gland (lumen) content, plus an irregular tissue outline.
2. Rendering in optical density with H&E stain vectors (:data:`HEMATOXYLIN`, :data:`EOSIN`):
   eosin stroma with wavy collagen fibres, paler cytoplasm where cells are
   dense, haematoxylin nuclei drawn as ellipses (a Poisson process thinned by
   cellularity, denser along gland linings, spindle-shaped in stroma), white
   lumina and background, a slight optical blur and sensor noise.
3. Morphology measured on the rendered section inside each spot (100 µm
   disc): nuclear density (nuclei per 0.01 mm²), mean nuclear area (µm²) and
   lumen fraction. These measured values, standardised with fixed constants
   (:data:`FEATURES`), are the ground truth ``z``.
4. Expression: ``log mu = log(library) + intercept + W z`` per gene, with
   strongly driven, weakly driven and pure-noise genes; library sizes are
   log-normal and independent of morphology; counts are negative binomial
   (gamma-Poisson) draws.

Every random draw comes from a :class:`numpy.random.Generator` seeded from
``(seed, section index)`` (the gene model from ``seed`` alone), so the same
seed writes byte-identical files (the JPEG through Pillow at fixed quality).

Examples
--------
>>> make_synthetic_dataset("demo-data", n_sections=4, seed=0)     # doctest: +SKIP
>>> samples = virtualst.embed.readers.read_all("demo-data")        # doctest: +SKIP
>>> read_truth("demo-data")["groups"]["strong"]                    # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from virtualst._version import __version__
from virtualst.files import write_atomically

TRUTH_FILE = "synthetic_truth.json"
SPOT_PITCH_UM = 200.0
SPOT_DIAMETER_UM = 100.0

#: Optical-density vectors (R, G, B): haematoxylin of Ruifrok & Johnston (2001); eosin with more
#: blue absorption than theirs, which renders as the pink of scanned slides rather than magenta.
HEMATOXYLIN = np.array([0.650, 0.704, 0.286], dtype=np.float32)
EOSIN = np.array([0.092, 0.933, 0.348], dtype=np.float32)
#: Glass/background brightness per channel (slightly bluish white, as a scanner sees it).
BACKGROUND = np.array([243.0, 241.0, 246.0], dtype=np.float32)

#: Coarse grid of the tissue-state fields, µm per cell.
_FIELD_CELL_UM = 20.0
#: Grid of the gland field (lumen shapes), µm per cell.
_GLAND_CELL_UM = 4.0
#: Nuclei stamped per vectorised batch (bounds memory to a few tens of MB).
_NUCLEI_BATCH = 20_000


@dataclass(frozen=True)
class Feature:
    """One morphology feature measured in every spot, and its fixed standardisation."""

    name: str
    description: str
    unit: str
    center: float
    scale: float


#: Morphology features driving expression: ``z = (measured - center) / scale`` (constants fixed
#: from the generator's design, never re-estimated per section, so every section shares one model).
FEATURES: tuple[Feature, ...] = (
    Feature("nuclear_density", "nuclei whose centre lies in the spot, per 0.01 mm²", "nuclei / 0.01 mm²", 60.0, 40.0),
    Feature("nuclear_area", "mean drawn area of those nuclei", "µm²", 55.0, 25.0),
    Feature("lumen_fraction", "fraction of the spot covered by white gland lumina", "fraction", 0.12, 0.17),
)
FEATURE_NAMES = tuple(f.name for f in FEATURES)


# ----------------------------------------------------------------------------- gene model
@dataclass(frozen=True)
class Gene:
    """One gene: ``log mu = log(library) + intercept + sum(weights[f] * z[f])``."""

    name: str
    group: str  # "strong", "weak" or "noise"
    intercept: float
    weights: dict[str, float]


@dataclass(frozen=True)
class GeneModel:
    """The known map from standardised morphology to expected counts.

    Attributes
    ----------
    genes
        Every gene, strongly driven first, then weakly driven, then noise.
    dispersion
        Negative-binomial dispersion ``phi`` (variance ``mu + phi mu²``).
    library_sd
        Standard deviation of the log library-size factor (mean factor 1).
    z_clip
        Standardised features are clipped to ``[-z_clip, z_clip]`` first.
    """

    genes: tuple[Gene, ...]
    dispersion: float = 0.1
    library_sd: float = 0.3
    z_clip: float = 3.0

    @property
    def names(self) -> list[str]:
        """Gene names in column order."""
        return [g.name for g in self.genes]

    def groups(self) -> dict[str, list[str]]:
        """Gene names by group."""
        out: dict[str, list[str]] = {"strong": [], "weak": [], "noise": []}
        for g in self.genes:
            out[g.group].append(g.name)
        return out

    def log_mean(self, z: np.ndarray, library: np.ndarray) -> np.ndarray:
        """``log mu`` (spots x genes) from standardised features ``z`` (spots x features) and library factors."""
        z = np.clip(z, -self.z_clip, self.z_clip)
        weights = np.array([[g.weights.get(f, 0.0) for f in FEATURE_NAMES] for g in self.genes])
        intercept = np.array([g.intercept for g in self.genes])
        return np.log(library)[:, None] + intercept[None, :] + z @ weights.T

    def sample_counts(self, z: np.ndarray, library: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Negative-binomial counts (spots x genes) as a gamma-Poisson mixture."""
        mu = np.exp(self.log_mean(z, library))
        shape = 1.0 / self.dispersion
        return rng.poisson(rng.gamma(shape, mu / shape)).astype(np.int64)

    def table(self) -> pd.DataFrame:
        """One row per gene: group, baseline mean count (library factor 1, z = 0) and weight per feature."""
        rows = [{"gene": g.name, "group": g.group, "baseline_mean": float(np.exp(g.intercept)), **g.weights} for g in self.genes]
        table = pd.DataFrame(rows, columns=["gene", "group", "baseline_mean", *FEATURE_NAMES])
        return table.fillna({f: 0.0 for f in FEATURE_NAMES}).set_index("gene")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneModel:
        """Inverse of :meth:`to_dict` (e.g. the ``gene_model`` of a truth file)."""
        genes = tuple(Gene(g["name"], g["group"], float(g["intercept"]), dict(g["weights"])) for g in data["genes"])
        return cls(genes, float(data["dispersion"]), float(data["library_sd"]), float(data["z_clip"]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, written into the truth file."""
        return {
            "formula": "log mu = log(library) + intercept + sum_f weight_f * clip(z_f, -z_clip, z_clip)",
            "counts": "negative binomial: Poisson(Gamma(shape=1/dispersion, scale=mu*dispersion))",
            "dispersion": self.dispersion,
            "library_sd": self.library_sd,
            "library": "exp(N(-library_sd**2/2, library_sd**2)), independent of morphology",
            "z_clip": self.z_clip,
            "genes": [asdict(g) for g in self.genes],
        }


def default_gene_model(seed: int = 0, n_strong: int = 18, n_weak: int = 16, n_noise: int = 16) -> GeneModel:
    """A gene model with strongly driven, weakly driven and pure-noise genes.

    Fifty genes by default, so the predictor's default target (``hvg:50``)
    applies as is. Strong genes are driven by one feature (effect 0.6-0.9 per standard
    deviation) or, one in three, by two; weak genes by one feature with effect
    0.1-0.2; noise genes by none. Baseline means span 8-40 counts per spot,
    100-400 for every other noise gene.
    Strong and weak genes are named after their main driver (``DENS``,
    ``AREA``, ``LUMN``; ``S`` strong, ``W`` weak); noise genes are ``NOISE``.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31,)))
    short = {"nuclear_density": "DENS", "nuclear_area": "AREA", "lumen_fraction": "LUMN"}
    genes: list[Gene] = []
    for group, n, low, high in (("strong", n_strong, 0.6, 0.9), ("weak", n_weak, 0.1, 0.2)):
        for i in range(n):
            main = FEATURE_NAMES[i % len(FEATURE_NAMES)]
            weights = {main: float(rng.choice([-1, 1]) * rng.uniform(low, high))}
            if group == "strong" and i % 3 == 2:  # a second driver for some genes
                other = FEATURE_NAMES[(i + 1) % len(FEATURE_NAMES)]
                weights[other] = float(rng.choice([-1, 1]) * rng.uniform(0.3, 0.5))
            name = f"{short[main]}-{group[0].upper()}{i // len(FEATURE_NAMES) + 1}"
            genes.append(Gene(name, group, float(np.log(rng.uniform(8, 40))), weights))
    for i in range(n_noise):
        # Every other noise gene is abundant: morphology-independent genes then dominate the library
        # size, as in real data, so library-size normalisation does not leak morphology into them.
        low, high = (100, 400) if i % 2 else (8, 40)
        genes.append(Gene(f"NOISE-{i + 1}", "noise", float(np.log(rng.uniform(low, high))), {}))
    return GeneModel(tuple(genes))


# ----------------------------------------------------------------------------- tissue states
@dataclass
class TissueStates:
    """Smooth fields of one section on a coarse grid (``_FIELD_CELL_UM`` per cell).

    ``cellularity``, ``nuclear_size`` and ``glands`` lie in (0, 1); the fibre
    angle and warp are in radians; ``tissue`` is positive inside the outline.
    """

    cellularity: np.ndarray
    nuclear_size: np.ndarray
    glands: np.ndarray
    fibre_angle: np.ndarray  # radians
    fibre_warp: np.ndarray  # radians
    tissue: np.ndarray  # > 0 inside the outline


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit variance (by theory, so sections differ in level)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return noise * np.sqrt(4 * np.pi) * sigma


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _outline(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Signed tissue outline on the coarse grid: an ellipse with a wavy rim, positive inside."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = np.zeros_like(angle)
    for k in range(2, 7):  # a few angular harmonics make the rim irregular
        wobble += rng.normal(0, 0.05 / k**0.5) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    rx, ry = 0.48 * w * rng.uniform(0.92, 1.0), 0.48 * h * rng.uniform(0.92, 1.0)
    radius = np.hypot((xx - cx) / rx, (yy - cy) / ry)
    return (1.0 + wobble) - radius


def tissue_states(rng: np.random.Generator, size_px: tuple[int, int], um_per_px: float) -> TissueStates:
    """Draw the tissue-state fields of one section of ``size_px`` (width, height)."""
    w, h = size_px
    shape = (int(np.ceil(h * um_per_px / _FIELD_CELL_UM)) + 1, int(np.ceil(w * um_per_px / _FIELD_CELL_UM)) + 1)
    corr = SPOT_PITCH_UM / _FIELD_CELL_UM  # correlation length ~ one spot pitch: spots differ
    return TissueStates(
        cellularity=_sigmoid(1.6 * _smooth_field(rng, shape, 0.8 * corr)),
        nuclear_size=_sigmoid(1.6 * _smooth_field(rng, shape, 1.0 * corr)),
        glands=_sigmoid(1.6 * _smooth_field(rng, shape, 1.0 * corr)),
        fibre_angle=np.pi * _smooth_field(rng, shape, 2.0 * corr),
        fibre_warp=2.0 * _smooth_field(rng, shape, 0.5 * corr),
        tissue=_outline(rng, shape),
    )


def _upsample(field_: np.ndarray, size_px: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a coarse field to ``size_px`` (width, height), float32."""
    return np.asarray(Image.fromarray(field_.astype(np.float32), mode="F").resize(size_px, Image.BILINEAR))


def _sample_at(field_: np.ndarray, x: np.ndarray, y: np.ndarray, size_px: tuple[int, int]) -> np.ndarray:
    """Bilinear value of a coarse field at full-resolution pixel positions (same convention as :func:`_upsample`)."""
    w, h = size_px
    rows = (y + 0.5) * field_.shape[0] / h - 0.5
    cols = (x + 0.5) * field_.shape[1] / w - 0.5
    return ndimage.map_coordinates(field_, [rows, cols], order=1, mode="nearest")


# ----------------------------------------------------------------------------- rendering
@dataclass
class Nuclei:
    """Drawn nuclei: centre (px), semi-axes (px), orientation (rad)."""

    x: np.ndarray
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray

    def area_um2(self, um_per_px: float) -> np.ndarray:
        """Area of every nucleus in µm²."""
        return np.pi * self.a * self.b * um_per_px**2


@dataclass
class Rendering:
    """A rendered section: the RGB image and the masks the truth is measured on."""

    rgb: np.ndarray  # (h, w, 3) uint8
    tissue: np.ndarray  # (h, w) bool
    lumen: np.ndarray  # (h, w) bool, inside tissue
    nuclei: Nuclei


def _place_nuclei(
    rng: np.random.Generator, states: TissueStates, gland: np.ndarray, threshold: np.ndarray, tissue: np.ndarray, um_per_px: float
) -> Nuclei:
    """Nuclei as a thinned Poisson process: denser with cellularity and along gland linings, none in lumina."""
    h, w = tissue.shape
    size_px = (w, h)
    max_density = 1 / 60.0  # nuclei per µm², the densest carcinoma
    n = rng.poisson(max_density * w * h * um_per_px**2)
    x = rng.uniform(0, w, n)
    y = rng.uniform(0, h, n)
    keep_draw = rng.uniform(0, 1, n)
    ix, iy = x.astype(np.int64), y.astype(np.int64)
    cell = _sample_at(states.cellularity, x, y, size_px)
    margin = threshold[iy, ix] - gland[iy, ix]  # > 0 outside lumina; small near their rim
    lining = np.exp(-(np.maximum(margin, 0) / 0.25) ** 2)  # epithelium lines the glands
    accept = np.clip(0.06 + 0.94 * cell**1.5 + 0.6 * lining, 0, 1)
    keep = (keep_draw < accept) & tissue[iy, ix] & (margin > 0)
    x, y, cell = x[keep], y[keep], cell[keep]
    mean_radius_um = 2.6 + 3.2 * _sample_at(states.nuclear_size, x, y, size_px)  # pleomorphism
    radius = mean_radius_um * rng.lognormal(0, 0.12, x.size) / um_per_px
    # Stromal (fibroblast) nuclei are spindles along the fibres; epithelial ones round.
    elong = 1.0 + (2.2 * (1 - cell) ** 2) * rng.uniform(0.5, 1.0, x.size)
    theta = _sample_at(states.fibre_angle, x, y, size_px) + rng.normal(0, 0.25, x.size)
    return Nuclei(x=x, y=y, a=radius * np.sqrt(elong), b=radius / np.sqrt(elong), theta=theta)


def _stamp_nuclei(nuclei: Nuclei, od: np.ndarray, rng: np.random.Generator) -> None:
    """Draw every nucleus's haematoxylin density into ``od`` (h, w) in place (replacing the background), batch by batch."""
    h, w = od.shape
    flat = od.reshape(-1)
    darkness = rng.uniform(0.75, 1.15, nuclei.x.size).astype(np.float32)
    order = np.argsort(nuclei.a, kind="stable")  # batches of similar size share a small stamp window
    for s in range(0, order.size, _NUCLEI_BATCH):
        sl = order[s : s + _NUCLEI_BATCH]
        reach = int(np.ceil(nuclei.a[sl].max())) + 1
        dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1].astype(np.float32)
        dx, dy = dx.ravel()[None, :], dy.ravel()[None, :]
        cx, cy = nuclei.x[sl].astype(np.float32), nuclei.y[sl].astype(np.float32)
        px = np.floor(cx)[:, None] + dx
        py = np.floor(cy)[:, None] + dy
        c, si = np.cos(nuclei.theta[sl]).astype(np.float32)[:, None], np.sin(nuclei.theta[sl]).astype(np.float32)[:, None]
        u, v = px + 0.5 - cx[:, None], py + 0.5 - cy[:, None]
        a, b = nuclei.a[sl, None].astype(np.float32), nuclei.b[sl, None].astype(np.float32)
        r2 = ((u * c + v * si) / a) ** 2 + ((v * c - u * si) / b) ** 2
        inside = (r2 <= 1.0) & (px >= 0) & (px < w) & (py >= 0) & (py < h)
        value = darkness[sl, None] * (0.75 + 0.35 * r2)  # darker rim: the nuclear membrane
        index = py.astype(np.int64) * w + px.astype(np.int64)
        flat[index[inside]] = value[inside]  # overlaps: the later nucleus is on top


def _fibres(rows: np.ndarray, cols: np.ndarray, angle: np.ndarray, warp: np.ndarray, period_px: float) -> np.ndarray:
    """Wavy collagen fibres in [0, 1] on a block of rows: stripes at four fixed orientations, blended by the local angle.

    Fixed orientations keep the stripe period exact (a spatially varying angle
    in ``x cos a + y sin a`` would distort it far from the origin). The
    straight part of each stripe's phase is separable in x and y, so
    ``sin(L + warp)`` needs only 1-D sines and the block's ``cos``/``sin`` of ``warp``.
    """
    k = np.float32(2 * np.pi / period_px)
    x = cols.astype(np.float32)[None, :] * k
    y = rows.astype(np.float32)[:, None] * k
    cos_w, sin_w = np.cos(warp), np.sin(warp)
    cos_a, sin_a = np.cos(2 * angle), np.sin(2 * angle)
    r = np.float32(np.sqrt(0.5))
    cx, sx, cy, sy = np.cos(r * x), np.sin(r * x), np.cos(r * y), np.sin(r * y)
    # (cos L, sin L) of the straight phase at 0, 45, 90 and 135 degrees, and the blend weight's base.
    stripes = (
        (np.cos(x), np.sin(x), cos_a),
        (cx * cy - sx * sy, sx * cy + cx * sy, sin_a),
        (np.cos(y), np.sin(y), -cos_a),
        (cx * cy + sx * sy, cx * sy - sx * cy, -sin_a),
    )
    out = np.zeros(warp.shape, dtype=np.float32)
    total = np.full(warp.shape, 1e-6, dtype=np.float32)
    for cos_l, sin_l, base in stripes:
        weight = np.maximum(base, 0)
        weight *= weight
        stripe = sin_l * cos_w + cos_l * sin_w  # sin(L + warp)
        stripe *= stripe
        out += weight * stripe
        total += weight
    out /= total
    return out


def _row_blocks(h: int, w: int) -> list[slice]:
    """Row blocks of about 1 Mpx: temporaries stay small (fresh 64 MB arrays cost more in page faults than in maths)."""
    step = max(1, (1 << 20) // max(w, 1))
    return [slice(r, min(h, r + step)) for r in range(0, h, step)]


def render(rng: np.random.Generator, states: TissueStates, size_px: tuple[int, int], um_per_px: float) -> Rendering:
    """Render a section of ``size_px`` (width, height) from its tissue states."""
    w, h = size_px
    tissue = _upsample(states.tissue, size_px) > 0
    gshape = (int(np.ceil(h * um_per_px / _GLAND_CELL_UM)) + 1, int(np.ceil(w * um_per_px / _GLAND_CELL_UM)) + 1)
    gland = _upsample(_smooth_field(rng, gshape, 20.0 / _GLAND_CELL_UM), size_px)  # blobs ~40-80 µm
    threshold = _upsample(2.4 - 2.0 * states.glands, size_px)  # more gland state: lower bar, more lumen
    lumen = tissue & (gland > threshold)
    nuclei = _place_nuclei(rng, states, gland, threshold, tissue, um_per_px)
    del gland, threshold

    grain = ndimage.gaussian_filter(rng.standard_normal((h, w), dtype=np.float32), 1.5 / um_per_px)  # sd ~0.19
    angle = _upsample(states.fibre_angle, size_px)
    # Waviness at two scales, and bundles that fade in and out: regular stripes would be a texture
    # that dominates an ImageNet encoder's features while carrying no signal.
    warp = _upsample(states.fibre_warp * 6.0, size_px) + _upsample(1.5 * _smooth_field(rng, gshape, 8.0 / _GLAND_CELL_UM), size_px)
    bundles = _upsample(_sigmoid(2.0 * _smooth_field(rng, gshape, 6.0 / _GLAND_CELL_UM)), size_px)
    cell = _upsample(states.cellularity, size_px)
    eosin = np.empty((h, w), dtype=np.float32)
    hema = np.empty((h, w), dtype=np.float32)
    cols = np.arange(w)
    for rows in _row_blocks(h, w):
        g, c, solid = grain[rows], cell[rows], tissue[rows] & ~lumen[rows]
        # Eosin: wavy collagen fibres in stroma, paler even cytoplasm where cells are dense.
        fibres = _fibres(np.arange(rows.start, rows.stop), cols, angle[rows], warp[rows], 8.0 / um_per_px)
        fibres *= fibres  # thin bright gaps between fibres
        e = (0.12 + 0.36 * fibres * bundles[rows] * (0.6 + 3.0 * g)) * (1 - c) + 0.16 * c
        eosin[rows] = np.clip(e, 0.04, 0.7) * solid
        hema[rows] = (0.015 + 0.05 * c + 0.03 * g) * solid  # faint counterstain, bluer in cellular areas
    del angle, warp, bundles, cell

    _stamp_nuclei(nuclei, hema, rng)
    hema += 0.08 * grain * (hema > 0.3)  # chromatin texture
    del grain
    blur = 0.6 / um_per_px  # optics
    hema = ndimage.gaussian_filter(hema, blur)
    eosin = ndimage.gaussian_filter(eosin, blur)

    rgb = np.empty((h, w, 3), dtype=np.uint8)
    for rows in _row_blocks(h, w):
        # Beer-Lambert: transmitted = background * 10 ** -(optical density); grey sensor noise.
        od = hema[rows, :, None] * HEMATOXYLIN + eosin[rows, :, None] * EOSIN
        block = BACKGROUND * np.power(np.float32(10), -od) + rng.normal(0, 2.0, (od.shape[0], w, 1)).astype(np.float32)
        rgb[rows] = np.clip(np.rint(block), 0, 255)
    return Rendering(rgb, tissue, lumen, nuclei)


# ----------------------------------------------------------------------------- spots and truth
def spot_grid(size_px: tuple[int, int], um_per_px: float, pitch_um: float = SPOT_PITCH_UM) -> pd.DataFrame:
    """The ST 1k array over the image: array ``x``/``y`` (from 1) and exact pixel centres."""
    w, h = size_px
    pitch = pitch_um / um_per_px
    cols = np.arange(int((w - pitch / 2) // pitch) + 1)
    rows = np.arange(int((h - pitch / 2) // pitch) + 1)
    ay, ax = np.meshgrid(rows, cols, indexing="ij")
    return pd.DataFrame(
        {"x": ax.ravel() + 1, "y": ay.ravel() + 1, "cx": pitch / 2 + ax.ravel() * pitch, "cy": pitch / 2 + ay.ravel() * pitch}
    )


def measure_spots(render_: Rendering, cx: np.ndarray, cy: np.ndarray, um_per_px: float) -> pd.DataFrame:
    """Morphology inside each spot disc (centres in pixels): the ground truth the genes follow."""
    radius = SPOT_DIAMETER_UM / 2 / um_per_px
    nuc = render_.nuclei
    tree = cKDTree(np.column_stack([cx, cy]))
    dist, owner = tree.query(np.column_stack([nuc.x, nuc.y]), distance_upper_bound=radius)
    inside = np.isfinite(dist)
    owner = owner[inside]
    n_spots = len(cx)
    count = np.bincount(owner, minlength=n_spots)
    area = np.bincount(owner, weights=nuc.area_um2(um_per_px)[inside], minlength=n_spots)
    disc_area_um2 = np.pi * (SPOT_DIAMETER_UM / 2) ** 2

    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    h, w = render_.lumen.shape
    lumen = np.empty(n_spots)
    tissue = np.empty(n_spots)
    for i, (x, y) in enumerate(zip(np.rint(cx).astype(int), np.rint(cy).astype(int))):
        py, px = y + dy, x + dx
        disc = (dx**2 + dy**2 <= radius**2) & (px >= 0) & (px < w) & (py >= 0) & (py < h)
        lumen[i] = render_.lumen[py[disc], px[disc]].sum() / disc.sum()
        tissue[i] = render_.tissue[py[disc], px[disc]].sum() / disc.sum()
    # A spot without nuclei has no mean nuclear area: the reference value (z = 0) keeps the model finite.
    mean_area = np.divide(area, count, out=np.full(n_spots, FEATURES[1].center), where=count > 0)
    return pd.DataFrame(
        {
            "nuclear_density": count / disc_area_um2 * 1e4,
            "nuclear_area": mean_area,
            "lumen_fraction": lumen,
            "tissue_fraction": tissue,
            "n_nuclei": count,
        }
    )


def standardize(morphology: pd.DataFrame) -> np.ndarray:
    """Standardised features ``z`` (spots x features) with the fixed constants of :data:`FEATURES`."""
    return np.column_stack([(morphology[f.name].to_numpy(float) - f.center) / f.scale for f in FEATURES])


# ----------------------------------------------------------------------------- sections
@dataclass
class SyntheticSection:
    """One generated section in memory (before writing)."""

    sample_id: str
    patient_id: str
    image: np.ndarray
    spots: pd.DataFrame  # x y new_x new_y pixel_x pixel_y selected
    counts: pd.DataFrame  # spots x genes, index "{x}x{y}"
    morphology: pd.DataFrame  # index "{x}x{y}"
    summary: dict[str, Any] = field(default_factory=dict)


def section_ids(n_sections: int, sections_per_patient: int = 1) -> list[tuple[str, str]]:
    """``(sample_id, patient_id)`` pairs: her2st-style ids, patient letter + section number (A1, B1...)."""
    if n_sections < 1 or sections_per_patient < 1:
        raise ValueError("n_sections and sections_per_patient must be at least 1")
    if n_sections > 26 * sections_per_patient:
        raise ValueError("at most 26 patients (letters A-Z)")
    patients = [chr(65 + i // sections_per_patient) for i in range(n_sections)]
    return [(f"{patient}{i % sections_per_patient + 1}", patient) for i, patient in enumerate(patients)]


def make_section(
    index: int,
    sample_id: str,
    patient_id: str,
    model: GeneModel,
    seed: int = 0,
    size_um: float | tuple[float, float] = 4000.0,
    um_per_px: float = 1.0,
) -> SyntheticSection:
    """Generate one section: image, spots under tissue, morphology and counts.

    Parameters
    ----------
    index
        Position of the section in the data set; with ``seed`` it seeds every draw.
    sample_id, patient_id
        Names written into the layout.
    model
        The gene model.
    seed
        Data-set seed.
    size_um
        Side (or ``(width, height)``) of the image in µm.
    um_per_px
        Pixel size of the image.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    width_um, height_um = (size_um, size_um) if np.isscalar(size_um) else size_um
    size_px = (int(round(width_um / um_per_px)), int(round(height_um / um_per_px)))
    states = tissue_states(rng, size_px, um_per_px)
    rendered = render(rng, states, size_px, um_per_px)

    grid = spot_grid(size_px, um_per_px)
    # Spots whose centre lies on tissue were sequenced (and selected), as in her2st spot files.
    on_tissue = rendered.tissue[np.rint(grid["cy"]).astype(int), np.rint(grid["cx"]).astype(int)]
    grid = grid[on_tissue].reset_index(drop=True)
    barcodes = [f"{x}x{y}" for x, y in zip(grid["x"], grid["y"])]
    morphology = measure_spots(rendered, grid["cx"].to_numpy(), grid["cy"].to_numpy(), um_per_px)
    morphology.index = pd.Index(barcodes, name="barcode")
    library = np.exp(rng.normal(-model.library_sd**2 / 2, model.library_sd, len(grid)))
    morphology["library_factor"] = library
    counts = model.sample_counts(standardize(morphology), library, rng)

    # Alignment jitter of a real spot detection (sub-pixel), kept in new_x/new_y as her2st does.
    jitter = np.round(rng.normal(0, 0.4, (len(grid), 2)), 2)
    pitch_px = SPOT_PITCH_UM / um_per_px
    spots = pd.DataFrame(
        {
            "x": grid["x"],
            "y": grid["y"],
            "new_x": np.round(grid["x"] + jitter[:, 0] / pitch_px, 4),
            "new_y": np.round(grid["y"] + jitter[:, 1] / pitch_px, 4),
            "pixel_x": np.round(grid["cx"] + jitter[:, 0], 2),
            "pixel_y": np.round(grid["cy"] + jitter[:, 1], 2),
            "selected": 1,
        }
    )
    table = pd.DataFrame(counts, index=pd.Index(barcodes), columns=model.names)
    summary = {
        "sample_id": sample_id,
        "patient_id": patient_id,
        "n_spots": len(grid),
        "n_nuclei": int(rendered.nuclei.x.size),
        "image_size_px": list(size_px),
        "tissue_fraction": round(float(rendered.tissue.mean()), 4),
    }
    return SyntheticSection(sample_id, patient_id, rendered.rgb, spots, table, morphology, summary)


# ----------------------------------------------------------------------------- writing
def write_section(section: SyntheticSection, out_dir: Path, jpeg_quality: int = 90) -> dict[str, str]:
    """Write one section in the her2st layout; returns its files relative to ``out_dir``."""
    sid = section.sample_id
    files = {
        "counts": f"ST-cnts/{sid}.tsv",
        "spots": f"ST-spotfiles/{sid}_selection.tsv",
        "image": f"ST-imgs/{section.patient_id}/{sid}/{sid}.jpg",
        "morphology": f"truth/{sid}_morphology.tsv",
    }
    write_atomically(out_dir / files["counts"], lambda p: section.counts.to_csv(p, sep="\t", lineterminator="\n"))
    write_atomically(out_dir / files["spots"], lambda p: section.spots.to_csv(p, sep="\t", index=False, lineterminator="\n"))
    write_atomically(
        out_dir / files["morphology"],
        lambda p: section.morphology.to_csv(p, sep="\t", float_format="%.6g", lineterminator="\n"),
    )
    write_atomically(
        out_dir / files["image"],
        lambda p: Image.fromarray(section.image).save(p, format="JPEG", quality=jpeg_quality, optimize=False, subsampling=0),
    )
    return files


def _prepare(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder; on ``overwrite``, remove the files a previous synthetic set listed (nothing else)."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not (out_dir / TRUTH_FILE).is_file():
        raise FileExistsError(f"{out_dir} is not empty and holds no synthetic data set: choose an empty folder")
    if not overwrite:
        raise FileExistsError(f"{out_dir} already holds a synthetic data set: pass overwrite=True to replace it")
    for section in read_truth(out_dir).get("sections", []):
        for rel in section.get("files", {}).values():
            (out_dir / rel).unlink(missing_ok=True)


def make_synthetic_dataset(
    out_dir: str | Path,
    n_sections: int = 4,
    seed: int = 0,
    *,
    size_um: float | tuple[float, float] = 4000.0,
    um_per_px: float = 1.0,
    sections_per_patient: int = 1,
    model: GeneModel | None = None,
    jpeg_quality: int = 90,
    overwrite: bool = False,
) -> list[Path]:
    """Write a synthetic legacy-ST data set whose expression is a known function of morphology.

    Parameters
    ----------
    out_dir
        Folder to write (a her2st-style root; created if needed).
    n_sections
        Sections to generate.
    seed
        Seed of every draw: the same seed and parameters give byte-identical files.
    size_um
        Side of each section image in µm, or ``(width, height)``; at the
        200 µm ST pitch a 4 mm side holds about 400 array positions.
    um_per_px
        Pixel size of the images.
    sections_per_patient
        Consecutive sections sharing a patient (ids ``A1, A2, B1...``); the
        patient is the image folder name, which the legacy ST reader reports.
    model
        Gene model (default :func:`default_gene_model` of ``seed``).
    jpeg_quality
        Quality of the written JPEG images.
    overwrite
        Replace a synthetic data set already in ``out_dir`` (only the files
        its truth file lists are removed).

    Returns
    -------
    list of Path
        The counts file of each section; ``virtualst.read(path)`` reads one
        section, ``virtualst.embed.readers.read_all(out_dir)`` all of them.

    Raises
    ------
    FileExistsError
        When ``out_dir`` is not empty, unless it holds a synthetic data set
        and ``overwrite`` is true (sections must never mix with other data).
    """
    out_dir = Path(out_dir)
    _prepare(out_dir, overwrite)
    model = model or default_gene_model(seed)
    written: list[Path] = []
    sections: list[dict[str, Any]] = []
    for index, (sid, patient) in enumerate(section_ids(n_sections, sections_per_patient)):
        section = make_section(index, sid, patient, model, seed=seed, size_um=size_um, um_per_px=um_per_px)
        files = write_section(section, out_dir, jpeg_quality)
        sections.append({**section.summary, "files": files})
        written.append(out_dir / files["counts"])
    truth = {
        "generator": "virtualst.predict.synthetic.make_synthetic_dataset",
        "virtualst_version": __version__,
        "seed": seed,
        "um_per_px": um_per_px,
        "spot_pitch_um": SPOT_PITCH_UM,
        "spot_diameter_um": SPOT_DIAMETER_UM,
        "features": [asdict(f) for f in FEATURES],
        "standardization": "z = (measured - center) / scale, measured inside each 100 µm spot disc",
        "gene_model": model.to_dict(),
        "groups": model.groups(),
        "sections": sections,
    }
    write_atomically(out_dir / TRUTH_FILE, lambda p: p.write_text(json.dumps(truth, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"))
    return written


def read_truth(out_dir: str | Path) -> dict[str, Any]:
    """The ground truth written beside a synthetic data set (features, gene model, groups, sections)."""
    return json.loads((Path(out_dir) / TRUTH_FILE).read_text(encoding="utf-8"))


def read_morphology(out_dir: str | Path, sample_id: str) -> pd.DataFrame:
    """Measured morphology and library factor of every spot of one section, indexed by barcode."""
    return pd.read_csv(Path(out_dir) / "truth" / f"{sample_id}_morphology.tsv", sep="\t", index_col=0)


__all__ = [
    "FEATURES",
    "Feature",
    "Gene",
    "GeneModel",
    "SyntheticSection",
    "TRUTH_FILE",
    "default_gene_model",
    "make_section",
    "make_synthetic_dataset",
    "read_morphology",
    "read_truth",
]
