"""A single self-contained HTML report of a virtual ST prediction.

The page is written for the pathologist who reads it: the slide, what the
model is and how well it did in cross-validation, the best-predicted gene
maps (unreliable genes flagged), signature hotspots with their gene-set
citation, and the caveats. Every image is inlined as a PNG ``data:`` URI and
the CSS is inline; there are no scripts, fonts or links to anything outside
the file, and a Content-Security-Policy forbids them, so the report opens
offline, can be mailed or archived, and never contacts a server.

The content is described by plain dataclasses holding PNG bytes and tables,
so this module does not depend on how figures are drawn (see
:mod:`virtualst.predict.maps`) or hotspots found (:mod:`virtualst.predict.hotspots`).
All text is escaped by Jinja2's autoescaping.

Examples
--------
>>> report = Report(slide_name="A1", gene_maps=[ReportFigure.for_gene("ERBB2", png, cv_pearson=0.41)])  # doctest: +SKIP
>>> write_report(report, "out/report.html")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from virtualst._version import __version__
from virtualst.files import write_text_atomically

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEMPLATE = "report.html"
#: Flag that marks a gene the model cannot predict reliably (drawn as a red badge).
UNRELIABLE = "unreliable"
#: Nothing but inline styles and ``data:`` images may load (no scripts, fonts, frames or requests).
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
DISCLAIMER = (
    "Expression values in this report are predicted from the H&E image by a statistical model; "
    "they were not measured. For research use only, not for diagnosis."
)


# ----------------------------------------------------------------------------- content
@dataclass
class ReportFigure:
    """One PNG figure with a title, a caption and flags shown as badges.

    Parameters
    ----------
    title
        Heading above the figure (e.g. the gene name).
    png
        The PNG file's bytes.
    caption
        Text under the figure.
    flags
        Short labels drawn as badges; :data:`UNRELIABLE` is drawn in red and
        frames the figure in red.
    alt
        Alternative text (default: the title).
    """

    title: str
    png: bytes
    caption: str = ""
    flags: tuple[str, ...] = ()
    alt: str = ""

    def __post_init__(self) -> None:
        self.png = bytes(self.png)
        if not self.png.startswith(PNG_SIGNATURE):
            raise ValueError(f"figure {self.title!r}: png must hold the bytes of a PNG file")
        self.flags = tuple(str(f) for f in self.flags)

    @property
    def data_uri(self) -> str:
        """The image as a ``data:image/png;base64,...`` URI."""
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    @property
    def unreliable(self) -> bool:
        """Whether the figure carries the :data:`UNRELIABLE` flag."""
        return UNRELIABLE in self.flags

    @classmethod
    def for_gene(
        cls, gene: str, png: bytes, cv_pearson: float | None = None, reliable_pearson: float = 0.1, caption: str = ""
    ) -> ReportFigure:
        """A gene map whose caption states its cross-validated Pearson and whose flag says when it is unreliable.

        A gene without a CV value is flagged ``"reliability unknown"``.
        """
        known = cv_pearson is not None and math.isfinite(cv_pearson)
        if not known:
            flags, text = ("reliability unknown",), "CV r = n/a"
        elif cv_pearson < reliable_pearson:
            flags, text = (UNRELIABLE,), f"CV r = {cv_pearson:.2f} (below {reliable_pearson:.2f})"
        else:
            flags, text = (), f"CV r = {cv_pearson:.2f}"
        return cls(gene, png, f"{text}. {caption}".strip() if caption else text, flags)

    @classmethod
    def from_array(cls, title: str, rgb: np.ndarray, caption: str = "", max_px: int | None = 1200) -> ReportFigure:
        """A figure from an RGB(A) uint8 array (e.g. a slide thumbnail), shrunk to ``max_px`` on its long side."""
        from PIL import Image

        image = Image.fromarray(np.asarray(rgb))
        if max_px and max(image.size) > max_px:
            image.thumbnail((max_px, max_px))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        return cls(title, buffer.getvalue(), caption)


@dataclass
class ReportTable:
    """A table, shown with at most ``max_rows`` rows.

    Parameters
    ----------
    title
        Heading above the table (may be empty).
    data
        A DataFrame, or rows as mappings (column -> value).
    note
        Text under the table (e.g. what the columns mean).
    max_rows
        Rows shown (the first ones; order the data first); ``None``: all.
    show_index
        Show the DataFrame index as the first column; ``None``: when it is
        named or not a plain 0..n-1 range.
    formats
        Column -> format spec (``"{:.2f}"``) overriding the default number formatting.
    """

    title: str
    data: pd.DataFrame | Sequence[Mapping[str, Any]]
    note: str = ""
    max_rows: int | None = 20
    show_index: bool | None = None
    formats: dict[str, str] = field(default_factory=dict)

    def frame(self) -> pd.DataFrame:
        """The data as a DataFrame (index shown as a column when it should be)."""
        frame = self.data if isinstance(self.data, pd.DataFrame) else pd.DataFrame(list(self.data))
        show = self.show_index
        if show is None:
            plain = isinstance(frame.index, pd.RangeIndex) and frame.index.start == 0 and frame.index.step == 1
            show = frame.index.name is not None or not plain
        if show:
            name = frame.index.name if frame.index.name is not None else ""
            frame = frame.reset_index(names=[str(name)] if frame.index.nlevels == 1 else None)
        return frame

    @property
    def n_rows(self) -> int:
        """Rows in the data (shown or not)."""
        return len(self.frame())

    def header(self) -> list[str]:
        """Column names as shown."""
        return [str(c) for c in self.frame().columns]

    def body(self) -> list[list[tuple[str, bool]]]:
        """Shown rows as ``(text, is_number)`` cells."""
        frame = self.frame()
        if self.max_rows is not None:
            frame = frame.head(self.max_rows)
        rows = []
        for record in frame.itertuples(index=False, name=None):
            rows.append([_cell(value, self.formats.get(str(col))) for col, value in zip(frame.columns, record)])
        return rows

    @property
    def truncated(self) -> bool:
        """Whether rows are left out."""
        return self.max_rows is not None and self.n_rows > self.max_rows


@dataclass
class SignatureSection:
    """A gene-set signature: its score map with hotspots, the hotspot spots, and where the set comes from.

    Parameters
    ----------
    name
        Signature name.
    figure
        Score map (hotspots outlined).
    table
        Hotspot spots (see :meth:`from_hotspots`).
    source
        Citation of the gene set.
    description
        What the set measures; caveats.
    genes_used
        E.g. ``"8 of 11 genes used"`` (unreliable or missing genes dropped).
    """

    name: str
    figure: ReportFigure | None = None
    table: ReportTable | None = None
    source: str = ""
    description: str = ""
    genes_used: str = ""

    @classmethod
    def from_hotspots(
        cls, name: str, png: bytes | None, hotspots: pd.DataFrame | None, top: int = 10, **kw: Any
    ) -> SignatureSection:
        """Build a section from a score map and a :func:`virtualst.predict.hotspots.hotspots` table.

        The table keeps the hot spots (``hotspot == "hot"``), strongest
        ``gi_z`` first, and shows the ``top`` of them.
        """
        table = None
        if hotspots is not None:
            hot = hotspots[hotspots["hotspot"] == "hot"].sort_values("gi_z", ascending=False)
            if hot.index.name is None:
                hot = hot.rename_axis("spot")
            columns = [c for c in ("gi_z", "q", "n_neighbours") if c in hot.columns]
            note = f"{len(hot)} hot spot(s) of {len(hotspots)} (Getis-Ord Gi*, Benjamini-Hochberg FDR"
            fdr = hotspots.attrs.get("fdr")
            note += f" {fdr:g})." if fdr is not None else ")."
            table = ReportTable("Hotspot spots", hot[columns], note=note, max_rows=top, show_index=True)
        figure = ReportFigure(name, png, kw.pop("caption", "")) if png is not None else None
        return cls(name, figure, table, **kw)


@dataclass
class Report:
    """Everything the report shows; every part is optional.

    Parameters
    ----------
    slide_name
        Name of the slide or sample.
    title
        Page title.
    created
        Creation time (default: now, UTC).
    version
        virtualst version.
    thumbnail
        Slide thumbnail with the tissue mask.
    slide_info
        Facts about the slide (pixel size, spots, image size...).
    model_summary
        Facts about the model (see :func:`summarize_model`).
    gene_maps
        Gene maps, best first.
    signatures
        Signature sections.
    leaderboard
        Benchmark table.
    warnings
        Shown prominently at the top.
    notes
        Shown at the end.
    """

    slide_name: str = ""
    title: str = "Virtual spatial transcriptomics report"
    created: datetime | str | None = None
    version: str = __version__
    thumbnail: ReportFigure | None = None
    slide_info: dict[str, Any] = field(default_factory=dict)
    model_summary: dict[str, Any] = field(default_factory=dict)
    gene_maps: list[ReportFigure] = field(default_factory=list)
    signatures: list[SignatureSection] = field(default_factory=list)
    leaderboard: ReportTable | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def created_text(self) -> str:
        """Creation time as ``YYYY-MM-DD HH:MM`` with its zone."""
        created = self.created or datetime.now(timezone.utc)
        if isinstance(created, datetime):
            zone = created.tzname() or ""
            return created.strftime("%Y-%m-%d %H:%M") + (f" {zone}" if zone else "")
        return str(created)


# ----------------------------------------------------------------------------- formatting
def format_value(value: Any, spec: str | None = None) -> str:
    """Human-readable text of a table or summary value.

    Numbers: 3 significant digits (trailing zeros kept) between 0.001 and
    100, whole numbers from 100 on, scientific notation below 0.001
    (p-values); missing values as a dash; lists shortened after 12 items.
    """
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return spec.format(value) if spec else f"{int(value):d}"
    if isinstance(value, (float, np.floating)):
        x = float(value)
        if not math.isfinite(x):
            return "–"
        if spec:
            return spec.format(x)
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        return f"{x:#.3g}" if abs(x) >= 1e-3 else f"{x:.1e}"  # '#' keeps trailing zeros: columns align
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, set, np.ndarray, pd.Index)):
        items = [format_value(v) for v in value]
        shown = ", ".join(items[:12])
        return shown + (f", … ({len(items) - 12} more)" if len(items) > 12 else "")
    try:
        if pd.isna(value):
            return "–"
    except (TypeError, ValueError):
        pass
    return str(value)


def _cell(value: Any, spec: str | None) -> tuple[str, bool]:
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    return format_value(value, spec), numeric


def summarize_model(config: Mapping[str, Any]) -> dict[str, str]:
    """The facts a reader needs about a saved predictor, from its ``config.json``.

    Parameters
    ----------
    config
        :meth:`virtualst.heads.predictor.GenePredictor.to_config` output (or
        the loaded ``config.json``); missing parts are left out.

    Returns
    -------
    dict
        Label -> text: encoder, head, training data, normalisation, genes,
        cross-validation scheme, mean CV Pearson, reliable genes, threshold.
    """
    out: dict[str, str] = {}
    encoder = config.get("encoder") or {}
    if encoder:
        parts = [str(encoder.get("name", "?"))]
        if encoder.get("dim"):
            parts.append(f"{encoder['dim']}-d features")
        if encoder.get("tile_um") and encoder.get("tile_px"):
            parts.append(f"tiles of {format_value(float(encoder['tile_um']))} µm at {encoder['tile_px']} px")
        out["Encoder"] = ", ".join(parts)
        if encoder.get("weights_source"):
            out["Encoder weights"] = str(encoder["weights_source"])
    head = config.get("head") or {}
    if head.get("kind"):
        out["Head"] = str(head["kind"])
    training = config.get("training") or {}
    if training:
        sections, patients = training.get("sections", []), training.get("patients", [])
        out["Training data"] = (
            f"{len(sections)} section(s) from {len(patients)} patient(s), {training.get('n_spots', '?')} spots"
            + (f" ({format_value(sections)})" if sections else "")
        )
    target = config.get("target") or {}
    if target.get("normalization"):
        out["Normalisation"] = str(target["normalization"])
    genes = target.get("genes") or []
    if genes:
        spec = target.get("gene_spec")
        out["Genes"] = f"{len(genes)}" + (f" (selected as {spec})" if spec and spec != "list" else "")
    cv = config.get("cv") or {}
    if cv.get("scheme"):
        out["Cross-validation"] = str(cv["scheme"])
    if cv.get("mean_pearson") is not None:
        out["Mean CV Pearson"] = f"{cv['mean_pearson']:.3f}"
    if cv.get("mean_pearson_smoothed") is not None:
        out["Mean CV Pearson, smoothed"] = f"{cv['mean_pearson_smoothed']:.3f}"
    threshold = config.get("reliable_pearson")
    if threshold is not None:
        out["Reliability threshold"] = f"CV Pearson ≥ {threshold:.2f}"
        pearson = cv.get("pearson_smoothed" if config.get("smoothing") else "pearson") or cv.get("pearson") or {}
        if pearson:
            good = sum(1 for r in pearson.values() if r is not None and math.isfinite(r) and r >= threshold)
            out["Reliable genes"] = f"{good} of {len(pearson)}"
    return out


# ----------------------------------------------------------------------------- rendering
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("virtualst.predict", "templates"),
        autoescape=True,  # every value is escaped unless marked safe; nothing is
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = format_value
    return env


def render_report(report: Report) -> str:
    """The report as one HTML document (a string)."""
    template = _environment().get_template(TEMPLATE)
    return template.render(
        report=report,
        created=report.created_text(),
        csp=CONTENT_SECURITY_POLICY,
        disclaimer=DISCLAIMER,
        unreliable_flag=UNRELIABLE,
    )


def write_report(report: Report, path: str | Path) -> Path:
    """Render ``report`` and write it to ``path`` atomically (temporary file, then rename).

    Returns
    -------
    Path
        ``path``.
    """
    return write_text_atomically(path, render_report(report))


__all__ = [
    "DISCLAIMER",
    "Report",
    "ReportFigure",
    "ReportTable",
    "SignatureSection",
    "UNRELIABLE",
    "format_value",
    "render_report",
    "summarize_model",
    "write_report",
]
