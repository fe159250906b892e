"""virtualst: virtual spatial transcriptomics from H&E slides.

Public API
----------
read
    Read a sample (legacy ST, 10x Visium, HEST-1k, AnnData) into a :class:`Sample`.
read_all
    Read every sample found at a path (e.g. all sections of a her2st directory).
Sample
    The in-memory section shared by every stage.
"""

from typing import Any

from virtualst._version import __version__
from virtualst.errors import InputError, VirtualSTError
from virtualst.sample import Sample

__all__ = ["InputError", "Sample", "VirtualSTError", "__version__", "read", "read_all"]


def __getattr__(name: str) -> Any:
    # The readers live in the embed stage, which imports Sample from here: resolve lazily.
    if name in ("read", "read_all"):
        from virtualst.embed import readers

        return getattr(readers, name)
    raise AttributeError(f"module 'virtualst' has no attribute {name!r}")
