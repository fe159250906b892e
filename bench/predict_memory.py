"""Peak memory and speed of whole-slide prediction on a large generated slide.

Run ``python -m virtualst.bench.predict_memory [--spots 50000] [--out DIR]``. It

1. writes a pyramidal, tiled, JPEG-compressed TIFF with resolution tags
   (so the pixel size comes from the metadata), H&E-like colours and a
   rounded block of tissue big enough for ``--spots`` Visium-grid spots
   (50,000 spots: ~4.3 cm² of tissue, a ~47k x 47k px image at
   0.5 µm/px), tile by tile so that generating it stays small in memory;
2. fits a tiny ridge :class:`~virtualst.heads.predictor.GenePredictor`
   (50 genes) on a small synthetic section with the default encoder;
3. runs :func:`virtualst.predict.slide.predict_slide` in a fresh process
   and reports its peak resident memory (``ru_maxrss`` and RSS sampled
   every 0.2 s) and end-to-end tiles per second.

Target: peak RSS below 2 GB at 50,000 spots.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import queue
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from virtualst.sample import Sample

TILE = 256
#: Visium spots per µm² of tissue: one per pitch² * sqrt(3) / 2.
SPOT_AREA_UM2 = 100.0**2 * math.sqrt(3) / 2
#: Tissue is the superellipse |u|^4 + |v|^4 <= 1 inside this fraction of each side.
TISSUE_SPAN = 0.94
SUPERELLIPSE_AREA = 4 * math.gamma(1.25) ** 2 / math.gamma(1.5) / 4  # of its bounding square
GLASS = np.array([244, 242, 246], dtype=np.uint8)
TARGET_PEAK_GB = 2.0


# ------------------------------------------------------------------ the slide
def slide_side_px(spots: int, mpp: float, slack: float = 1.04) -> int:
    """Side (px) of a square slide whose tissue holds about ``spots * slack`` Visium spots."""
    tissue_um2 = spots * slack * SPOT_AREA_UM2
    side_um = math.sqrt(tissue_um2 / (SUPERELLIPSE_AREA * TISSUE_SPAN**2))
    return max(TILE, math.ceil(side_um / mpp))


def _smooth_noise(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Periodic Gaussian-filtered noise scaled to unit standard deviation."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.normal(size=(TILE, TILE)), sigma, mode="wrap")
    return (field - field.mean()) / field.std()


def texture_bank(n: int = 16, seed: int = 0) -> np.ndarray:
    """``n`` H&E-like 256 px textures: pink stroma, purple nuclei, some white lumina; varied densities."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    pink, purple, white = np.array([235, 165, 205.0]), np.array([105, 50, 145.0]), np.array([246, 240, 246.0])
    bank = np.empty((n, TILE, TILE, 3), dtype=np.uint8)
    sigma = 2.5  # nuclei ~3 µm in radius at 0.5 µm/px
    for i in range(n):
        mix = np.clip(0.2 + 0.12 * _smooth_noise(rng, 6), 0, 1)  # eosin to haematoxylin balance
        rgb = pink + mix[..., None] * (purple - pink)
        points = np.zeros((TILE, TILE))
        count = rng.poisson(30 + 40 * (i % 4))
        points[rng.integers(0, TILE, count), rng.integers(0, TILE, count)] = 2 * np.pi * sigma**2
        nuclei = ndimage.gaussian_filter(points, sigma, mode="wrap") > 0.5
        rgb[nuclei] = purple * 0.85
        rgb[_smooth_noise(rng, 14) > 1.2 + 0.3 * (i % 3)] = white
        bank[i] = np.clip(rgb + rng.normal(0, 4, size=rgb.shape), 0, 255).astype(np.uint8)
    return bank


class SlideRenderer:
    """Pixels of the generated slide, one pyramid tile at a time (never the whole level)."""

    def __init__(self, side: int, seed: int = 0) -> None:
        self.side = side
        self.bank = texture_bank(seed=seed)
        self._banks = {0: self.bank}
        rng = np.random.default_rng(seed + 1)
        n_base = math.ceil(side / TILE)
        self.pattern = rng.integers(0, len(self.bank), size=(n_base, n_base))

    def _bank(self, level: int) -> np.ndarray:
        """Textures shrunk to ``TILE / 2**level`` px (at least 1)."""
        if level not in self._banks:
            from PIL import Image

            size = max(1, TILE >> level)
            self._banks[level] = np.stack([np.asarray(Image.fromarray(t).resize((size, size), Image.Resampling.BOX)) for t in self.bank])
        return self._banks[level]

    def tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        """The ``(TILE, TILE, 3)`` tile at row ``ty``, column ``tx`` of ``level`` (downsample ``2**level``)."""
        factor = 2**level
        if factor > TILE:
            raise ValueError(f"level {level} is coarser than one pixel per texture")
        small = self._bank(level)
        size = small.shape[1]
        per_tile = factor  # base tiles along one side of this tile
        i0, j0 = ty * per_tile, tx * per_tile
        idx = np.zeros((per_tile, per_tile), dtype=np.int64)
        rows = self.pattern[i0 : i0 + per_tile, j0 : j0 + per_tile]
        idx[: rows.shape[0], : rows.shape[1]] = rows
        out = small[idx].transpose(0, 2, 1, 3, 4).reshape(per_tile * size, per_tile * size, 3)
        # Tissue outline: a superellipse, evaluated at the level-0 position of every pixel.
        coords = ((np.arange(TILE) + 0.5) * factor + np.array([[ty], [tx]]) * TILE * factor) / self.side * 2 - 1
        v, u = (coords / TISSUE_SPAN) ** 4
        glass = u[None, :] + v[:, None] > 1
        if glass.any():
            out = out.copy()
            out[glass] = GLASS
        return out

    def tiles(self, level: int) -> Iterator[np.ndarray]:
        """Every tile of ``level`` in row-major order, as tifffile expects."""
        n = math.ceil(math.ceil(self.side / 2**level) / TILE)
        for ty in range(n):
            for tx in range(n):
                yield self.tile(level, ty, tx)


def write_slide(path: Path, side: int, mpp: float, quality: int = 85, show_progress: bool = True) -> Path:
    """Write the generated slide as a pyramidal tiled TIFF (JPEG tiles, resolution in pixels per cm)."""
    import tifffile
    from tqdm.auto import tqdm

    renderer = SlideRenderer(side)
    levels = max(0, math.ceil(math.log2(side / 1024)))  # down to a level <= 1024 px
    sizes = [math.ceil(side / 2**k) for k in range(levels + 1)]
    total = sum(math.ceil(s / TILE) ** 2 for s in sizes)
    options = {
        "tile": (TILE, TILE),
        "dtype": np.uint8,
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": quality},
        "resolutionunit": "CENTIMETER",
    }
    tmp = path.with_name(path.name + ".partial")
    with tqdm(total=total, unit="tile", desc=f"write {side}x{side} slide", disable=not show_progress) as bar:

        def counted(level: int) -> Iterator[np.ndarray]:
            for tile in renderer.tiles(level):
                bar.update()
                yield tile

        with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            for level, size in enumerate(sizes):
                pixels_per_cm = 1e4 / (mpp * 2**level)
                extra = {"subifds": levels} if level == 0 else {"subfiletype": 1}
                tif.write(counted(level), shape=(size, size, 3), resolution=(pixels_per_cm, pixels_per_cm), **options, **extra)
    tmp.replace(path)  # a killed run never leaves a valid-looking slide
    return path


# ------------------------------------------------------------------ the model
def tiny_model(directory: Path, tile_px: int, n_genes: int = 50, show_progress: bool = True) -> Path:
    """Fit and save a ridge GenePredictor on a 8x8-spot synthetic section rendered like the slide."""
    import pandas as pd
    import scipy.sparse as sp
    from PIL import Image

    from virtualst.embed.images import open_image
    from virtualst.embed.runner import EmbedSettings, embed_samples
    from virtualst.embed.tiling import TileSpec
    from virtualst.heads.predictor import GenePredictor
    from virtualst.heads.targets import TargetSpec
    from virtualst.sample import Sample

    renderer = SlideRenderer(side=8 * TILE, seed=7)
    rgb = np.concatenate([np.concatenate([renderer.bank[renderer.pattern[i, j]] for j in range(8)], axis=1) for i in range(8)], axis=0)
    path = directory / "train.png"
    Image.fromarray(rgb).save(path)
    centres = (np.arange(8) + 0.5) * TILE
    xs, ys = np.meshgrid(centres, centres)
    spots = pd.DataFrame({"barcode": [f"s{i}" for i in range(64)], "x": xs.ravel(), "y": ys.ravel(), "in_tissue": True})
    rng = np.random.default_rng(0)
    darkness = np.array([255 - rgb[int(y) - 64 : int(y) + 64, int(x) - 64 : int(x) + 64].mean() for x, y in zip(spots.x, spots.y)])
    rates = np.exp(1 + rng.normal(size=n_genes) * (darkness[:, None] - darkness.mean()) / 20 + rng.normal(0, 0.3, size=(64, n_genes)))
    sample = Sample(
        "bench-train",
        spots,
        0.5,
        55.0,
        image=open_image(path),
        counts=sp.csr_matrix(rng.poisson(rates)),
        genes=np.array([f"GENE{i}" for i in range(n_genes)]),
        patient_id="P1",
        source=path,
    )
    settings = EmbedSettings(tile=TileSpec(px=tile_px), batch_size=16, cpu_replicas=1)
    (cache,) = embed_samples([sample], directory / "train-cache", settings, show_progress=show_progress)
    model = GenePredictor(head="ridge", target=TargetSpec("log1p", f"hvg:{n_genes}")).fit([cache], [sample])
    return model.save_pretrained(directory / "model")


# ---------------------------------------------------------------- measurement
def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """``ru_maxrss`` of this process (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


class RssSampler:
    """Poll this process's RSS in a thread; keeps the maximum."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def _child(func, args: tuple, results) -> None:
    """In a fresh process: run ``func(*args)`` and report its value, time and memory."""
    start_rss = rss_bytes()
    with RssSampler() as sampler:
        start = time.perf_counter()
        value = func(*args)
        seconds = time.perf_counter() - start
    results.put(
        {
            "value": value,
            "seconds": seconds,
            "peak_rss_gb": peak_rss_bytes() / 1e9,
            "sampled_peak_rss_gb": sampler.peak / 1e9,
            "rss_at_start_gb": start_rss / 1e9,
        }
    )


def in_child(func, *args) -> dict:
    """Run ``func(*args)`` in a fresh process: each phase gets its own, clean peak RSS.

    On Linux ``ru_maxrss`` survives ``fork`` and ``exec``: a child spawned
    from a large process reports (at least) that process's peak. Children of
    multiprocessing's fork server instead start from the server's own small
    footprint, so the figure stays clean whatever the caller holds (measured:
    a parent holding 1.5 GB gave spawned children a 1.5 GB ``ru_maxrss``,
    fork-server children 0.03 GB). Where there is no fork server, spawn.
    """
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    results = context.Queue()
    child = context.Process(target=_child, args=(func, args, results))
    child.start()
    while True:  # read before join (a full queue blocks the child's exit); stop if the child dies
        try:
            report = results.get(timeout=1.0)
            break
        except queue.Empty:
            if not child.is_alive():
                raise RuntimeError(f"{func.__name__} failed in its process (exit code {child.exitcode})") from None
    child.join()
    return report


def predict(slide: Path, model: Path, out: Path, options: dict) -> dict:
    """Predict the slide; returns sizes of what was predicted and written."""
    from virtualst.predict.slide import predict_slide

    result = predict_slide(slide, model, out, **options)
    return {
        "n_spots": int(result.adata.n_obs),
        "n_genes": int(result.adata.n_vars),
        "h5ad_mb": result.h5ad.stat().st_size / 1e6,
        "csv_mb": result.csv.stat().st_size / 1e6,
    }


def ensure_slide(work: Path, spots: int, mpp: float = 0.5, show_progress: bool = False) -> tuple[Path, dict]:
    """The generated slide for ``spots`` under ``work``, written in a child process unless already there.

    Returns the path and the writing child's report (empty when the slide was reused).
    """
    side = slide_side_px(spots, mpp)
    slide = Path(work) / f"slide_{side}px.tif"
    if slide.exists():  # reused between runs: 50k spots' worth takes minutes to write
        return slide, {}
    return slide, in_child(write_slide, slide, side, mpp, 85, show_progress)


def grid_sample(slide: Path) -> Sample:
    """The spots ``virtualst predict`` would place on ``slide``: tissue detection, hexagonal 100 µm Visium grid."""
    from virtualst.embed.images import open_image
    from virtualst.predict.slide import detect_tissue, resolve_mpp, virtual_sample

    image = open_image(slide)
    um_per_px, _ = resolve_mpp(slide, image.mpp, None)
    sample, _ = virtual_sample(image, Path(slide).stem, um_per_px, detect_tissue(image), "visium", None)
    return sample


def embed_slide(slide: Path, cache: Path, tile_px: int, options: dict) -> dict:
    """Embed the Visium-grid spots over the tissue of ``slide`` (default encoder); returns what was embedded.

    The spots are :func:`grid_sample`'s; ``options`` go to :class:`~virtualst.embed.runner.EmbedSettings`
    (``device``, ``batch_size``, ``num_workers``) except ``show_progress``. The encoder
    runs in this one process (``cpu_replicas=1``), so its peak RSS is the whole run's.
    """
    from virtualst.embed.runner import EmbedSettings, embed_samples
    from virtualst.embed.tiling import TileSpec

    options = dict(options)
    show = options.pop("show_progress", False)
    sample = grid_sample(slide)
    settings = EmbedSettings(tile=TileSpec(px=tile_px), cpu_replicas=1, **options)
    (path,) = embed_samples([sample], cache, settings, show_progress=show)
    return {"n_spots": int(sample.n_spots), "cache_mb": path.stat().st_size / 1e6}


def embedding_memory(
    spots: int = 50_000,
    tile_px: int = 224,
    work: Path | None = None,
    mpp: float = 0.5,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    show_progress: bool = False,
) -> dict:
    """Peak RSS of embedding a generated ``spots``-spot slide, measured in a fresh process.

    The slide is written (or reused) under ``work`` (default: a temporary
    folder, removed); the embedding runs from a cold cache in a fresh child (:func:`in_child`),
    so nothing the caller holds counts towards its peak.

    Returns
    -------
    dict
        ``n_spots``, ``seconds``, ``tiles_per_s``, ``peak_rss_gb`` (``ru_maxrss``
        of the child), ``sampled_peak_rss_gb``, ``rss_at_start_gb``, ``slide_px``,
        ``slide_gb``, ``generate_s`` (``None`` when reused), ``tile_px`` and
        ``target_peak_rss_gb``.
    """
    folder = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="vst-embed-memory-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        slide, generated = ensure_slide(folder, spots, mpp, show_progress)
        cache = folder / "embed-cache"
        shutil.rmtree(cache, ignore_errors=True)  # a cold run: no cache to reuse
        options = {"device": device, "batch_size": batch_size, "num_workers": num_workers, "show_progress": show_progress}
        run = in_child(embed_slide, slide, cache, tile_px, options)
        shutil.rmtree(cache, ignore_errors=True)
        report = {**run.pop("value"), **run}
        report.update(
            tiles_per_s=report["n_spots"] / report["seconds"],
            slide_px=slide_side_px(spots, mpp),
            slide_gb=slide.stat().st_size / 1e9,
            generate_s=generated.get("seconds"),
            tile_px=tile_px,
            target_peak_rss_gb=TARGET_PEAK_GB,
        )
        return report
    finally:
        if work is None:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m virtualst.bench.predict_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=50_000, help="Visium-grid spots wanted on tissue (default 50000)")
    parser.add_argument("--out", type=Path, default=None, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--mpp", type=float, default=0.5, help="µm per pixel written in the slide's metadata")
    parser.add_argument("--tile-px", type=int, default=224, help="tile side in pixels for the model (112 µm tiles)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    work = args.out or Path(tempfile.mkdtemp(prefix="vst-predict-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    show = not args.quiet
    try:
        side = slide_side_px(args.spots, args.mpp)
        slide, generated = ensure_slide(work, args.spots, args.mpp, show)
        model = work / "model"
        if not (model / "config.json").exists():
            in_child(tiny_model, work, args.tile_px, 50, show)
        out = work / "prediction"
        shutil.rmtree(out, ignore_errors=True)  # a cold run: no cache to reuse
        # One encoder process, so the child's peak RSS is the whole run's.
        options = {
            "device": args.device, "batch_size": args.batch_size, "num_workers": args.num_workers, "cpu_replicas": 1, "show_progress": show,
        }
        run = in_child(predict, slide, model, out, options)
        report = {
            **run.pop("value"),
            **run,
            "tiles_per_s": 0.0,
            "slide": str(slide),
            "slide_px": side,
            "slide_gb": slide.stat().st_size / 1e9,
            "generate_s": generated.get("seconds"),
            "generate_peak_rss_gb": generated.get("peak_rss_gb"),
            "tile_px": args.tile_px,
            "mpp": args.mpp,
            "cpus": os.cpu_count(),
            "target_peak_rss_gb": TARGET_PEAK_GB,
        }
        report["tiles_per_s"] = report["n_spots"] / report["seconds"]
        (work / "predict_memory.json").write_text(json.dumps(report, indent=2))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"{report['n_spots']} spots x {report['n_genes']} genes on a {side}x{side} px slide ({report['slide_gb']:.2f} GB): "
        f"{report['seconds']:.0f} s, {report['tiles_per_s']:.1f} tiles/s; peak RSS {report['peak_rss_gb']:.2f} GB "
        f"(sampled {report['sampled_peak_rss_gb']:.2f} GB; target < {TARGET_PEAK_GB:g} GB)"
    )
    return report


if __name__ == "__main__":  # pragma: no cover
    main()
