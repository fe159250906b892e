"""Normalisation and gene selection."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

from virtualst.errors import InputError
from virtualst.heads.targets import GeneSpec, TargetSpec, normalize, read_gene_file

GENES = ["A", "B", "C", "D"]


def _sample(counts, genes=GENES, sid="s"):
    return SimpleNamespace(counts=sp.csr_matrix(np.asarray(counts, dtype=float)), genes=np.array(genes), sample_id=sid, source=None)


def test_log1p_and_cpm_log1p_values():
    counts = np.array([[1, 3, 0, 6], [0, 0, 0, 0], [5, 5, 0, 0]])
    np.testing.assert_allclose(normalize(sp.csr_matrix(counts), GENES, ["B", "A"], "log1p"), np.log1p(counts[:, [1, 0]]))
    cpm = normalize(sp.csr_matrix(counts), GENES, ["A", "D"], "cpm-log1p")
    # library size counts every gene, not only the chosen ones; empty spots stay 0
    expected = np.log1p(np.array([[1e4 / 10, 6e4 / 10], [0, 0], [1e4 / 2, 0]]))
    np.testing.assert_allclose(cpm, expected)


def test_unknown_normalization_and_missing_gene():
    with pytest.raises(ValueError, match="unknown normalisation 'tpm'"):
        TargetSpec(normalization="tpm")
    with pytest.raises(ValueError, match="not measured: Z"):
        normalize(sp.csr_matrix(np.ones((2, 4))), GENES, ["A", "Z"])


def test_hvg_ranks_by_variance_of_log1p_over_training_samples_only():
    train = [_sample([[0, 10, 5, 1], [100, 10, 5, 1]]), _sample([[0, 10, 6, 1], [50, 11, 5, 1]])]
    test = _sample([[0, 0, 0, 1000], [0, 0, 0, 0]])  # D varies wildly here but must not matter
    assert TargetSpec(genes="hvg:2").select_genes(train) == ["A", "C"]
    assert TargetSpec(genes="hvg:1").select_genes([test]) == ["D"]


def test_heg_ranks_by_total_counts_and_uses_genes_common_to_all_samples():
    a = _sample([[1, 50, 3, 9]], genes=["A", "B", "C", "D"])
    b = _sample([[1, 3, 9]], genes=["A", "C", "D"])  # B not measured here
    assert GeneSpec.parse("heg:2").select([a.counts, b.counts], [a.genes, b.genes]) == ["D", "C"]
    with pytest.raises(ValueError, match="asks for 4 genes but the samples share only 3"):
        GeneSpec.parse("heg:4").select([a.counts, b.counts], [a.genes, b.genes])


def test_gene_spec_parsing(tmp_path):
    assert GeneSpec.parse("hvg:50") == GeneSpec("hvg", k=50)
    assert GeneSpec.parse("list:A, B,A").genes == ("A", "B")
    assert GeneSpec.parse(["C", "A"]).genes == ("C", "A")
    hest = tmp_path / "var_50genes.json"
    hest.write_text(json.dumps({"genes": ["B", "D"]}))
    assert GeneSpec.parse(str(hest)).genes == ("B", "D")
    plain = tmp_path / "genes.txt"
    plain.write_text("# my genes\nA\n\nC\n")
    assert read_gene_file(plain) == ["A", "C"]
    for bad in ("hvg:0", "hvg:x", "top:5", str(tmp_path / "missing.txt")):
        with pytest.raises(ValueError):
            GeneSpec.parse(bad)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json: not valid JSON"):
        read_gene_file(tmp_path / "bad.json")


def test_listed_genes_must_be_measured():
    with pytest.raises(ValueError, match="not measured in every sample: Z"):
        TargetSpec(genes=("A", "Z")).select_genes([_sample(np.ones((2, 4)))])


def test_sample_without_counts_is_refused():
    unsequenced = SimpleNamespace(counts=None, genes=None, sample_id="new", source="slide.tif")
    with pytest.raises(InputError, match="slide.tif: sample has no counts"):
        TargetSpec().select_genes([unsequenced])
