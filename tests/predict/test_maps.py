"""Gene maps, scatter plots, score maps and tissue overlays: content, geometry and the PNGs."""

from __future__ import annotations

import io
import os
import stat
from concurrent.futures import ThreadPoolExecutor

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import EllipseCollection, PathCollection, PolyCollection
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from PIL import Image

from virtualst.predict import maps
from virtualst.predict.maps import MapStyle, Reliability, SlideCanvas

#: Small PNGs keep the tests fast; geometry does not depend on dpi.
STYLE = MapStyle(dpi=40)
N_ROWS, N_COLS, PITCH_PX = 5, 6, 40.0


def texts(fig) -> list[str]:
    """Every text drawn on the figure (titles, header, legend, labels)."""
    return [t.get_text() for t in fig.findobj(Text)]


def spot_collections(fig) -> list[EllipseCollection]:
    """The colour-mapped spot layers (one per map panel)."""
    return [c for c in fig.findobj(EllipseCollection) if c.get_array() is not None]


@pytest.fixture
def adata() -> ad.AnnData:
    """30 spots on a 6 × 5 grid over a 100 × 140 thumbnail at half scale; genes of every reliability."""
    rng = np.random.default_rng(0)
    rows, cols = np.meshgrid(np.arange(N_ROWS), np.arange(N_COLS), indexing="ij")
    coords = np.column_stack([40 + cols.ravel() * PITCH_PX, 40 + rows.ravel() * PITCH_PX])  # level-0 px
    genes = ["GOOD", "BAD", "NOCV", "BEST", "WEAK"]
    measured = rng.normal(2.0, 1.0, size=(len(coords), len(genes)))
    predicted = 0.7 * measured + rng.normal(0, 0.5, size=measured.shape)
    var = pd.DataFrame(index=genes)
    var["cv_pearson"] = [0.41, 0.03, np.nan, 0.8, 0.2]
    var["reliable"] = var["cv_pearson"] >= 0.1
    a = ad.AnnData(X=predicted.astype(np.float32), obs=pd.DataFrame(index=[f"spot{i}" for i in range(len(coords))]), var=var)
    a.layers["measured"] = measured.astype(np.float32)
    a.obsm["spatial"] = coords.astype(np.float64)
    image = np.full((100, 140, 3), 235, dtype=np.uint8)
    image[20:80, 20:120] = (200, 120, 180)  # a pink "tissue" block
    a.uns["spatial"] = {"S1": {"images": {"hires": image}, "scalefactors": {"tissue_hires_scalef": 0.5, "spot_diameter_fullres": 20.0}}}
    a.uns["virtualst"] = {"sample_id": "S1", "um_per_px": 5.0, "normalization": "cpm-log1p", "reliable_pearson": 0.1}
    return a


@pytest.fixture
def canvas(adata) -> SlideCanvas:
    return SlideCanvas.from_anndata(adata)


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


# ------------------------------------------------------------------ reliability
def test_reliability_labels():
    assert Reliability(0.41, 0.1).status == "reliable" and Reliability(0.41, 0.1).banner == ""
    bad = Reliability(0.03, 0.1)
    assert bad.status == "unreliable" and bad.banner == "UNRELIABLE: CV r 0.03 < 0.10" and bad.label == "CV r = 0.03"
    for unknown in (Reliability(None, 0.1), Reliability(float("nan"), 0.1)):
        assert unknown.status == "unknown" and "n/a" in unknown.label and "UNKNOWN" in unknown.banner


# ------------------------------------------------------------------ gene maps
def test_gene_map_pngs_decode_at_expected_size(adata, canvas):
    single = maps.gene_map(canvas, adata.X[:, 0], "GOOD", cv_pearson=0.41, style=STYLE)
    assert png_size(single) == STYLE.pixel_size(1)
    pair = maps.gene_map(canvas, adata.X[:, 0], "GOOD", measured=adata.layers["measured"][:, 0], cv_pearson=0.41, style=STYLE)
    assert png_size(pair) == STYLE.pixel_size(2)


def test_reliable_gene_shows_cv_and_r(adata, canvas):
    pred, meas = adata.X[:, 0], adata.layers["measured"][:, 0]
    fig = maps.gene_map_figure(canvas, pred, "GOOD", measured=meas, cv_pearson=0.41, reliable_pearson=0.1, style=STYLE)
    drawn = " | ".join(texts(fig))
    assert "GOOD" in drawn and "CV r = 0.41" in drawn
    assert f"r(measured, predicted) = {np.corrcoef(meas, pred)[0, 1]:.2f}" in drawn
    assert "UNRELIABLE" not in drawn and "UNKNOWN" not in drawn
    assert {c.get_cmap().name for c in spot_collections(fig)} == {STYLE.cmap}


def test_unreliable_gene_is_flagged(adata, canvas):
    fig = maps.gene_map_figure(canvas, adata.X[:, 1], "BAD", measured=adata.layers["measured"][:, 1], cv_pearson=0.03, style=STYLE)
    assert "UNRELIABLE: CV r 0.03 < 0.10" in texts(fig)
    assert {c.get_cmap().name for c in spot_collections(fig)} == {STYLE.unreliable_cmap}  # greyed out
    frames = [p for p in fig.findobj(Rectangle) if p.get_edgecolor()[:3] == pytest.approx((0.75, 0.0, 0.0), abs=0.01) and p.get_hatch()]
    assert frames, "the predicted panel carries the hatched red overlay"


def test_gene_without_cv_says_so(adata, canvas):
    fig = maps.gene_map_figure(canvas, adata.X[:, 2], "NOCV", cv_pearson=float("nan"), style=STYLE)
    drawn = " | ".join(texts(fig))
    assert "CV r = n/a" in drawn and "RELIABILITY UNKNOWN" in drawn and "UNRELIABLE" not in drawn


def test_measured_and_predicted_share_one_colour_scale(adata, canvas):
    pred, meas = adata.X[:, 3].astype(np.float64), adata.layers["measured"][:, 3].astype(np.float64) + 3.0
    fig = maps.gene_map_figure(canvas, pred, "BEST", measured=meas, cv_pearson=0.8, style=STYLE)
    layers = spot_collections(fig)
    assert len(layers) == 2
    expected = np.percentile(np.concatenate([meas, pred]), [1, 99])
    for layer in layers:
        assert (layer.norm.vmin, layer.norm.vmax) == pytest.approx(tuple(expected))
    assert layers[0].norm is layers[1].norm
    np.testing.assert_allclose(layers[0].get_array(), meas)  # measured on the left
    np.testing.assert_allclose(layers[1].get_array(), pred)
    assert len(fig.axes) == 3  # two maps, ONE colour bar


def test_spots_have_true_diameter_and_position(canvas):
    fig = maps.gene_map_figure(canvas, np.arange(canvas.n_spots, dtype=float), "G", style=STYLE)
    (layer,) = spot_collections(fig)
    assert canvas.diameter == pytest.approx(20.0 * 0.5)
    np.testing.assert_allclose(layer.get_widths(), canvas.diameter)
    np.testing.assert_allclose(layer.get_offsets(), canvas.coords_px * 0.5)


def test_rendered_spot_colours_sit_on_the_spots(canvas):
    values = np.zeros(canvas.n_spots)
    values[7] = 10.0  # one bright spot; 1st-99th percentile limits clip it to the top colour
    fig = maps.gene_map_figure(canvas, values, "G", style=MapStyle(dpi=80))
    image = np.asarray(Image.open(io.BytesIO(maps.render_png(fig))).convert("RGB"), dtype=float) / 255
    ax = spot_collections(fig)[0].axes
    assert ax.yaxis_inverted(), "image rows run downwards, as in the slide"
    height = image.shape[0]

    def pixel(i: int) -> np.ndarray:
        x, y = ax.transData.transform(canvas.xy[i])
        return image[int(round(height - y)), int(round(x))]

    cmap = matplotlib.colormaps[STYLE.cmap]
    behind = image[0, 0]  # the background around the spot barely matters at 90% opacity
    top, bottom = np.array(cmap(1.0)[:3]), np.array(cmap(0.0)[:3])
    assert np.abs(pixel(7) - (0.9 * top + 0.1 * behind)).max() < 0.12
    assert np.abs(pixel(8) - (0.9 * bottom + 0.1 * behind)).max() < 0.12


def test_wrong_lengths_are_rejected(canvas):
    with pytest.raises(ValueError, match="predicted has 3 values"):
        maps.gene_map_figure(canvas, [1.0, 2.0, 3.0], "G")


# ------------------------------------------------------------------ scatter
def test_scatter_small_and_hexbin(adata):
    meas, pred = adata.layers["measured"][:, 0], adata.X[:, 0]
    fig = maps.scatter_figure(meas, pred, "GOOD", cv_pearson=0.41, units="u", style=STYLE)
    drawn = texts(fig)
    assert f"r = {np.corrcoef(meas, pred)[0, 1]:.2f}" in " ".join(drawn) and "CV r = 0.41" in " ".join(drawn)
    ax = fig.axes[0]
    assert any(isinstance(c, PathCollection) for c in ax.collections)
    identity = [line for line in ax.get_lines() if line.get_label() == "y = x"]
    assert identity and np.allclose(identity[0].get_xdata(), identity[0].get_ydata())
    assert png_size(maps.render_png(fig)) == STYLE.pixel_size(1)

    rng = np.random.default_rng(1)
    many = rng.normal(size=STYLE.hexbin_above + 1)
    fig = maps.scatter_figure(many, many + rng.normal(size=many.size), "X", cv_pearson=0.03, style=STYLE)
    assert any(isinstance(c, PolyCollection) for c in fig.axes[0].collections)
    assert "UNRELIABLE: CV r 0.03 < 0.10" in texts(fig)


# ------------------------------------------------------------------ score maps
def test_score_map_outlines_hot_and_cold_distinctly(canvas):
    from virtualst.predict.hotspots import hotspots

    labels = np.full(canvas.n_spots, "", dtype=object)
    labels[[0, 1, 2]] = "hot"
    labels[[20, 21]] = "cold"
    table = pd.DataFrame({"hotspot": labels})
    table.attrs.update({"radius_um": 150.0, "fdr": 0.05})
    fig = maps.score_map_figure(canvas, np.linspace(-2, 2, canvas.n_spots), "ERBB2 amplicon", table, subtitle="5 of 8 genes used", style=STYLE)
    rings = [c for c in fig.findobj(EllipseCollection) if c.get_array() is None]
    by_colour = {matplotlib.colors.to_hex(c.get_edgecolor()[0]): len(c.get_offsets()) for c in rings}
    assert by_colour == {STYLE.hot_colour: 3, STYLE.cold_colour: 2}
    drawn = " | ".join(texts(fig))
    assert "hot (3)" in drawn and "cold (2)" in drawn and "radius 150 µm, FDR 5%" in drawn and "5 of 8 genes used" in drawn
    (fill,) = spot_collections(fig)
    assert fill.norm.vmin == pytest.approx(-fill.norm.vmax)  # diverging, centred on 0
    assert png_size(maps.render_png(fig)) == STYLE.pixel_size(1)
    # the real hotspot table works as input too
    real = hotspots(np.linspace(-2, 2, canvas.n_spots), canvas.coords_px)
    maps.score_map_figure(canvas, np.linspace(-2, 2, canvas.n_spots), "s", real, style=STYLE)


# ------------------------------------------------------------------ tissue mask
def test_tissue_mask_overlay(adata, canvas):
    image = adata.uns["spatial"]["S1"]["images"]["hires"]
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    mask[20:80, 20:120] = 1
    data = maps.tissue_mask_map(image, mask, canvas=canvas, style=STYLE)
    assert png_size(data) == STYLE.pixel_size(1)
    fig = maps.tissue_mask_figure(image, mask[::2, ::2].astype(bool), style=STYLE)  # half size: resampled
    assert f"tissue covers {mask.mean():.0%} of the image" in texts(fig)
    with pytest.raises(ValueError, match="does not match"):
        maps.tissue_mask_figure(image, np.ones((100, 50), dtype=bool))
    with pytest.raises(ValueError, match="2-D"):
        maps.tissue_mask_figure(image, np.ones((100, 140, 3), dtype=bool))


# ------------------------------------------------------------------ AnnData bridge
def test_gene_maps_picks_best_genes_and_writes_files(adata, tmp_path):
    out = maps.gene_maps(adata, out_dir=tmp_path, top=2, style=STYLE)
    assert list(out) == ["BEST", "GOOD"]
    for gene, path in out.items():
        assert path == tmp_path / f"{gene}.png" and png_size(path.read_bytes()) == STYLE.pixel_size(2)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BEST.png", "GOOD.png"]  # no temp files left


def test_gene_maps_bytes_and_explicit_genes(adata):
    out = maps.gene_maps(adata, genes=["BAD", "NOCV"], style=STYLE)
    assert set(out) == {"BAD", "NOCV"} and all(isinstance(v, bytes) for v in out.values())
    with pytest.raises(KeyError, match="NOPE"):
        maps.gene_maps(adata, genes=["NOPE"])


def test_gene_maps_without_spatial_or_measured(adata):
    del adata.uns["spatial"]
    del adata.layers["measured"]
    canvas = SlideCanvas.from_anndata(adata)
    assert canvas.image is None and canvas.scalef == 1.0
    assert canvas.spot_diameter_px == pytest.approx(0.5 * PITCH_PX)  # half the pitch when unknown
    out = maps.gene_maps(adata, genes=["GOOD"], style=STYLE)
    assert png_size(out["GOOD"]) == STYLE.pixel_size(1)
    assert maps.gene_scatters(adata) == {}


def test_gene_scatters_and_score_maps(adata, tmp_path):
    out = maps.gene_scatters(adata, genes=["GOOD"], out_dir=tmp_path, style=STYLE)
    assert out == {"GOOD": tmp_path / "GOOD_scatter.png"}
    scores = pd.DataFrame({"sig/one": np.linspace(-1, 1, adata.n_obs)}, index=adata.obs_names)
    report = pd.DataFrame({"n_genes": [3], "n_genes_used": [2]}, index=["sig/one"])
    written = maps.score_maps(adata, scores, report=report, out_dir=tmp_path, style=STYLE)
    assert written == {"sig/one": tmp_path / "sig_one_score.png"} and written["sig/one"].is_file()
    fig_bytes = maps.score_maps(adata, scores, style=STYLE)["sig/one"]
    assert png_size(fig_bytes) == STYLE.pixel_size(1)


def test_library_selection(adata):
    adata.uns["spatial"]["OTHER"] = {"images": {}, "scalefactors": {}}
    assert SlideCanvas.from_anndata(adata).image is not None  # sample_id S1 chosen
    assert SlideCanvas.from_anndata(adata, library_id="OTHER").image is None
    adata.uns["virtualst"]["sample_id"] = "ZZZ"
    with pytest.raises(ValueError, match="library_id"):
        SlideCanvas.from_anndata(adata)


def test_units_and_gene_selection_without_cv(adata):
    assert maps.units_label(adata) == "log1p(counts per 10k)"
    del adata.var["cv_pearson"]
    assert maps.select_genes(adata, top=2) == ["GOOD", "BAD"]


def test_parallel_rendering_leaks_no_pyplot_figures(adata, canvas):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    with ThreadPoolExecutor(max_workers=4) as pool:
        pngs = list(pool.map(lambda j: maps.gene_map(canvas, adata.X[:, j], f"G{j}", style=STYLE), range(5)))
    assert all(png_size(p) == STYLE.pixel_size(1) for p in pngs)
    assert plt.get_fignums() == before


def test_robust_limits_and_pearson():
    assert maps.robust_limits(np.full(5, 2.0))[0] < 2.0 < maps.robust_limits(np.full(5, 2.0))[1]
    assert maps.robust_limits(np.array([np.nan])) == (0.0, 1.0)
    assert np.isnan(maps.pearson([1, 1, 1], [1, 2, 3]))
    assert maps.pearson([1, 2, np.nan, 4], [2, 4, 5, 8]) == pytest.approx(1.0)
