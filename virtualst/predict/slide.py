"""Predict gene expression over a whole slide: tissue, spot grid, embeddings, heads, files.

:func:`predict_slide` takes either

* a *measured sample* (anything :func:`virtualst.read` recognises: legacy
  ST, Space Ranger ``outs/``, HEST-1k, ``.h5ad``): predictions are made at
  its measured in-tissue spots and the measured expression, normalised like
  the model's targets, is kept in ``layers['measured']``; or
* a *plain image* (JPEG, PNG, TIFF, pyramidal whole-slide image): the tissue
  is detected on a thumbnail (:mod:`virtualst.predict.tissue`) and a virtual
  spot grid is laid over it (:mod:`virtualst.predict.grid`).

The spots are then embedded with the model's encoder and tiling, streaming
tiles batch by batch into the HDF5 cache (bounded memory; a killed run
resumes), and the model predicts every spot. Outputs, each written to a
temporary file and renamed when complete::

    out_dir/predictions.h5ad          AnnData (scanpy/squidpy spatial layout)
    out_dir/predictions.csv           barcode, x, y, one column per gene
    out_dir/predict_settings.json     the resolved settings of the run
    out_dir/cache/{encoder}/{id}.h5   embeddings (reused by later runs)
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from virtualst._version import __version__
from virtualst.anndata_io import write_h5ad_atomic
from virtualst.errors import InputError
from virtualst.files import write_atomically
from virtualst.predict.grid import SpotGrid, get_grid, make_grid
from virtualst.predict.tissue import TissueMask, TissueSettings, detect_tissue, tissue_from_rgb
from virtualst.sample import Sample

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

    from virtualst.embed.images import SlideImage
    from virtualst.embed.runner import EmbedSettings
    from virtualst.heads.predictor import GenePredictor

#: Relative difference above which an explicit ``mpp`` is said to contradict the slide's.
MPP_RTOL = 0.01

H5AD_NAME = "predictions.h5ad"
CSV_NAME = "predictions.csv"
SETTINGS_NAME = "predict_settings.json"

#: Spots predicted per block (bounded memory, see :func:`predict_spots`).
PREDICT_CHUNK_SPOTS = 8192


@dataclass
class SlidePrediction:
    """What :func:`predict_slide` produced.

    Attributes
    ----------
    adata
        Predictions (spots x genes), as written to ``h5ad``.
    h5ad, csv, settings
        Output files.
    cache
        Embedding cache of the spots.
    sample
        The spots predicted (measured or virtual), with the slide image.
    tissue
        Detected tissue; for a measured sample found on its hires image, ``None`` when none is seen there.
    grid
        The virtual grid, ``None`` for a measured sample.
    """

    adata: ad.AnnData
    h5ad: Path
    csv: Path
    settings: Path
    cache: Path
    sample: Sample
    tissue: TissueMask | None = None
    grid: SpotGrid | None = None
    resolved: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- inputs
def load_model(model: str | Path | GenePredictor) -> GenePredictor:
    """A fitted :class:`GenePredictor`, loaded from a directory or Hub repo id unless given as one."""
    from virtualst.heads.predictor import GenePredictor

    if isinstance(model, GenePredictor):
        if not hasattr(model, "head_"):
            raise ValueError("the GenePredictor is not fitted")
        return model
    return GenePredictor.from_pretrained(model)


def resolve_mpp(where: str | Path, found: float | None, given: float | None, found_from: str = "metadata") -> tuple[float, str]:
    """µm per level-0 pixel and where it came from (``found_from`` or ``"argument"``).

    An explicit ``given`` wins over ``found`` (with a warning when they
    disagree by more than :data:`MPP_RTOL`). With neither, raises
    :class:`InputError` asking for ``--mpp``: pixel sizes are never guessed.
    """
    if given is not None:
        given = float(given)
        if not (math.isfinite(given) and given > 0):
            raise InputError(where, f"--mpp must be a positive number of µm per pixel, got {given}")
        if found is not None and not math.isclose(given, found, rel_tol=MPP_RTOL):
            warnings.warn(f"{where}: --mpp {given:g} contradicts the {found_from} ({found:g} µm/px); using {given:g}", stacklevel=3)
        return given, "argument"
    if found is None:
        raise InputError(where, "the image has no pixel size in its metadata; pass --mpp (µm per pixel, e.g. 0.5 at 20x)")
    return float(found), found_from


def _reads_as_sample(path: Path) -> bool:
    """Whether a sample reader (not the plain-image path) handles ``path``."""
    from virtualst.embed.readers import READERS

    return path.is_dir() or any(reader.detect(path) for reader in READERS)


def measured_sample(slide: Path | Sample, sample_id: str | None, mpp: float | None) -> tuple[Sample, dict[str, Any]]:
    """The in-tissue measured spots of a sample (read from ``slide`` unless given), with ``mpp`` applied."""
    import virtualst

    sample = slide if isinstance(slide, Sample) else virtualst.read(slide, sample_id=sample_id)
    where = sample.source if sample.source is not None else sample.sample_id
    um_per_px, source = resolve_mpp(where, sample.um_per_px, mpp, found_from="sample's pixel size")
    if source == "argument":
        sample = replace(sample, um_per_px=um_per_px)
    if sample.spots["in_tissue"].any():
        sample = sample.in_tissue()
    return sample, {"grid": "measured", "mpp": um_per_px, "mpp_source": "sample" if source != "argument" else source}


def virtual_sample(
    image: SlideImage,
    sample_id: str,
    um_per_px: float,
    tissue: TissueMask,
    grid: str,
    pitch_um: float | None,
) -> tuple[Sample, SpotGrid]:
    """A sample without counts whose spots are a ``grid`` over the ``tissue`` of ``image``."""
    spots = make_grid(tissue, image.extent, um_per_px, kind=grid, pitch_um=pitch_um, where=str(image.path))
    sample = Sample(
        sample_id=sample_id,
        spots=spots.spots,
        um_per_px=um_per_px,
        spot_diameter_um=spots.spot_diameter_um,
        image=image,
        source=image.path,
        metadata={"reader": "image", "technology": f"virtual {spots.kind} grid", "image_path": str(image.path)},
    )
    return sample, spots


def embed_settings_for(
    model: GenePredictor,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    weights: str | None = None,
    overwrite: bool = False,
    cpu_replicas: int | None = None,
) -> EmbedSettings:
    """Embedding settings reproducing the model's encoder and tiles (``predict`` refuses any other)."""
    from virtualst.embed.runner import EmbedSettings
    from virtualst.embed.tiling import TileSpec

    encoder = model.encoder_
    return EmbedSettings(
        encoder=str(encoder["name"]),
        tile=TileSpec(px=int(encoder["tile_px"]), um=float(encoder["tile_um"])),
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        tta=bool(encoder.get("tta", False)),
        weights=weights,
        overwrite=overwrite,
        cpu_replicas=cpu_replicas,
    )


# ------------------------------------------------------------------ prediction
def _spatially_coupled(predictor: GenePredictor) -> bool:
    """Whether a spot's prediction depends on other spots (neighbour context or smoothing)."""
    return predictor.context is not None or getattr(predictor, "smoother_", None) is not None


def predict_spots(predictor: GenePredictor, cache: Path, sample: Sample, chunk_spots: int = PREDICT_CHUNK_SPOTS) -> ad.AnnData:
    """``predictor.predict(cache, sample)``, a block of spots at a time when spots are independent.

    The heads work in float64 on the full embedding width, so one call on
    50,000 spots would hold ~1.5 GB of feature copies; blocks of
    ``chunk_spots`` read from the HDF5 cache keep that to a few hundred MB.
    Models with spatial context or smoothing need every spot at once and
    are called once.
    """
    import anndata as ad
    import h5py

    from virtualst.anndata_io import spatial_uns
    from virtualst.embed.cache import Embeddings, decode_strings, read_attrs

    if _spatially_coupled(predictor) or sample.n_spots <= chunk_spots:
        return predictor.predict(cache, sample)
    attrs = read_attrs(cache)
    bare = replace(sample, image=None)  # blocks skip the thumbnail, added once below
    parts = []
    with h5py.File(cache, "r") as f:
        barcodes = decode_strings(f["barcodes"][()])
        if not np.array_equal(barcodes, sample.barcodes):  # rows are written in spot order
            return predictor.predict(cache, sample)
        coords = np.asarray(f["coords"][()])
        for start in range(0, sample.n_spots, chunk_spots):
            rows = slice(start, start + chunk_spots)
            block = Embeddings(np.asarray(f["features"][rows]), coords[rows], barcodes[rows], attrs, cache)
            keep = np.zeros(sample.n_spots, dtype=bool)
            keep[rows] = True
            parts.append(predictor.predict(block, bare.subset(keep)))
    adata = ad.concat(parts, merge="same", uns_merge="first")
    if sample.image is not None:
        adata.uns["spatial"] = {sample.sample_id: spatial_uns(sample)}
    return adata


# --------------------------------------------------------------------- outputs
def predictions_table(adata: ad.AnnData) -> pd.DataFrame:
    """``barcode, x, y`` then one column per gene, from predictions."""
    table = pd.DataFrame(np.asarray(adata.X), columns=list(adata.var_names))
    spatial = np.asarray(adata.obsm["spatial"])
    table.insert(0, "barcode", adata.obs_names.to_numpy())
    table.insert(1, "x", spatial[:, 0])
    table.insert(2, "y", spatial[:, 1])
    return table


def write_outputs(adata: ad.AnnData, out_dir: Path, resolved: dict[str, Any]) -> tuple[Path, Path, Path]:
    """Write h5ad, CSV and settings JSON atomically; the h5ad goes last, as it marks a finished run."""
    csv = write_atomically(out_dir / CSV_NAME, lambda tmp: predictions_table(adata).to_csv(tmp, index=False, float_format="%.6g"))
    settings = write_atomically(out_dir / SETTINGS_NAME, lambda tmp: tmp.write_text(json.dumps(resolved, indent=2, default=str)))
    h5ad = write_h5ad_atomic(adata, out_dir / H5AD_NAME)
    return h5ad, csv, settings


def _annotate(adata: ad.AnnData, sample: Sample, tissue: TissueMask | None, resolved: dict[str, Any]) -> None:
    """Spot columns into ``obs``; grid, pixel size, tissue mask and settings into ``uns['virtualst']``."""
    spots = sample.spots.set_index(sample.spots["barcode"].astype(str)).drop(columns=["barcode", "x", "y"])
    for column in spots.columns:
        values = spots[column].reindex(adata.obs_names)
        adata.obs[column] = values.astype(str) if values.dtype == object else values.to_numpy()
    info = adata.uns.setdefault("virtualst", {})
    info.update({k: v for k, v in resolved.items() if v is not None and not isinstance(v, dict)})
    info["spot_diameter_um"] = float(sample.spot_diameter_um)
    info["settings_json"] = json.dumps(resolved, default=str)
    if tissue is not None:
        hires = adata.uns.get("spatial", {}).get(sample.sample_id, {}).get("images", {}).get("hires")
        shape = hires.shape[:2] if hires is not None else tissue.mask.shape
        info["tissue_mask"] = tissue.resized(shape)  # 1 = tissue, at the hires image's scale
        info["tissue_threshold"] = float(tissue.threshold)
        info["tissue_fraction"] = float(tissue.fraction)


def _tissue_of_measured(adata: ad.AnnData, sample: Sample, settings: TissueSettings) -> TissueMask | None:
    """Tissue of a measured sample, found on the hires image the predictions already carry (for maps only)."""
    library = adata.uns.get("spatial", {}).get(sample.sample_id, {})
    hires = library.get("images", {}).get("hires")
    if hires is None:
        return None
    mask, threshold = tissue_from_rgb(hires, settings)
    if not mask.any():
        warnings.warn(f"{sample.source or sample.sample_id}: no tissue found on the image; predictions carry no tissue mask", stacklevel=3)
        return None
    return TissueMask(mask=mask, scale=float(library["scalefactors"]["tissue_hires_scalef"]), threshold=threshold)


# ------------------------------------------------------------------------ main
def predict_slide(
    slide: str | Path | Sample,
    model: str | Path | GenePredictor,
    out_dir: str | Path,
    *,
    sample_id: str | None = None,
    grid: str = "visium",
    pitch_um: float | None = None,
    mpp: float | None = None,
    cache_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    cpu_replicas: int | None = None,
    weights: str | None = None,
    overwrite: bool = False,
    tissue_max_px: int = 2048,
    show_progress: bool = True,
    annotate: Callable[[ad.AnnData], Any] | None = None,
) -> SlidePrediction:
    """Predict spot-level gene expression over a slide and write the results.

    Parameters
    ----------
    slide
        A plain image (JPEG, PNG, TIFF, pyramidal WSI), a measured sample
        (any path :func:`virtualst.read` recognises), or a :class:`Sample`.
        Measured samples are predicted at their in-tissue spots; images on a
        virtual grid over the detected tissue.
    model
        Saved model directory, Hub repo id, or a fitted ``GenePredictor``.
    out_dir
        Output directory (created).
    sample_id
        Measured samples: which section to read when the path holds several
        (e.g. ``C5`` of a her2st directory). Images: the sample name
        (default: the file name without suffix).
    grid
        Virtual grid kind for images: ``visium`` (hexagonal, 55 µm spots,
        100 µm pitch), ``st`` (square, 100 µm spots, 200 µm pitch) or
        ``square`` (spots as wide as the pitch). Ignored for measured samples.
    pitch_um
        Centre-to-centre spot distance in µm overriding the grid's default.
    mpp
        µm per level-0 pixel of the slide. Required when the image metadata
        has none (JPEG/PNG); overrides the metadata (with a warning when they
        disagree).
    cache_dir
        Embedding cache root; default ``out_dir/cache``. A complete cache
        with the same settings is reused; an interrupted one resumed.
    device
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    batch_size
        Tiles per forward pass (default 16 on CPU, 256 on CUDA, halved on out-of-memory).
    num_workers
        Tile-reading processes (default: none on CPU, one per core up to 8 on CUDA).
    cpu_replicas
        Encoder processes sharing the cores on CPU (default: chosen, see
        :class:`~virtualst.embed.runner.EmbedSettings`).
    weights
        Local encoder weights replacing the configured source (they must be
        the weights the model was trained with).
    overwrite
        Replace an embedding cache made with other settings (e.g. another
        grid) instead of refusing.
    tissue_max_px
        Longest side of the thumbnail the tissue of an image is detected on
        (measured samples use the ``hires`` image of the predictions).
    show_progress
        Draw a progress bar while embedding.
    annotate
        Called on the predictions before the files are written (e.g. to add
        signature scores to ``obs``), so each file is written once.

    Returns
    -------
    SlidePrediction
        The AnnData and the paths written.

    Raises
    ------
    InputError
        Unreadable slide, no pixel size (pass ``mpp``), no tissue, a cache
        made with other settings, or a model/embedding mismatch.
    """
    from virtualst.embed.images import open_image
    from virtualst.embed.runner import embed_samples

    out_dir = Path(out_dir)
    get_grid(grid)  # an unknown grid fails before any work
    predictor = load_model(model)
    where = (slide.source or slide.sample_id) if isinstance(slide, Sample) else slide
    resolved: dict[str, Any] = {"slide": str(where), "model": str(getattr(predictor, "source_", "") or model), "version": __version__}
    spot_grid: SpotGrid | None = None

    if isinstance(slide, Sample) or _reads_as_sample(Path(slide)):
        sample, info = measured_sample(slide if isinstance(slide, Sample) else Path(slide), sample_id, mpp)
        if pitch_um is not None:
            warnings.warn(f"{sample.source or sample.sample_id}: measured spots are used; --pitch-um is ignored", stacklevel=2)
        tissue = None  # found after predicting, on the hires image
    else:
        image = open_image(slide)
        um_per_px, source = resolve_mpp(slide, image.mpp, mpp)
        tissue = detect_tissue(image, max_px=tissue_max_px)
        sample, spot_grid = virtual_sample(image, sample_id or Path(slide).stem, um_per_px, tissue, grid, pitch_um)
        info = {"grid": spot_grid.kind, "pitch_um": spot_grid.pitch_um, "mpp": um_per_px, "mpp_source": source}
    resolved.update(info, sample_id=sample.sample_id, n_spots=sample.n_spots, spot_diameter_um=float(sample.spot_diameter_um))

    settings = embed_settings_for(predictor, device, batch_size, num_workers, weights, overwrite, cpu_replicas)
    resolved["embedding"] = settings.to_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    (cache,) = embed_samples([sample], out_dir / "cache" if cache_dir is None else cache_dir, settings, show_progress=show_progress)
    adata = predict_spots(predictor, cache, sample)
    if spot_grid is None:
        tissue = _tissue_of_measured(adata, sample, TissueSettings(max_px=tissue_max_px))
    resolved["cache"] = str(cache)
    _annotate(adata, sample, tissue, resolved)
    if annotate is not None:
        annotate(adata)
    h5ad, csv, settings_path = write_outputs(adata, out_dir, resolved)
    return SlidePrediction(adata, h5ad, csv, settings_path, cache, sample, tissue, spot_grid, resolved)
