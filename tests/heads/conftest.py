"""Fixtures for the head tests: tiny synthetic regressions and real her2st embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import virtualst
from virtualst.embed.cache import read_embeddings
from virtualst.embed.runner import EmbedSettings, embed_samples
from virtualst.heads.targets import TargetSpec


@dataclass
class EmbeddedSection:
    """One real section: embeddings aligned with its in-tissue spots."""

    sample: object  # virtualst.sample.Sample, in-tissue spots only
    features: np.ndarray  # (n_spots, 1280) float32
    coords_um: np.ndarray  # (n_spots, 2) spot centres in µm
    cache: Path | None = None  # the cache file the features came from


@pytest.fixture
def linear_data():
    """200 spots x 12 features, 3 targets linear in the features plus noise."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 12))
    coef = rng.normal(size=(12, 3))
    Y = X @ coef + 0.1 * rng.normal(size=(200, 3)) + np.array([1.0, -2.0, 0.5])
    groups = np.repeat(np.arange(4), 50)
    return X, Y, groups


@pytest.fixture(scope="session")
def her2st_sections(her2st_dir, her2st_cache) -> list[EmbeddedSection]:
    """her2st C2–C5 (in tissue) with their embeddings from the session cache."""
    samples = [s.in_tissue() for s in virtualst.read_all(her2st_dir)]
    paths = embed_samples(samples, her2st_cache, EmbedSettings(batch_size=32, device="cpu"), show_progress=False)
    sections = []
    for sample, path in zip(samples, paths):
        emb = read_embeddings(path)
        assert list(emb.barcodes) == list(sample.barcodes)
        sections.append(EmbeddedSection(sample, emb.features, sample.centers * sample.um_per_px, path))
    return sections


@pytest.fixture(scope="session")
def her2st_split(her2st_sections):
    """Train on C2–C4, test on C5: 50 HVGs chosen on the training sections, cpm-log1p targets.

    Returns ``(X_train, Y_train, groups_train, X_test, Y_test)``.
    """
    train, test = her2st_sections[:3], her2st_sections[3]
    spec = TargetSpec(normalization="cpm-log1p", genes="hvg:50")
    genes = spec.select_genes([s.sample for s in train])
    X_train = np.concatenate([s.features for s in train])
    Y_train = np.concatenate([spec.targets(s.sample, genes) for s in train])
    groups = np.concatenate([[s.sample.sample_id] * len(s.features) for s in train])
    return X_train, Y_train, groups, test.features, spec.targets(test.sample, genes)
