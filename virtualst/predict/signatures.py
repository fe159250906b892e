"""Gene-set signatures: built-in literature sets, user files, and per-spot scores.

A signature score is the mean z-score of the set's genes, each gene
standardised over the spots of this sample. By default only genes the model
predicts reliably (``var['reliable']``) take part: a score built from genes
the model cannot predict would look like biology and be noise.

User sets are read from GMT (``name<TAB>description<TAB>gene...`` per line),
JSON or YAML (``{name: [genes]}`` or ``{name: {genes: [...], source: ...,
description: ...}}``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from virtualst.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad


@dataclass(frozen=True)
class GeneSet:
    """A named list of genes with where it comes from.

    Parameters
    ----------
    name
        Short identifier (used as a column name).
    genes
        Gene symbols; duplicates are dropped, order kept.
    source
        Citation (authors, journal, year) or the file it was read from.
    description
        What the set measures, and any caveat (e.g. an abridged list).
    """

    name: str
    genes: tuple[str, ...]
    source: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a gene set needs a non-empty name, got {self.name!r}")
        if isinstance(self.genes, str):
            raise ValueError(f"gene set {self.name!r}: genes must be a list of symbols, not one string")
        genes = tuple(dict.fromkeys(str(g).strip() for g in self.genes if str(g).strip()))
        if not genes:
            raise ValueError(f"gene set {self.name!r} has no genes")
        object.__setattr__(self, "genes", genes)


# ------------------------------------------------------------------ built-in sets
_PARKER_2009 = (
    "Parker JS, Mullins M, Cheang MCU, et al. Supervised risk predictor of breast cancer based on intrinsic subtypes. "
    "J Clin Oncol. 2009;27(8):1160-1167"
)

#: Literature signatures shipped with virtualst. Current HGNC symbols; older
#: names in the data are matched through :data:`ALIASES`.
BUILTIN_GENE_SETS: dict[str, GeneSet] = {
    s.name: s
    for s in (
        GeneSet(
            "erbb2_amplicon",
            ("PPP1R1B", "STARD3", "TCAP", "PNMT", "PGAP3", "ERBB2", "MIEN1", "GRB7"),
            "Kauraniemi P, Kallioniemi A. Activation of multiple cancer-associated genes at the ERBB2 amplicon in breast cancer. "
            "Endocr Relat Cancer. 2006;13(1):39-49; Kauraniemi P, Kuukasjarvi T, Sauter G, Kallioniemi A. Am J Pathol. 2003;163(5):1979-1984",
            "Genes of the minimal 17q12 ERBB2 (HER2) amplicon in breast cancer (PERLD1 = PGAP3, C17orf37 = MIEN1, MLN64 = STARD3). "
            "Co-amplified genes are not all over-expressed in every amplified tumour; ERBB2 and GRB7 are the most consistent.",
        ),
        GeneSet(
            "proliferation_pam50",
            ("BIRC5", "CCNB1", "CDC20", "NUF2", "CEP55", "NDC80", "MKI67", "PTTG1", "RRM2", "TYMS", "UBE2C"),
            _PARKER_2009 + "; Nielsen TO, Parker JS, Leung S, et al. Clin Cancer Res. 2010;16(21):5222-5232",
            "The 11-gene PAM50 proliferation score (CDCA1 = NUF2, KNTC2 = NDC80).",
        ),
        GeneSet(
            "tls_cabrita2020",
            ("CD79B", "CD1D", "CCR6", "LAT", "SKAP1", "CETP", "EIF1AY", "RBP5", "PTGDS"),
            "Cabrita R, Lauss M, Sanna A, et al. Tertiary lymphoid structures improve immunotherapy and survival in melanoma. "
            "Nature. 2020;577(7791):561-565",
            "9-gene tertiary lymphoid structure (TLS) signature. EIF1AY is on chromosome Y (not expressed in female tissue).",
        ),
        GeneSet(
            "tls_chemokine12",
            ("CCL2", "CCL3", "CCL4", "CCL5", "CCL8", "CCL18", "CCL19", "CCL21", "CXCL9", "CXCL10", "CXCL11", "CXCL13"),
            "Coppola D, Nebozhyn M, Khalil F, et al. Am J Pathol. 2011;179(1):37-45; "
            "Messina JL, Fenstermacher DA, Eschrich S, et al. 12-Chemokine gene signature identifies lymph node-like structures in melanoma. "
            "Sci Rep. 2012;2:765",
            "12-chemokine signature of ectopic lymph node-like structures (TLS).",
        ),
        GeneSet(
            "tcell_inflamed_ayers2017",
            tuple("CCL5 CD27 CD274 CD276 CD8A CMKLR1 CXCL9 CXCR6 HLA-DQA1 HLA-DRB1 HLA-E IDO1 LAG3 NKG7 PDCD1LG2 PSMB10 STAT1 TIGIT".split()),
            "Ayers M, Lunceford J, Nebozhyn M, et al. IFN-gamma-related mRNA profile predicts clinical response to PD-1 blockade. "
            "J Clin Invest. 2017;127(8):2930-2940",
            "18-gene T cell-inflamed gene expression profile (GEP); unweighted here (the published score weights the genes).",
        ),
        GeneSet(
            "stroma_ftbrs_mariathasan2018",
            tuple(
                "ACTA2 ACTG2 ADAM12 ADAM19 CNN1 COL4A1 CCN2 CTPS1 RFLNB FSTL3 HSPB1 IGFBP3 PXDC1 SEMA7A SH3PXD2A TAGLN TGFBI TNS1 TPM1".split()
            ),
            "Mariathasan S, Turley SJ, Nickles D, et al. TGFbeta attenuates tumour response to PD-L1 blockade by contributing to "
            "exclusion of T cells. Nature. 2018;554(7693):544-548",
            "Pan-fibroblast TGF-beta response signature (pan-F-TBRS): activated stroma / CAFs (CTGF = CCN2, FAM101B = RFLNB).",
        ),
    )
}

#: Current symbol -> older symbols still found in data sets (her2st uses CTGF but NUF2, for example).
ALIASES: dict[str, tuple[str, ...]] = {
    "NUF2": ("CDCA1",),
    "NDC80": ("KNTC2",),
    "PGAP3": ("PERLD1", "MGC14832"),
    "MIEN1": ("C17orf37", "MGC9753"),
    "STARD3": ("MLN64",),
    "CCN2": ("CTGF",),
    "RFLNB": ("FAM101B",),
}


def _synonyms(gene: str) -> list[str]:
    """``gene`` first, then its other names from :data:`ALIASES` (either direction)."""
    for current, old in ALIASES.items():
        group = (current, *old)
        if gene in group:
            return [gene] + [g for g in group if g != gene]
    return [gene]


def builtin_gene_set(name: str) -> GeneSet:
    """The built-in set called ``name``; :class:`KeyError` listing the known names otherwise."""
    try:
        return BUILTIN_GENE_SETS[name]
    except KeyError:
        raise KeyError(f"no built-in gene set {name!r}; known: {', '.join(BUILTIN_GENE_SETS)}") from None


# ------------------------------------------------------------------ file loaders
def _read_gmt(path: Path) -> list[GeneSet]:
    sets = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        genes = [g for g in fields[2:] if g]
        if len(fields) < 3 or not fields[0] or not genes:
            raise InputError(path, f"line {number}: expected a name, a description and at least one gene, separated by tabs")
        sets.append(GeneSet(fields[0], tuple(genes), source=f"{path.name}", description=fields[1]))
    return sets


def _sets_from_mapping(path: Path, data: Any) -> list[GeneSet]:
    """``{name: [genes]}`` or ``{name: {genes: [...], source, description}}`` as parsed from JSON/YAML."""
    if not isinstance(data, Mapping) or not data:
        raise InputError(path, "expected a non-empty mapping of set name -> list of genes")
    sets = []
    for name, entry in data.items():
        extra: dict[str, str] = {}
        if isinstance(entry, Mapping):
            extra = {k: str(entry[k]) for k in ("source", "description") if entry.get(k) is not None}
            entry = entry.get("genes")
        if not isinstance(entry, list) or not entry or not all(isinstance(g, str) and g.strip() for g in entry):
            raise InputError(path, f"set {name!r}: expected a non-empty list of gene symbols (strings)")
        sets.append(GeneSet(str(name), tuple(entry), source=extra.get("source", path.name), description=extra.get("description", "")))
    return sets


def _read_json(path: Path) -> list[GeneSet]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    return _sets_from_mapping(path, data)


def _read_yaml(path: Path) -> list[GeneSet]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InputError(path, f"invalid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    return _sets_from_mapping(path, data)


#: File suffix -> reader.
GENE_SET_READERS: dict[str, Callable[[Path], list[GeneSet]]] = {
    ".gmt": _read_gmt,
    ".json": _read_json,
    ".yaml": _read_yaml,
    ".yml": _read_yaml,
}


def load_gene_sets(path: str | Path) -> list[GeneSet]:
    """Read gene sets from a GMT, JSON or YAML file (chosen by suffix).

    Raises
    ------
    virtualst.errors.InputError
        Naming the file: missing, unknown suffix, malformed content,
        duplicated set names.
    """
    path = Path(path)
    reader = GENE_SET_READERS.get(path.suffix.lower())
    if reader is None:
        raise InputError(path, f"unknown gene-set format {path.suffix or '(no suffix)'!r}; use one of {', '.join(GENE_SET_READERS)}")
    if not path.is_file():
        raise InputError(path, "gene-set file not found")
    try:
        sets = reader(path)
    except UnicodeDecodeError:
        raise InputError(path, "not a UTF-8 text file") from None
    if not sets:
        raise InputError(path, "contains no gene sets")
    names = [s.name for s in sets]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InputError(path, f"gene set names appear more than once: {', '.join(duplicated)}")
    return sets


def resolve_gene_sets(specs: Iterable[str | Path | GeneSet] | str | Path | GeneSet | Mapping[str, Sequence[str]]) -> list[GeneSet]:
    """Turn built-in names, file paths, ``GeneSet`` objects or ``{name: genes}`` into a list of sets.

    A string names a built-in set when it is a key of
    :data:`BUILTIN_GENE_SETS`, otherwise a file for :func:`load_gene_sets`.

    Raises
    ------
    virtualst.errors.InputError
        For a string that is neither a built-in name nor a readable file.
    """
    if isinstance(specs, Mapping):
        return [GeneSet(str(name), tuple(genes)) for name, genes in specs.items()]
    if isinstance(specs, (str, Path, GeneSet)):
        specs = [specs]
    sets: list[GeneSet] = []
    for spec in specs:
        if isinstance(spec, GeneSet):
            sets.append(spec)
        elif isinstance(spec, str) and spec in BUILTIN_GENE_SETS:
            sets.append(BUILTIN_GENE_SETS[spec])
        elif Path(spec).suffix.lower() in GENE_SET_READERS or Path(spec).exists():
            sets.extend(load_gene_sets(spec))
        else:
            raise InputError(spec, f"neither a built-in gene set ({', '.join(BUILTIN_GENE_SETS)}) nor a .gmt/.json/.yaml file")
    return sets


# ------------------------------------------------------------------ scoring
@dataclass
class _Match:
    """How one gene set meets the data."""

    used: list[str] = field(default_factory=list)  # var names
    missing: list[str] = field(default_factory=list)
    unreliable: list[str] = field(default_factory=list)
    constant: list[str] = field(default_factory=list)


def _reliable_mask(adata: ad.AnnData) -> np.ndarray | None:
    """``var['reliable']``, else derived from ``cv_pearson`` and the threshold; ``None`` when unknown."""
    if "reliable" in adata.var:
        return adata.var["reliable"].to_numpy(dtype=bool)
    threshold = adata.uns.get("virtualst", {}).get("reliable_pearson")
    if "cv_pearson" in adata.var and threshold is not None:
        return adata.var["cv_pearson"].to_numpy(dtype=np.float64) >= float(threshold)
    return None


def _lookup(var_names: pd.Index) -> Callable[[str], str | None]:
    """Gene -> var name: exact, then an alias, then a unique case-insensitive match (mouse symbols)."""
    exact = set(var_names)
    upper: dict[str, list[str]] = {}
    for name in var_names:
        upper.setdefault(str(name).upper(), []).append(name)

    def find(gene: str) -> str | None:
        for candidate in _synonyms(gene):
            if candidate in exact:
                return candidate
        for candidate in _synonyms(gene):
            hits = upper.get(candidate.upper(), [])
            if len(hits) == 1:
                return hits[0]
        return None

    return find


def _matrix(adata: ad.AnnData, layer: str | None) -> Any:
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not in the AnnData (layers: {', '.join(adata.layers) or 'none'})")
    return adata.layers[layer]


def _zscores(matrix: Any, columns: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene z-scores over spots (population sd) of ``columns``, and which columns vary at all."""
    block = matrix[:, columns]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    block = block.astype(np.float64, copy=False)
    mean = block.mean(axis=0)
    sd = block.std(axis=0)
    varies = sd > 1e-12 * np.maximum(1.0, np.abs(mean))
    z = (block[:, varies] - mean[varies]) / sd[varies]
    return z, varies


def score_gene_sets(
    adata: ad.AnnData,
    sets: Iterable[str | Path | GeneSet] | str | Path | GeneSet | Mapping[str, Sequence[str]],
    layer: str | None = None,
    min_genes: int = 2,
    reliable_only: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score gene sets on every spot: the mean z-score of the set's usable genes.

    Each gene is z-scored over the spots of ``adata`` (one sample), so scores
    are relative within this section, not comparable in absolute terms across
    sections.

    Parameters
    ----------
    adata
        Predictions (or measurements), spots × genes.
    sets
        Gene sets: :class:`GeneSet` objects, built-in names, files, or a
        ``{name: genes}`` mapping (see :func:`resolve_gene_sets`).
    layer
        Score this layer (e.g. ``"measured"``) instead of ``X``.
    min_genes
        Sets with fewer usable genes are skipped (reported, not scored).
    reliable_only
        Use only genes flagged ``var['reliable']``. Applies to any layer, so
        measured and predicted scores use the same genes and compare fairly.
        Ignored (and reported) when the AnnData carries no reliability.

    Returns
    -------
    scores : pandas.DataFrame
        Spots (``adata.obs_names``) × scored sets.
    report : pandas.DataFrame
        One row per set (index: set name): ``n_genes``, ``n_genes_used``,
        ``genes_used``, ``missing``, ``unreliable_dropped``,
        ``constant_dropped`` (comma-separated names), ``scored`` (bool),
        ``reason`` (why skipped, or a note), ``source``.
    """
    if min_genes < 1:
        raise ValueError(f"min_genes must be >= 1, got {min_genes}")
    gene_sets = resolve_gene_sets(sets)
    names = [s.name for s in gene_sets]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"gene set names must be unique; repeated: {', '.join(duplicated)}")
    matrix = _matrix(adata, layer)
    reliable = _reliable_mask(adata) if reliable_only else None
    position = {name: i for i, name in enumerate(adata.var_names)}
    find = _lookup(adata.var_names)
    scores: dict[str, np.ndarray] = {}
    rows = []
    for gene_set in gene_sets:
        match = _Match()
        for gene in gene_set.genes:
            name = find(gene)
            if name is None:
                match.missing.append(gene)
            elif reliable is not None and not reliable[position[name]]:
                match.unreliable.append(name)
            elif name not in match.used:  # two aliases may land on one column
                match.used.append(name)
        reason = "" if reliable is not None or not reliable_only else "no reliability information in var: all genes used"
        if match.used:
            z, varies = _zscores(matrix, [position[g] for g in match.used])
            match.constant = [g for g, v in zip(match.used, varies) if not v]
            match.used = [g for g, v in zip(match.used, varies) if v]
        scored = len(match.used) >= min_genes
        if scored:
            scores[gene_set.name] = z.mean(axis=1)
        else:
            reason = f"only {len(match.used)} usable gene(s), need {min_genes}"
        rows.append(
            {
                "set": gene_set.name,
                "n_genes": len(gene_set.genes),
                "n_genes_used": len(match.used),
                "genes_used": ", ".join(match.used),
                "missing": ", ".join(match.missing),
                "unreliable_dropped": ", ".join(match.unreliable),
                "constant_dropped": ", ".join(match.constant),
                "scored": scored,
                "reason": reason,
                "source": gene_set.source,
            }
        )
    index = pd.Index(adata.obs_names, dtype=object)
    score_frame = pd.DataFrame(scores, index=index, columns=list(scores), dtype=np.float64)
    report = pd.DataFrame(rows).set_index("set") if rows else pd.DataFrame(columns=["n_genes", "n_genes_used"])
    return score_frame, report
