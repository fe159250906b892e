"""Gene-set signatures: built-in sets, file loaders, and the mean z-score."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from virtualst.errors import InputError
from virtualst.predict.signatures import (
    BUILTIN_GENE_SETS,
    GeneSet,
    builtin_gene_set,
    load_gene_sets,
    resolve_gene_sets,
    score_gene_sets,
)


@pytest.fixture
def adata() -> ad.AnnData:
    """6 spots × 6 genes; G4 unreliable, G5 constant, CTGF under its old symbol; measured = X reversed."""
    x = np.array(
        [
            [1.0, 2.0, 0.0, 5.0, 3.0, 1.0],
            [2.0, 2.0, 1.0, 4.0, 3.0, 2.0],
            [3.0, 6.0, 0.0, 3.0, 3.0, 0.0],
            [4.0, 0.0, 2.0, 2.0, 3.0, 1.0],
            [5.0, 4.0, 1.0, 1.0, 3.0, 5.0],
            [6.0, 1.0, 3.0, 0.0, 3.0, 2.0],
        ],
        dtype=np.float32,
    )
    var = pd.DataFrame(index=["G1", "G2", "G3", "G4", "G5", "CTGF"])
    var["cv_pearson"] = [0.5, 0.4, 0.3, 0.02, 0.3, 0.6]
    var["reliable"] = var["cv_pearson"] >= 0.1
    a = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"s{i}" for i in range(6)]), var=var)
    a.layers["measured"] = sp.csr_matrix(x[:, ::-1].copy())  # sparse on purpose
    a.uns["virtualst"] = {"reliable_pearson": 0.1}
    return a


def hand_score(x: np.ndarray) -> np.ndarray:
    """Mean over columns of (x - mean) / population sd, written out."""
    z = [(col - col.mean()) / np.sqrt(((col - col.mean()) ** 2).mean()) for col in x.T]
    return np.mean(z, axis=0)


def test_score_equals_hand_computation(adata):
    scores, report = score_gene_sets(adata, {"s": ["G1", "G2", "G3"]})
    np.testing.assert_allclose(scores["s"].to_numpy(), hand_score(adata.X[:, :3].astype(np.float64)), rtol=1e-12)
    assert scores.index.tolist() == list(adata.obs_names)
    row = report.loc["s"]
    assert row["scored"] and row["n_genes_used"] == 3 and row["genes_used"] == "G1, G2, G3"


def test_unreliable_genes_dropped_by_default_and_reported(adata):
    scores, report = score_gene_sets(adata, {"s": ["G1", "G2", "G4"]})
    np.testing.assert_allclose(scores["s"], hand_score(adata.X[:, :2].astype(np.float64)), rtol=1e-12)
    assert report.loc["s", "unreliable_dropped"] == "G4"
    assert report.loc["s", "n_genes_used"] == 2
    kept, report_all = score_gene_sets(adata, {"s": ["G1", "G2", "G4"]}, reliable_only=False)
    np.testing.assert_allclose(kept["s"], hand_score(adata.X[:, [0, 1, 3]].astype(np.float64)), rtol=1e-12)
    assert report_all.loc["s", "unreliable_dropped"] == ""


def test_reliability_derived_from_cv_when_column_missing(adata):
    del adata.var["reliable"]
    _, report = score_gene_sets(adata, {"s": ["G1", "G2", "G4"]})
    assert report.loc["s", "unreliable_dropped"] == "G4"
    del adata.var["cv_pearson"]
    _, report = score_gene_sets(adata, {"s": ["G1", "G2", "G4"]})
    assert report.loc["s", "n_genes_used"] == 3 and "no reliability" in report.loc["s", "reason"]


def test_missing_constant_and_too_few_genes(adata):
    scores, report = score_gene_sets(adata, {"ok": ["G1", "NOPE", "G5", "G3"], "few": ["G1", "G4", "ABSENT"]}, min_genes=2)
    assert list(scores.columns) == ["ok"]
    assert report.loc["ok", "missing"] == "NOPE" and report.loc["ok", "constant_dropped"] == "G5"
    np.testing.assert_allclose(scores["ok"], hand_score(adata.X[:, [0, 2]].astype(np.float64)), rtol=1e-12)
    few = report.loc["few"]
    assert not few["scored"] and "only 1 usable gene" in few["reason"] and few["missing"] == "ABSENT"
    assert np.isfinite(scores.to_numpy()).all()


def test_aliases_and_case_insensitive_match(adata):
    _, report = score_gene_sets(adata, {"s": ["CCN2", "g1"]})  # CCN2 is the current symbol of CTGF
    assert report.loc["s", "genes_used"] == "CTGF, G1"


def test_layer_is_scored(adata):
    scores, _ = score_gene_sets(adata, {"s": ["G1", "G3"]}, layer="measured", reliable_only=False)
    measured = adata.layers["measured"].toarray().astype(np.float64)
    np.testing.assert_allclose(scores["s"], hand_score(measured[:, [0, 2]]), rtol=1e-12)
    with pytest.raises(KeyError, match="layer"):
        score_gene_sets(adata, {"s": ["G1"]}, layer="nope")


def test_builtin_sets_score_and_duplicates_rejected(adata):
    scores, report = score_gene_sets(adata, ["stroma_ftbrs_mariathasan2018"], min_genes=1)
    assert report.loc["stroma_ftbrs_mariathasan2018", "genes_used"] == "CTGF"
    with pytest.raises(ValueError, match="unique"):
        score_gene_sets(adata, [GeneSet("a", ("G1",)), GeneSet("a", ("G2",))])


def test_builtin_sets_are_cited_and_well_formed():
    assert {"erbb2_amplicon", "proliferation_pam50", "tls_cabrita2020"} <= set(BUILTIN_GENE_SETS)
    for name, gene_set in BUILTIN_GENE_SETS.items():
        assert gene_set.name == name and len(gene_set.genes) >= 5
        assert any(str(year) in gene_set.source for year in range(1990, 2030)), name
        assert all(g == g.strip() and g.upper() == g for g in gene_set.genes), name
    assert {"ERBB2", "GRB7"} <= set(builtin_gene_set("erbb2_amplicon").genes)
    assert "MKI67" in builtin_gene_set("proliferation_pam50").genes
    with pytest.raises(KeyError, match="known"):
        builtin_gene_set("nope")


def test_gene_set_validation():
    assert GeneSet("a", ["X", "Y", "X", " "]).genes == ("X", "Y")
    with pytest.raises(ValueError, match="no genes"):
        GeneSet("a", [])
    with pytest.raises(ValueError, match="name"):
        GeneSet("", ["X"])
    with pytest.raises(ValueError, match="one string"):
        GeneSet("a", "ERBB2")


# ------------------------------------------------------------------ loaders
def test_load_gmt(tmp_path):
    path = tmp_path / "sets.gmt"
    path.write_text("# comment\nHER2\tamplicon\tERBB2\tGRB7\n\nPROLIF\thttp://x\tMKI67\tTOP2A\t\n")
    sets = load_gene_sets(path)
    assert [s.name for s in sets] == ["HER2", "PROLIF"]
    assert sets[0].genes == ("ERBB2", "GRB7") and sets[0].description == "amplicon"
    assert sets[1].genes == ("MKI67", "TOP2A") and sets[1].source == "sets.gmt"


@pytest.mark.parametrize(
    "content, problem",
    [
        ("HER2 ERBB2 GRB7\n", "line 1"),  # spaces, not tabs
        ("HER2\tdesc\n", "line 1"),
        ("A\td\tX\nA\td\tY\n", "more than once"),
        ("\n# only a comment\n", "no gene sets"),
    ],
)
def test_bad_gmt_names_the_file(tmp_path, content, problem):
    path = tmp_path / "bad_sets.gmt"
    path.write_text(content)
    with pytest.raises(InputError, match=problem) as info:
        load_gene_sets(path)
    assert "bad_sets.gmt" in str(info.value) and "\n" not in str(info.value)


def test_load_json_and_yaml(tmp_path):
    (tmp_path / "a.json").write_text('{"HER2": ["ERBB2", "GRB7"], "T": {"genes": ["CD3E"], "source": "me 2024"}}')
    sets = load_gene_sets(tmp_path / "a.json")
    assert [(s.name, s.genes) for s in sets] == [("HER2", ("ERBB2", "GRB7")), ("T", ("CD3E",))]
    assert sets[1].source == "me 2024"
    (tmp_path / "a.yaml").write_text("HER2:\n  - ERBB2\n  - GRB7\nT:\n  genes: [CD3E]\n  description: T cells\n")
    sets = load_gene_sets(tmp_path / "a.yaml")
    assert sets[0].genes == ("ERBB2", "GRB7") and sets[1].description == "T cells"


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("bad.json", '{"HER2": ["ERBB2",]}', "invalid JSON at line 1"),
        ("list.json", '["ERBB2", "GRB7"]', "mapping"),
        ("empty.json", "{}", "mapping"),
        ("notlist.json", '{"HER2": "ERBB2"}', "HER2"),
        ("numbers.json", '{"HER2": [1, 2]}', "HER2"),
        ("bad.yaml", "HER2: [ERBB2\n", "invalid YAML"),
        ("scalar.yml", "just text\n", "mapping"),
        ("sets.txt", "ERBB2\n", "unknown gene-set format"),
    ],
)
def test_bad_json_yaml_names_the_file(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=problem) as info:
        load_gene_sets(path)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found") as info:
        load_gene_sets(tmp_path / "absent.gmt")
    assert "absent.gmt" in str(info.value)


def test_resolve_gene_sets(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('{"mine": ["A", "B"]}')
    sets = resolve_gene_sets(["erbb2_amplicon", str(path), GeneSet("x", ("Y",))])
    assert [s.name for s in sets] == ["erbb2_amplicon", "mine", "x"]
    assert resolve_gene_sets("tls_cabrita2020")[0] is BUILTIN_GENE_SETS["tls_cabrita2020"]
    assert resolve_gene_sets({"m": ["A"]})[0].genes == ("A",)
    with pytest.raises(InputError, match="neither a built-in"):
        resolve_gene_sets(["no_such_set"])
