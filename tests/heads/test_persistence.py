"""Model directories: flatten/unflatten head states, atomic writes, verified reads."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from virtualst.errors import InputError
from virtualst.heads import persistence
from virtualst.heads.base import Head, HeadState
from virtualst.heads.persistence import arrays_of, flatten_state, read_model_dir, unflatten_state, write_model_dir


class ConstantHead(Head):
    """Predicts the training mean; a text artefact and optional children exercise every state field."""

    kind = "test-constant"

    def __init__(self, shift: float = 0.0, nested: bool = False) -> None:
        self.shift = shift
        self.nested = nested

    def fit(self, X, y, groups=None):
        self.mean_ = np.asarray(y, dtype=float).mean(axis=0) + self.shift
        self.children_ = {"inner": ConstantHead(shift=1.0).fit(X, y)} if self.nested else {}
        return self

    def predict(self, X):
        return np.tile(self.mean_, (len(X), 1))

    def _export(self):
        return {"n": 1}, {"mean": self.mean_}, {"note": "plain text"}, self.children_

    def _restore(self, meta, arrays, texts, children):
        self.mean_, self.children_, self.note_ = arrays["mean"], children, texts["note"]


@pytest.fixture
def state() -> HeadState:
    return ConstantHead(nested=True).fit(np.zeros((4, 2)), np.arange(8.0).reshape(4, 2)).get_state()


def test_flatten_unflatten_nested_state(state):
    spec, arrays, texts = flatten_state(state)
    assert sorted(arrays) == ["inner/mean", "mean"] and sorted(texts) == ["inner/note", "note"]
    json.dumps(spec)  # the spec goes into config.json
    back = unflatten_state(spec, arrays, texts)
    head = Head.from_state(back)
    np.testing.assert_array_equal(head.mean_, [3.0, 4.0])
    np.testing.assert_array_equal(head.children_["inner"].mean_, [4.0, 5.0])


def _save(tmp_path, state, name="model"):
    spec, arrays, texts = flatten_state(state)
    return write_model_dir(tmp_path / name, {"library": "virtualst", "head": spec}, {"head.safetensors": arrays}, texts, "# card\n")


def test_write_then_read_verifies_and_round_trips(tmp_path, state):
    folder = _save(tmp_path, state)
    config, arrays, texts = read_model_dir(folder)
    assert set(config["artefacts"]) == {"head.safetensors", "texts/note.txt", "texts/inner/note.txt"}
    assert (folder / "README.md").read_text() == "# card\n"
    head = Head.from_state(unflatten_state(config["head"], arrays_of(arrays, "head"), texts))
    np.testing.assert_array_equal(head.predict(np.zeros((2, 1))), [[3.0, 4.0]] * 2)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind


def test_tampered_artefact_is_refused(tmp_path, state):
    folder = _save(tmp_path, state)
    (folder / "texts" / "note.txt").write_text("changed")
    with pytest.raises(InputError, match=r"note.txt: checksum mismatch"):
        read_model_dir(folder)


@pytest.mark.parametrize("name", ["model.pkl", "weights.bin", "extra.npy", "sub/thing.joblib"])
def test_pickle_capable_files_are_refused(tmp_path, state, name):
    folder = _save(tmp_path, state)
    (folder / name).parent.mkdir(exist_ok=True)
    (folder / name).write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(InputError, match="refusing to load a model holding pickle-capable files"):
        read_model_dir(folder)


def test_unlisted_missing_and_foreign_files(tmp_path, state):
    folder = _save(tmp_path, state)
    (folder / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="extra.safetensors: file not listed"):
        read_model_dir(folder)
    (folder / "extra.safetensors").unlink()
    (folder / "head.safetensors").unlink()
    with pytest.raises(InputError, match="head.safetensors: listed in config.json but missing"):
        read_model_dir(folder)
    with pytest.raises(InputError, match="not a virtualst model: no config.json"):
        read_model_dir(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(InputError, match="unsupported format_version 99"):
        read_model_dir(folder)


def test_output_directory_rules(tmp_path, state):
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="is not a virtualst model directory"):
        _save(tmp_path, state, "other")
    assert (other / "data.csv").exists()
    first = _save(tmp_path, state)
    (first / "texts" / "stale.txt").write_text("old")
    second = _save(tmp_path, state)  # a model directory is replaced as a whole
    assert not (second / "texts" / "stale.txt").exists()
    read_model_dir(second)


def test_interrupted_write_leaves_nothing(tmp_path, state, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(persistence, "sha256_of", boom)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, state)
    assert list(tmp_path.iterdir()) == []
