"""Find weight files (Hub cache, local path, Python package) and read them safely.

Every failure becomes one :class:`~virtualst.errors.EncoderError` line; pickles
are only read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtualst.errors import EncoderError, MissingDependencyError

#: Candidate weight files, preferred first (safetensors never runs code).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TRUTHY = {"1", "on", "yes", "true"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class ResolvedWeights:
    """Weight files found for one encoder.

    Attributes
    ----------
    source
        What was asked for (``hf-hub:org/name``, a path, ``package:module``).
    files
        The weight file(s) to read, shards in order.
    config_path
        A ``config.json`` next to them, when there is one.
    revision
        The Hub commit the files come from (``None`` off the Hub).
    """

    source: str
    files: list[Path]
    config_path: Path | None = None
    revision: str | None = None
    sha256: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self.sha256 = _combined_sha256(self.files)

    @property
    def directory(self) -> Path:
        """Folder holding the (first) weight file."""
        return self.files[0].parent

    def read_config(self) -> dict[str, Any] | None:
        """The parsed ``config.json``, or ``None`` when absent."""
        if self.config_path is None:
            return None
        return read_json(self.config_path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{path}: not a readable JSON file ({exc})") from None


def sha256_file(path: Path) -> str:
    """SHA-256 of a file; Hub LFS blobs are already named by it, so reuse that name."""
    real = Path(path).resolve()
    if _SHA256.fullmatch(real.name) and real.parent.name == "blobs":
        return real.name
    digest = hashlib.sha256()
    with open(real, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _combined_sha256(files: list[Path]) -> str:
    # One file: its own hash. Shards: hash of their hashes, in order.
    hashes = [sha256_file(f) for f in files]
    if len(hashes) == 1:
        return hashes[0]
    return hashlib.sha256("".join(hashes).encode()).hexdigest()


# --------------------------------------------------------------------------- local


def from_path(path: str | Path, *, name: str) -> ResolvedWeights:
    """Weights from a local file or a directory holding one of :data:`WEIGHT_FILES`."""
    path = Path(path).expanduser()
    if path.is_file():
        config = path.parent / "config.json"
        if path.name.endswith(".index.json"):
            return ResolvedWeights(str(path), _local_shards(path), config if config.is_file() else None)
        return ResolvedWeights(str(path), [path], config if config.is_file() else None)
    if not path.is_dir():
        raise EncoderError(f"{name}: weights path {path} does not exist")
    for candidate in WEIGHT_FILES:
        file = path / candidate
        if file.is_file():
            files = _local_shards(file) if candidate.endswith(".index.json") else [file]
            config = path / "config.json"
            return ResolvedWeights(str(path), files, config if config.is_file() else None)
    raise EncoderError(f"{name}: {path} holds none of {', '.join(WEIGHT_FILES)}")


def _shard_names(index: Path) -> list[str]:
    weight_map = read_json(index).get("weight_map", {})
    return sorted(set(weight_map.values()))


def _local_shards(index: Path) -> list[Path]:
    files = [index.parent / n for n in _shard_names(index)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise EncoderError(f"{index}: shard(s) missing: {', '.join(missing)}")
    return files


def from_package(module: str, *, name: str) -> ResolvedWeights:
    """Weights shipped inside a Python package (exposing ``*.get_model_file_path()``)."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(module.replace("_", "-"), purpose=f"the {name} weights") from None
    # The package exposes a class with a get_model_file_path() static method.
    getters = [getattr(mod, a).get_model_file_path for a in dir(mod) if hasattr(getattr(mod, a), "get_model_file_path")]
    if not getters:
        raise EncoderError(f"{name}: package {module} exposes no get_model_file_path()")
    path = Path(getters[0]())
    if not path.is_file():
        raise EncoderError(f"{name}: package {module} points at a missing file {path}")
    return ResolvedWeights(f"package:{module}", [path])


# --------------------------------------------------------------------------- Hub


def _hub_settings() -> tuple[str | None, bool]:
    """Cache dir and offline flag read from the environment *now*.

    huggingface_hub freezes its constants at import; reading the variables at
    call time lets a process (or a test) point ``HF_HUB_CACHE``/``HF_HOME``
    elsewhere or set ``HF_HUB_OFFLINE=1`` after import.
    """
    from huggingface_hub import constants

    cache = os.environ.get("HF_HUB_CACHE")
    if not cache and os.environ.get("HF_HOME"):
        cache = str(Path(os.environ["HF_HOME"]) / "hub")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY or bool(constants.HF_HUB_OFFLINE)
    return cache, offline


def _hub_message(name: str, repo: str, gated: bool, reason: str) -> str:
    url = f"https://huggingface.co/{repo}"
    where = f"{name}: weights for hf-hub:{repo}"
    if reason == "missing":
        if gated:
            return (
                f"{where} are gated and not in the local HF cache — run `hf auth login`, "
                f"accept the licence at {url}, or pass --weights /path/to/dir"
            )
        return (
            f"{where} are not in the local HF cache and the Hub cannot be reached "
            f"(offline) — download them once with network access, or pass --weights /path/to/dir"
        )
    if reason == "gated":
        return f"{where} are gated and access was refused — run `hf auth login`, accept the licence at {url}, or pass --weights /path/to/dir"
    if reason == "no-repo":
        return f"{where}: repository not found (or private) — check the name, run `hf auth login`, or pass --weights /path/to/dir"
    return f"{where}: {reason}"


def from_hub(
    repo: str, *, name: str, revision: str | None = None, gated: bool = False, need_weights: bool = True
) -> ResolvedWeights | Path | None:
    """Fetch (or find in the HF cache) ``config.json`` and the weights of a Hub repo.

    Parameters
    ----------
    repo
        ``org/name``.
    name
        Encoder name, first word of every error message.
    revision
        Branch, tag or commit; ``None`` is ``main``.
    gated
        Whether the repo needs an accepted licence (changes the hint only).
    need_weights
        ``False`` fetches only ``config.json`` and returns its path (or ``None``).

    Returns
    -------
    ResolvedWeights, or the config path when ``need_weights`` is false.
    """
    from huggingface_hub import errors, hf_hub_download

    cache_dir, offline = _hub_settings()

    state = {"offline": offline}

    def fetch(filename: str) -> Path | None:
        try:
            return Path(
                hf_hub_download(
                    repo, filename, revision=revision, cache_dir=cache_dir, local_files_only=state["offline"]
                )
            )
        except errors.GatedRepoError:
            raise EncoderError(_hub_message(name, repo, gated, "gated")) from None
        except errors.RevisionNotFoundError:
            raise EncoderError(_hub_message(name, repo, gated, f"revision {revision!r} not found")) from None
        except errors.RepositoryNotFoundError:
            raise EncoderError(_hub_message(name, repo, gated, "no-repo")) from None
        except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
            # Hub unreachable and file not cached: look only in the cache from now
            # on, instead of paying the download retries once per candidate file.
            state["offline"] = True
            return None
        except errors.EntryNotFoundError:
            return None  # not in this repo: try the next candidate
        except (errors.HfHubHTTPError, OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EncoderError(_hub_message(name, repo, gated, f"download failed ({first})")) from None

    config = fetch("config.json")
    if not need_weights:
        if config is None:
            message = _hub_message(name, repo, gated, "missing")
            raise EncoderError(message.replace("weights", "config.json", 1).replace(" are ", " is ", 1))
        return config
    for candidate in WEIGHT_FILES:
        file = fetch(candidate)
        if file is None:
            continue
        files = [file]
        if candidate.endswith(".index.json"):
            files = [fetch(shard) for shard in _shard_names(file)]
            if any(f is None for f in files):
                raise EncoderError(_hub_message(name, repo, gated, "missing"))
        snapshot = file.parent.name if file.parent.parent.name == "snapshots" else None
        return ResolvedWeights(f"hf-hub:{repo}", files, config, revision=snapshot or revision)
    if state["offline"] or config is None:
        raise EncoderError(_hub_message(name, repo, gated, "missing"))
    raise EncoderError(_hub_message(name, repo, gated, f"repository has none of {', '.join(WEIGHT_FILES)}"))


def timm_hub_repo(tag: str) -> str:
    """Hub repo of a timm pretrained tag (``resnet50.tv_in1k`` → ``timm/resnet50.tv_in1k``)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(tag)
    return (getattr(cfg, "hf_hub_id", None) if cfg else None) or f"timm/{tag}"


# --------------------------------------------------------------------------- reading


def read_state_dict(weights: ResolvedWeights, *, name: str) -> dict[str, Any]:
    """Merge all weight files into one tensor dict, never executing pickled code."""
    import torch
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for file in weights.files:
        try:
            if file.suffix == ".safetensors":
                part = load_file(str(file), device="cpu")
            else:
                part = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt file or a pickle that is not plain tensors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EncoderError(f"{name}: cannot read weights {file}: {first}") from None
        # Training checkpoints often nest the tensors one level down.
        for key in ("state_dict", "model"):
            if isinstance(part.get(key), dict) and not any(isinstance(v, torch.Tensor) for v in part.values()):
                part = part[key]
        state.update(part)
    return state
