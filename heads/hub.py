"""Model directories on the Hugging Face Hub: resolve (download or cache) and push."""

from __future__ import annotations

from pathlib import Path

from virtualst._version import __version__
from virtualst.errors import InputError

#: Files a model repository may contain; anything else is never downloaded.
ALLOW_PATTERNS = ["config.json", "README.md", "*.safetensors", "texts/**.txt", "texts/*.txt"]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()


def resolve_model_dir(dir_or_repo_id: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local folder holding the model's files.

    A directory is used as is; ``org/name`` is fetched through
    :func:`huggingface_hub.snapshot_download` (which serves it from the local
    HF cache when offline). Only safetensors, text models, the config and the
    card are fetched, so a pickle in a repository never reaches the disk.
    """
    from huggingface_hub import errors, snapshot_download

    name = str(dir_or_repo_id)
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if _looks_like_path(name):
        raise InputError(name, "no such model directory (and not an org/name Hub repository id)")
    try:
        folder = snapshot_download(
            repo_id=name,
            revision=revision,
            token=token,
            allow_patterns=ALLOW_PATTERNS,
            library_name="virtualst",
            library_version=__version__,
        )
    except errors.GatedRepoError:
        raise InputError(name, "the repository is gated: accept its terms on huggingface.co and `hf auth login`") from None
    except errors.RevisionNotFoundError:
        raise InputError(name, f"revision {revision!r} not found on the Hub") from None
    except errors.RepositoryNotFoundError:
        raise InputError(name, "no such Hub repository (or it is private: log in with `hf auth login`)") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        raise InputError(name, "not in the local HF cache and the Hub is unreachable (offline); pass a local directory") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(name, f"download failed ({first})") from None
    return Path(folder)


def push_model_dir(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a saved model directory to ``repo_id``; returns the commit URL.

    Creates the repository (and the ``revision`` branch) when missing. The
    folder is verified first (:func:`~virtualst.heads.persistence.read_model_dir`)
    so a tampered or pickle-bearing folder is never published.
    """
    from huggingface_hub import HfApi

    from virtualst.heads.persistence import read_model_dir

    folder = Path(folder)
    read_model_dir(folder)
    api = HfApi(token=token, library_name="virtualst", library_version=__version__)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or f"Upload virtualst model ({__version__})",
        allow_patterns=ALLOW_PATTERNS,
    )
    return str(getattr(info, "commit_url", info))
