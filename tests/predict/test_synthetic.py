"""The synthetic demo data set: determinism, reader round trip, ground truth, and recoverable signal."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import virtualst
from virtualst.embed.readers import read_all
from virtualst.predict import synthetic as S

#: Three patients of ~135 spots each: enough spots for a held-out Pearson, small enough to embed in ~30 s on 2 cores.
SIGNAL_SIZE_UM = 2800.0


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _disc_pixels(image: np.ndarray, x: int, y: int, radius: int = 50) -> np.ndarray:
    dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return image[y - radius : y + radius + 1, x - radius : x + radius + 1][dx**2 + dy**2 <= radius**2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three sections (patients A, B, C) of 2.8 x 2.8 mm at 1 µm/px."""
    out = tmp_path_factory.mktemp("synthetic") / "data"
    S.make_synthetic_dataset(out, n_sections=3, seed=0, size_um=SIGNAL_SIZE_UM)
    return out


@pytest.fixture(scope="module")
def samples(dataset):
    return read_all(dataset)


# ----------------------------------------------------------------------------- layout and determinism
def test_section_ids_name_patients_like_her2st():
    assert S.section_ids(3) == [("A1", "A"), ("B1", "B"), ("C1", "C")]
    assert S.section_ids(3, sections_per_patient=2) == [("A1", "A"), ("A2", "A"), ("B1", "B")]
    with pytest.raises(ValueError):
        S.section_ids(0)


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    kw = {"n_sections": 2, "size_um": 1000.0}
    S.make_synthetic_dataset(tmp_path / "a", seed=3, **kw)
    S.make_synthetic_dataset(tmp_path / "b", seed=3, **kw)
    S.make_synthetic_dataset(tmp_path / "c", seed=4, **kw)
    a, b, c = (_digests(tmp_path / n) for n in "abc")
    assert a == b
    assert "ST-imgs/A/A1/A1.jpg" in a and S.TRUTH_FILE in a
    images = [k for k in a if k.endswith(".jpg") or k.startswith("ST-cnts")]
    assert all(a[k] != c[k] for k in images)


def test_refuses_a_non_empty_folder_unless_replacing_a_synthetic_set(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="no synthetic data set"):
        S.make_synthetic_dataset(other, n_sections=1, size_um=600.0)

    out = tmp_path / "syn"
    S.make_synthetic_dataset(out, n_sections=2, size_um=600.0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        S.make_synthetic_dataset(out, n_sections=1, size_um=600.0)
    S.make_synthetic_dataset(out, n_sections=1, size_um=600.0, overwrite=True)
    assert [s.sample_id for s in read_all(out)] == ["A1"]  # the old B1 is gone, not mixed in


# ----------------------------------------------------------------------------- reader round trip
def test_readers_read_every_section_with_its_patient(dataset, samples):
    truth = S.read_truth(dataset)
    assert [(s.sample_id, s.patient_id) for s in samples] == [("A1", "A"), ("B1", "B"), ("C1", "C")]
    for sample, info in zip(samples, truth["sections"]):
        assert sample.metadata["reader"] == "legacy_st"
        assert sample.um_per_px == pytest.approx(1.0, rel=1e-3)  # fitted from the array, as for real ST
        assert sample.spot_diameter_um == 100.0
        assert sample.n_spots == info["n_spots"] and 100 <= sample.n_spots <= 200
        assert sample.counts.shape == (sample.n_spots, len(truth["gene_model"]["genes"]))
        assert list(sample.genes) == [g["name"] for g in truth["gene_model"]["genes"]]
        assert sample.spots["in_tissue"].all()
        assert sample.image.dimensions == (2800, 2800)
        morphology = S.read_morphology(dataset, sample.sample_id)
        assert list(morphology.index) == list(sample.barcodes)


def test_a_counts_file_reads_as_one_section(dataset, samples):
    one = virtualst.read(dataset / "ST-cnts" / "B1.tsv")
    assert (one.sample_id, one.patient_id, one.n_spots) == ("B1", "B", samples[1].n_spots)
    assert (one.counts != samples[1].counts).nnz == 0


# ----------------------------------------------------------------------------- ground truth
def test_truth_file_rebuilds_the_gene_model_and_counts_follow_it(dataset, samples):
    truth = S.read_truth(dataset)
    model = S.GeneModel.from_dict(truth["gene_model"])
    assert model == S.default_gene_model(0)
    groups = truth["groups"]
    assert len(groups["strong"]) >= 10 and len(groups["weak"]) >= 10 and len(groups["noise"]) >= 10
    assert all(not model.table().loc[g, list(S.FEATURE_NAMES)].any() for g in groups["noise"])

    sample = samples[0]
    morphology = S.read_morphology(dataset, sample.sample_id)
    log_mu = model.log_mean(S.standardize(morphology), morphology["library_factor"].to_numpy())
    counts = sample.counts.toarray()
    # Counts are unbiased draws around mu ...
    assert counts.sum() == pytest.approx(np.exp(log_mu).sum(), rel=0.05)
    # ... and strongly driven genes follow it closely.
    strong = [model.names.index(g) for g in groups["strong"]]
    r = [np.corrcoef(np.log1p(counts[:, j]), log_mu[:, j])[0, 1] for j in strong]
    assert min(r) > 0.7


def test_morphology_truth_is_what_the_image_shows(dataset, samples):
    """White pixels follow the lumen fraction; haematoxylin-dark pixels follow nuclear density x area."""
    for sample in samples:
        image = np.asarray(Image.open(sample.metadata["image_path"])).astype(float)
        morphology = S.read_morphology(dataset, sample.sample_id)
        white, dark = [], []
        for x, y in np.rint(sample.centers).astype(int):
            disc = _disc_pixels(image, x, y)
            white.append(np.mean(disc.min(axis=1) > 225))
            dark.append(np.mean(disc.mean(axis=1) < 110))
        assert np.corrcoef(white, morphology["lumen_fraction"])[0, 1] > 0.75
        nuclear_cover = morphology["nuclear_density"] * morphology["nuclear_area"]
        assert np.corrcoef(dark, nuclear_cover)[0, 1] > 0.9


def test_standardize_uses_fixed_constants():
    table = pd.DataFrame({f.name: [f.center, f.center + 2 * f.scale] for f in S.FEATURES})
    np.testing.assert_allclose(S.standardize(table), [[0, 0, 0], [2, 2, 2]])


# ----------------------------------------------------------------------------- signal
def test_frozen_encoder_embeddings_recover_the_image_driven_genes(dataset, samples, tmp_path_factory):
    """efficientnet_lite0 + ridge on sections A1, B1 predicts C1: strong genes well, noise genes not at all.

    Measured (seed 0, 18 strong / 16 weak / 16 noise genes): strong mean 0.72 (min 0.60), weak mean 0.18,
    noise mean -0.03 (max |r| 0.23, about 2.6 standard errors at ~135 spots).
    """
    from virtualst.embed.cache import read_embeddings
    from virtualst.embed.runner import EmbedSettings, embed_samples
    from virtualst.heads.cv import pearson_per_gene
    from virtualst.heads.ridge import RidgeHead
    from virtualst.heads.targets import normalize

    cache = tmp_path_factory.mktemp("cache")
    paths = embed_samples(samples, cache, EmbedSettings(encoder="efficientnet_lite0", device="cpu"), show_progress=False)
    features = [read_embeddings(p).features for p in paths]
    genes = list(samples[0].genes)
    targets = [normalize(s.counts, genes, genes, "log1p") for s in samples]

    head = RidgeHead().fit(np.concatenate(features[:2]), np.concatenate(targets[:2]))
    r = pd.Series(pearson_per_gene(targets[2], head.predict(features[2])), index=genes)
    groups = S.read_truth(dataset)["groups"]
    strong, weak, noise = (r[groups[g]] for g in ("strong", "weak", "noise"))

    assert strong.mean() > 0.5, strong.round(3).to_dict()
    assert strong.min() > 0.35, strong.round(3).to_dict()
    assert weak.mean() > 0.05, weak.round(3).to_dict()
    assert strong.mean() > weak.mean() > noise.mean()
    assert abs(noise.mean()) < 0.1, noise.round(3).to_dict()
    assert noise.abs().max() < 0.35, noise.round(3).to_dict()
