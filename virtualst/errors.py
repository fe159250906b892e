"""Exceptions that the CLI turns into one-line messages and exit code 2."""

from __future__ import annotations

from pathlib import Path


class VirtualSTError(Exception):
    """Base class of every error that is the user's input, not a bug."""


class InputError(VirtualSTError, ValueError):
    """A file or directory given by the user cannot be used.

    Parameters
    ----------
    path
        The offending file or directory (named first in the message).
    problem
        What is wrong with it, in one short sentence.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):
        # Rebuild from the constructor's arguments when pickled (Ray, multiprocessing), not from the message.
        return type(self), (self.path, self.problem)


class EncoderError(VirtualSTError, ValueError):
    """An encoder is unknown, or its weights cannot be obtained."""


class MissingDependencyError(VirtualSTError, ImportError):
    """An optional dependency is needed; the message carries the install hint."""

    def __init__(self, package: str, extra: str | None = None, purpose: str = "") -> None:
        self.package, self.extra, self.purpose = package, extra, purpose
        hint = f"pip install 'virtualst[{extra}]'" if extra else f"pip install {package}"
        what = f" for {purpose}" if purpose else ""
        super().__init__(f"{package} is needed{what}: {hint}")

    def __reduce__(self):
        return type(self), (self.package, self.extra, self.purpose)
