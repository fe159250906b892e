"""Hub resolution through an offline HF cache written here, and pushing through a recording HfApi."""

from __future__ import annotations

import shutil

import huggingface_hub
import numpy as np
import pytest

from virtualst.errors import InputError
from virtualst.heads.hub import push_model_dir, resolve_model_dir
from virtualst.heads.persistence import flatten_state, read_model_dir, write_model_dir

from .test_persistence import ConstantHead

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def model_dir(tmp_path):
    spec, arrays, texts = flatten_state(ConstantHead().fit(np.zeros((3, 1)), np.ones((3, 2))).get_state())
    return write_model_dir(tmp_path / "model", {"library": "virtualst", "head": spec}, {"head.safetensors": arrays}, texts, "# c\n")



def put_in_cache(cache, repo_id, folder, revision=REV):
    """Lay ``folder`` out as huggingface_hub's cache does for ``repo_id`` at ``revision`` (refs/main points at it)."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    snapshot = root / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    return snapshot


def test_local_directory_is_used_as_is(model_dir):
    assert resolve_model_dir(model_dir) == model_dir


def test_repo_id_resolves_from_offline_cache(offline_cache, model_dir):
    snapshot = put_in_cache(offline_cache, "lab/her2st-ridge", model_dir)
    found = resolve_model_dir("lab/her2st-ridge")
    assert found.resolve() == snapshot.resolve()
    read_model_dir(found)  # checksums hold in the cache copy
    assert resolve_model_dir("lab/her2st-ridge", revision=REV).resolve() == snapshot.resolve()


def test_missing_repo_offline_is_one_clear_line(offline_cache):
    with pytest.raises(InputError, match=r"^lab/absent: not in the local HF cache and the Hub is unreachable"):
        resolve_model_dir("lab/absent")


def test_missing_local_path(tmp_path):
    with pytest.raises(InputError, match="no such model directory"):
        resolve_model_dir(tmp_path / "nope")


class RecordingApi:
    """Stands in for HfApi: records calls instead of reaching the Hub."""

    calls: list = []

    def __init__(self, **kwargs):
        self.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        from pathlib import Path

        files = sorted(p.relative_to(kwargs["folder_path"]).as_posix() for p in Path(kwargs["folder_path"]).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", kwargs, files))
        return "https://huggingface.co/lab/m/commit/abc"


@pytest.fixture
def recording_api(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


def test_push_creates_repo_branch_and_uploads_everything(model_dir, recording_api):
    url = push_model_dir(model_dir, "lab/m", private=True, revision="v1")
    assert url.endswith("/commit/abc")
    names = [c[0] for c in recording_api.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    assert recording_api.calls[1][2]["private"] is True
    assert recording_api.calls[2][2]["branch"] == "v1"
    upload, files = recording_api.calls[3][1], recording_api.calls[3][2]
    assert upload["repo_id"] == "lab/m" and upload["revision"] == "v1"
    assert files == ["README.md", "config.json", "head.safetensors", "texts/note.txt"]


def test_push_refuses_a_tampered_folder_before_any_call(model_dir, recording_api):
    (model_dir / "head.safetensors").write_bytes(b"tampered")
    with pytest.raises(InputError, match="checksum mismatch"):
        push_model_dir(model_dir, "lab/m")
    assert recording_api.calls == []
