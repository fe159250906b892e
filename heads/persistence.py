"""Saved models as plain files: JSON, safetensors and text — never pickle.

A model directory (which is also a Hub repository) holds::

    config.json           everything needed to rebuild the predictor, and the
                          sha256 of every other artefact under "artefacts"
    *.safetensors         arrays (head coefficients, PCA, kNN references...)
    texts/**.txt          text artefacts (LightGBM native models)
    README.md             the model card

Loading verifies every checksum before parsing anything, refuses
directories holding files that could execute code when loaded (pickles,
torch ``.bin``/``.pt``...), and never imports or evaluates what it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from virtualst.errors import InputError
from virtualst.heads.base import HeadState

CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1

#: Suffixes whose loaders can run arbitrary code; a model directory holding one is refused.
UNSAFE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib", ".pt", ".pth", ".bin", ".ckpt", ".npy", ".npz", ".dill", ".cloudpickle"})
#: Files that may sit in a model directory without a checksum (Hub bookkeeping, the card).
UNCHECKED = frozenset({CONFIG_NAME, CARD_NAME, ".gitattributes"})


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ head states
def flatten_state(state: HeadState, prefix: str = "") -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """Split a (nested) :class:`HeadState` into a JSON spec, arrays and texts.

    Array and text names of children are prefixed with ``"{child}/"`` so one
    safetensors file and one text folder hold a whole ensemble.
    """
    spec: dict[str, Any] = {
        "kind": state.kind,
        "params": state.params,
        "meta": state.meta,
        "arrays": sorted(f"{prefix}{k}" for k in state.arrays),
        "texts": sorted(f"{prefix}{k}" for k in state.texts),
        "children": {},
    }
    arrays = {f"{prefix}{k}": v for k, v in state.arrays.items()}
    texts = {f"{prefix}{k}": v for k, v in state.texts.items()}
    for name, child in state.children.items():
        child_spec, child_arrays, child_texts = flatten_state(child, f"{prefix}{name}/")
        spec["children"][name] = child_spec
        arrays.update(child_arrays)
        texts.update(child_texts)
    return spec, arrays, texts


def unflatten_state(spec: dict[str, Any], arrays: dict[str, np.ndarray], texts: dict[str, str], prefix: str = "") -> HeadState:
    """Inverse of :func:`flatten_state`."""
    own_arrays = {name[len(prefix) :]: arrays[name] for name in spec["arrays"]}
    own_texts = {name[len(prefix) :]: texts[name] for name in spec["texts"]}
    children = {
        name: unflatten_state(child, arrays, texts, f"{prefix}{name}/") for name, child in spec.get("children", {}).items()
    }
    return HeadState(spec["kind"], spec["params"], spec.get("meta", {}), own_arrays, own_texts, children)


# ------------------------------------------------------------------------- write
def _text_file(name: str) -> str:
    return f"texts/{name}.txt"


def write_model_dir(
    out_dir: str | Path,
    config: dict[str, Any],
    arrays: dict[str, dict[str, np.ndarray]],
    texts: dict[str, str],
    card: str,
) -> Path:
    """Write a model directory atomically; returns its path.

    Parameters
    ----------
    out_dir
        Destination; replaced if it already holds a model (``config.json``),
        refused if it is a non-empty directory of something else.
    config
        JSON-able configuration; ``format_version`` and ``artefacts``
        (file -> sha256) are added.
    arrays
        Safetensors file name -> named arrays.
    texts
        Text artefact name -> content (stored under ``texts/``).
    card
        Model card markdown.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_NAME).is_file())):
        raise InputError(out, "exists and is not a virtualst model directory; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for file_name, named in arrays.items():
            if named:
                save_file({k: np.ascontiguousarray(v) for k, v in named.items()}, str(tmp / file_name))
        for name, text in texts.items():
            path = tmp / _text_file(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        artefacts = {
            p.relative_to(tmp).as_posix(): sha256_of(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        full = {"format_version": FORMAT_VERSION, **config, "artefacts": artefacts}
        (tmp / CONFIG_NAME).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
        (tmp / CARD_NAME).write_text(card)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -------------------------------------------------------------------------- read
def read_model_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """Verify and read a model directory.

    Returns ``(config, arrays, texts)`` where ``arrays`` merges every
    safetensors file (names prefixed by the file stem and ``:``) and
    ``texts`` maps text artefact names to their content.

    Raises
    ------
    InputError
        Missing config, pickle-bearing files, missing, unlisted or tampered
        artefacts.
    """
    from safetensors.numpy import load_file

    root = Path(path)
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise InputError(root, f"not a virtualst model: no {CONFIG_NAME}")
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts}
    unsafe = sorted(name for name in files if Path(name).suffix.lower() in UNSAFE_SUFFIXES)
    if unsafe:
        raise InputError(root / unsafe[0], "refusing to load a model holding pickle-capable files (virtualst never pickles)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise InputError(config_path, f"not valid JSON ({exc})") from None
    if config.get("format_version") != FORMAT_VERSION:
        raise InputError(config_path, f"unsupported format_version {config.get('format_version')!r} (expected {FORMAT_VERSION})")
    artefacts: dict[str, str] = config.get("artefacts", {})
    for name, expected in artefacts.items():
        if name not in files:
            raise InputError(root / name, "listed in config.json but missing")
        if sha256_of(files[name]) != expected:
            raise InputError(root / name, "checksum mismatch: the file was modified after saving; refusing to load")
    unlisted = sorted(set(files) - set(artefacts) - UNCHECKED)
    if unlisted:
        raise InputError(root / unlisted[0], "file not listed in config.json artefacts; refusing to load")
    arrays: dict[str, np.ndarray] = {}
    texts: dict[str, str] = {}
    for name in artefacts:
        if name.endswith(".safetensors"):
            stem = name[: -len(".safetensors")]
            arrays.update({f"{stem}:{k}": v for k, v in load_file(str(files[name])).items()})
        elif name.startswith("texts/") and name.endswith(".txt"):
            texts[name[len("texts/") : -len(".txt")]] = files[name].read_text()
    return config, arrays, texts


def arrays_of(arrays: dict[str, np.ndarray], file_stem: str) -> dict[str, np.ndarray]:
    """The arrays that came from ``{file_stem}.safetensors``, with their own names."""
    head = f"{file_stem}:"
    return {k[len(head) :]: v for k, v in arrays.items() if k.startswith(head)}
