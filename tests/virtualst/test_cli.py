"""The command line: embed, encoders, info, and one-line errors with exit code 2."""

from __future__ import annotations

import shutil

from typer.testing import CliRunner

from virtualst.cli import app
from virtualst.embed.cache import read_embeddings

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("virtualst ")


def test_warnings_print_as_one_line(monkeypatch):
    import warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    assert runner.invoke(app, ["encoders"]).exit_code == 0
    text = warnings.formatwarning("dropped 3 rows", UserWarning, "/x/readers/__init__.py", 118, "return [r.read(p)]")
    assert text == "warning: dropped 3 rows\n"
    assert warnings.formatwarning("old API", DeprecationWarning, "f.py", 1) == "warning (DeprecationWarning): old API\n"


def test_encoders_lists_the_registry():
    result = invoke("encoders")
    assert result.exit_code == 0
    for name in ("efficientnet_lite0", "resnet50", "uni_v1", "hoptimus1", "virchow2", "phikon_v2"):
        assert name in result.output


def test_embed_then_info_on_real_visium(visium_dir, tmp_path):
    cache = tmp_path / "cache"
    result = invoke("embed", visium_dir, "--cache", cache, "--batch-size", "16", "--workers", "0")
    assert result.exit_code == 0, result.output
    (path,) = list((cache / "efficientnet_lite0").glob("*.h5"))
    emb = read_embeddings(path)
    assert emb.features.shape == (100, 1280)

    info = invoke("info", path)
    assert info.exit_code == 0 and "100 x 1280" in info.output and "efficientnet_lite0" in info.output
    sample_info = invoke("info", visium_dir)
    assert sample_info.exit_code == 0 and "100 spots" in sample_info.output

    again = invoke("embed", visium_dir, "--cache", cache, "--tile-um", "55")
    assert_one_line_error(again, str(path), "other settings", "--overwrite")


def test_missing_path_is_a_one_line_error(tmp_path):
    assert_one_line_error(invoke("embed", tmp_path / "nope", "--cache", tmp_path), "nope")
    assert_one_line_error(invoke("info", tmp_path / "nope"), "nope")


def test_unknown_encoder_is_a_one_line_error(visium_dir, tmp_path):
    result = invoke("embed", visium_dir, "--cache", tmp_path, "--encoder", "uni_v9")
    assert_one_line_error(result, "uni_v9")
    assert not list(tmp_path.rglob("*.h5"))


def test_gated_weights_offline_is_a_one_line_error(visium_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    result = invoke("embed", visium_dir, "--cache", tmp_path, "--encoder", "uni_v1")
    assert_one_line_error(result, "uni_v1")
    assert not list(tmp_path.rglob("*.h5"))


def test_corrupt_image_is_a_one_line_error_and_writes_nothing(visium_dir, tmp_path):
    copy = tmp_path / "visium"
    shutil.copytree(visium_dir, copy)
    for png in (copy / "spatial").glob("*.png"):
        png.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = invoke("embed", copy, "--cache", tmp_path / "cache")
    assert_one_line_error(result, "png")
    assert not list((tmp_path / "cache").rglob("*.h5"))


def test_info_reports_an_unfinished_cache(tmp_path):
    import numpy as np

    from virtualst.embed.cache import CacheWriter

    final = tmp_path / "enc" / "s.h5"
    writer = CacheWriter(final, np.array(["a", "b"]), np.zeros((2, 2)), 3, {"fingerprint": "f", "sample_id": "s"})
    writer.write(0, np.ones((1, 3), np.float32))
    writer.close()
    result = invoke("info", final)
    assert result.exit_code == 0 and "UNFINISHED" in result.output and "1 tiles done" in result.output
