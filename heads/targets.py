"""Regression targets from counts: normalisation and gene selection.

Normalisations (a registry, so benches can name them):

* ``log1p`` — ``log(1 + counts)``, the HEST-Benchmark convention (confounded
  by library size, see DESIGN.md §4);
* ``cpm-log1p`` — counts scaled to 1e4 per spot, then ``log1p`` (TRIPLEX).

Gene specs: ``hvg:K`` (most variable after log1p, as HEST), ``heg:K`` (most
highly expressed by total counts, as TRIPLEX), an explicit list, or a file
(JSON list, ``{"genes": [...]}`` as HEST's ``var_50genes.json``, or one gene
per line). Selection is fitted on the training samples only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from virtualst.errors import InputError

CPM_SCALE = 1e4


def _log1p(counts: sp.csr_matrix, library: np.ndarray) -> sp.csr_matrix:
    return counts.log1p()


def _cpm_log1p(counts: sp.csr_matrix, library: np.ndarray) -> sp.csr_matrix:
    scale = np.divide(CPM_SCALE, library, out=np.zeros_like(library), where=library > 0)
    return sp.csr_matrix(sp.diags(scale) @ counts).log1p()


#: name -> f(counts of the chosen genes, library size of every spot) -> normalised
NORMALIZATIONS: dict[str, Callable[[sp.csr_matrix, np.ndarray], sp.csr_matrix]] = {
    "log1p": _log1p,
    "cpm-log1p": _cpm_log1p,
}


def library_size(counts) -> np.ndarray:
    """Total counts per spot (all genes)."""
    return np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()


def normalize(counts, genes: Sequence[str], chosen: Sequence[str], method: str = "log1p") -> np.ndarray:
    """Dense ``(n_spots, len(chosen))`` normalised expression of the ``chosen`` genes.

    The library size always counts every gene of ``counts``, not only the chosen ones.
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {method!r}; known: {', '.join(NORMALIZATIONS)}")
    counts = sp.csr_matrix(counts)
    position = {g: i for i, g in enumerate(genes)}
    missing = [g for g in chosen if g not in position]
    if missing:
        raise ValueError(f"{len(missing)} gene(s) not measured: {', '.join(missing[:5])}")
    columns = _columns(counts, genes, chosen)
    return NORMALIZATIONS[method](columns, library_size(counts)).toarray()


# ----------------------------------------------------------------------- gene specs
def read_gene_file(path: str | Path) -> list[str]:
    """Genes from a JSON list, a ``{"genes": [...]}`` JSON (HEST), or one per line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(path, f"cannot read gene list ({exc.strerror or exc})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(path, f"not valid JSON ({exc})") from None
        genes = data.get("genes") if isinstance(data, dict) else data
        if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes):
            raise InputError(path, 'expected a JSON list of gene names or {"genes": [...]}')
    else:
        genes = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not genes:
        raise InputError(path, "the gene list is empty")
    return list(dict.fromkeys(genes))


@dataclass(frozen=True)
class GeneSpec:
    """Which genes to predict: ``hvg:K``, ``heg:K``, or an explicit list.

    Parameters
    ----------
    rule
        ``"hvg"``, ``"heg"`` or ``"list"``.
    k
        Genes to keep for ``hvg``/``heg``.
    genes
        The explicit list for ``list``.
    """

    rule: str
    k: int = 0
    genes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str | Sequence[str] | GeneSpec) -> GeneSpec:
        """``"hvg:50"``, ``"heg:250"``, ``"list:A,B"``, a file path, or a sequence of names."""
        if isinstance(spec, GeneSpec):
            return spec
        if not isinstance(spec, str):
            return cls("list", genes=tuple(dict.fromkeys(spec)))
        rule, _, arg = spec.partition(":")
        if rule in ("hvg", "heg"):
            if not arg.isdigit() or int(arg) < 1:
                raise ValueError(f"gene spec {spec!r}: expected {rule}:K with K a positive integer")
            return cls(rule, k=int(arg))
        if rule == "list":
            return cls("list", genes=tuple(dict.fromkeys(g.strip() for g in arg.split(",") if g.strip())))
        if Path(spec).is_file():
            return cls("list", genes=tuple(read_gene_file(spec)))
        raise ValueError(f"gene spec {spec!r}: expected hvg:K, heg:K, list:A,B,... or a gene-list file")

    def __str__(self) -> str:
        return f"{self.rule}:{self.k}" if self.rule != "list" else f"list:{','.join(self.genes)}"

    def select(self, counts_list: Sequence, genes_list: Sequence[Sequence[str]]) -> list[str]:
        """The genes chosen on these (training) samples.

        Only genes measured in every sample are candidates; ``hvg`` ranks by
        the variance of ``log1p(counts)`` over all spots pooled, ``heg`` by
        total counts. Ties keep the first sample's gene order.
        """
        common = _common_genes(genes_list)
        genes_list = [[str(g) for g in genes] for genes in genes_list]
        if self.rule == "list":
            missing = [g for g in self.genes if g not in set(common)]
            if missing:
                raise ValueError(f"{len(missing)} listed gene(s) not measured in every sample: {', '.join(missing[:5])}")
            return list(self.genes)
        if self.k > len(common):
            raise ValueError(f"{self} asks for {self.k} genes but the samples share only {len(common)}")
        stacked = sp.vstack([_columns(c, g, common) for c, g in zip(counts_list, genes_list)]).tocsc()
        if self.rule == "hvg":
            logged = stacked.log1p()
            mean = np.asarray(logged.mean(axis=0)).ravel()
            score = np.asarray(logged.multiply(logged).mean(axis=0)).ravel() - mean**2
        else:
            score = np.asarray(stacked.sum(axis=0)).ravel()
        order = np.argsort(-score, kind="stable")[: self.k]
        return [common[i] for i in order]


def _common_genes(genes_list: Sequence[Sequence[str]]) -> list[str]:
    if not genes_list:
        raise ValueError("no samples to select genes from")
    shared = set(genes_list[0]).intersection(*map(set, genes_list[1:]))
    return [str(g) for g in dict.fromkeys(genes_list[0]) if g in shared]


def _columns(counts, genes: Sequence[str], chosen: Sequence[str]) -> sp.csr_matrix:
    """The ``chosen`` columns as float64 (slice first: a section has ~16k genes, targets ~50)."""
    position = {g: i for i, g in enumerate(genes)}
    return sp.csr_matrix(counts)[:, [position[g] for g in chosen]].astype(np.float64)


@dataclass(frozen=True)
class TargetSpec:
    """Normalisation + gene spec: what a predictor is trained to output.

    Parameters
    ----------
    normalization
        A key of :data:`NORMALIZATIONS`.
    genes
        A :class:`GeneSpec` string (``"hvg:50"``...) or list.
    """

    normalization: str = "log1p"
    genes: str | tuple[str, ...] = "hvg:50"

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {self.normalization!r}; known: {', '.join(NORMALIZATIONS)}")
        GeneSpec.parse(self.genes)  # fail early on a malformed spec

    def select_genes(self, samples: Sequence) -> list[str]:
        """Genes chosen on ``samples`` (objects with ``counts`` and ``genes``)."""
        for s in samples:
            if s.counts is None:
                raise InputError(s.source or s.sample_id, "sample has no counts to train on")
        return GeneSpec.parse(self.genes).select([s.counts for s in samples], [s.genes for s in samples])

    def targets(self, sample, genes: Sequence[str]) -> np.ndarray:
        """Normalised expression of ``genes`` for every spot of ``sample``."""
        return normalize(sample.counts, sample.genes, genes, self.normalization)
