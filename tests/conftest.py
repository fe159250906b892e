"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: The real data sets live beside the repository, never inside it.
SHARED_DATA = Path(os.environ.get("VIRTUALST_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of ../shared/data; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set VIRTUALST_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def her2st_dir(shared_data: Path) -> Path:
    """The her2st directory in its original layout."""
    path = shared_data / "her2st"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def mob_dir(shared_data: Path) -> Path:
    """The STUtility mouse olfactory bulb directory."""
    path = shared_data / "stutility_mob"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def visium_dir(shared_data: Path) -> Path:
    """The cut-down Space Ranger v1 output."""
    path = shared_data / "visium_tiny"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache under tmp, with the Hub switched off for this process."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read these at import; keep its own view consistent too.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="session")
def her2st_cache(her2st_dir, tmp_path_factory) -> Path:
    """An embedding cache root holding her2st C2–C5 (in-tissue spots, bundled encoder), embedded once per session.

    Tests that embed her2st again with the same settings reuse these files,
    so the real-data tests pay for the encoder once.
    """
    import virtualst
    from virtualst.embed.runner import EmbedSettings, embed_samples

    cache = tmp_path_factory.mktemp("her2st-cache")
    samples = [s.in_tissue() for s in virtualst.read_all(her2st_dir)]
    embed_samples(samples, cache, EmbedSettings(batch_size=32, device="cpu"), show_progress=False)
    return cache
