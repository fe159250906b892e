"""Train/test folds over sample ids, with patients kept on one side.

Schemes (a registry, named in task files as ``scheme`` or ``scheme:k``):

``official``
    HEST-Benchmark split files ``{split_dir}/train_{k}.csv`` and
    ``test_{k}.csv`` (column ``sample_id``; HEST's files also carry
    ``patches_path`` and ``expr_path``), one fold per ``k``.
``leave-one-patient-out``
    One fold per patient: all its samples are the test set.
``patient-kfold:K``
    ``K`` folds of whole patients, balanced by **sample counts**: patients
    are taken in decreasing number of samples (ties by patient id) and each
    joins the fold with the fewest samples so far (ties: lowest index).
    Sample counts rather than spot counts so folds are known from ids alone,
    before anything is read or embedded; the result is deterministic.
``leave-one-sample-out``
    One fold per sample. A test patient with other samples keeps them in
    training: such folds say ``patient_disjoint=False``, and the scheme name
    says it is not a patient split. It is the only scheme for a single patient.

Unknown patients (``None``) stand for themselves: each such sample is its own
patient, and the folds say ``patients_known=False``.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from virtualst.errors import InputError, VirtualSTError

#: Columns of HEST-Benchmark split files (only ``sample_id`` is required here).
SPLIT_COLUMNS = ("sample_id", "patches_path", "expr_path")
_SPLIT_FILE = re.compile(r"^(train|test)_(\d+)\.csv$")
_UNKNOWN = "\0"


class SplitError(VirtualSTError, ValueError):
    """A split cannot be made from these samples (not tied to one file)."""


@dataclass(frozen=True)
class Fold:
    """One train/test partition of sample ids.

    Parameters
    ----------
    name
        Unique within a task's folds (e.g. ``"test-patient-C"``, ``"official-0"``).
    train, test
        Sample ids.
    patient_disjoint
        No patient has samples on both sides.
    patients_known
        False when some patient ids were unknown and each such sample was
        taken as its own patient: ``patient_disjoint`` then rests on that
        assumption.
    """

    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    patient_disjoint: bool
    patients_known: bool = True


@dataclass(frozen=True)
class SplitScheme:
    """A registered way of making folds."""

    name: str
    make: Callable[..., list[Fold]]
    takes_k: bool
    description: str


#: name -> scheme; see :func:`register_scheme`.
SCHEMES: dict[str, SplitScheme] = {}


def register_scheme(name: str, *, takes_k: bool = False, description: str = "") -> Callable:
    """Decorator adding ``make(sample_ids, patients, **options) -> list[Fold]`` to :data:`SCHEMES`."""

    def add(make: Callable[..., list[Fold]]) -> Callable[..., list[Fold]]:
        if name in SCHEMES:
            raise ValueError(f"a split scheme named {name!r} is already registered")
        SCHEMES[name] = SplitScheme(name, make, takes_k, description or (make.__doc__ or "").strip().splitlines()[0])
        return make

    return add


@dataclass(frozen=True)
class SplitSpec:
    """A scheme name and its fold count: ``"leave-one-patient-out"``, ``"patient-kfold:5"``.

    Parameters
    ----------
    scheme
        A key of :data:`SCHEMES`.
    k
        Fold count, for schemes that take one (``patient-kfold``).
    """

    scheme: str
    k: int | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise SplitError(f"unknown split scheme {self.scheme!r}; known: {', '.join(SCHEMES)}")
        takes_k = SCHEMES[self.scheme].takes_k
        if takes_k and (self.k is None or int(self.k) != self.k or self.k < 2):
            raise SplitError(f"split {self.scheme!r} needs a fold count k >= 2 (e.g. {self.scheme}:5), got {self.k}")
        if not takes_k and self.k is not None:
            raise SplitError(f"split {self.scheme!r} takes no fold count, got {self.scheme}:{self.k}")

    @classmethod
    def parse(cls, text: str | SplitSpec) -> SplitSpec:
        """``"scheme"`` or ``"scheme:k"``."""
        if isinstance(text, SplitSpec):
            return text
        scheme, sep, k = str(text).strip().partition(":")
        if sep and not k.strip().isdigit():
            raise SplitError(f"split {text!r}: expected scheme:K with K a whole number")
        return cls(scheme.strip(), int(k) if sep else None)

    def __str__(self) -> str:
        return self.scheme if self.k is None else f"{self.scheme}:{self.k}"


# ------------------------------------------------------------------------ helpers
def _patient_table(sample_ids: Sequence[str], patients: Sequence[str | None]) -> tuple[list[str], list[str], bool]:
    """Ids as str, patient keys (unknown ones made unique per sample) and whether all patients were known."""
    ids = [str(s) for s in sample_ids]
    if len(ids) != len(patients):
        raise SplitError(f"{len(ids)} sample ids but {len(patients)} patient ids")
    duplicated = sorted(s for s, n in Counter(ids).items() if n > 1)
    if duplicated:
        raise SplitError(f"duplicate sample id(s): {', '.join(duplicated)}")
    if not ids:
        raise SplitError("no samples to split")
    known = all(p is not None for p in patients)
    # An unknown patient stands for itself; the NUL prefix keeps it apart from any real patient id.
    resolved = [str(p) if p is not None else _UNKNOWN + s for s, p in zip(ids, patients)]
    return ids, resolved, known


def _test_name(patient: str) -> str:
    return f"test-sample-{patient[1:]}" if patient.startswith(_UNKNOWN) else f"test-patient-{patient}"


def _fold(name: str, ids: list[str], patients: list[str], test: set[str], known: bool, train: set[str] | None = None) -> Fold:
    """Fold with ``test`` held out and ``train`` (default: every other sample) to fit on, in ``ids`` order."""
    train_ids = tuple(s for s in ids if s not in test and (train is None or s in train))
    test_ids = tuple(s for s in ids if s in test)
    by_id = dict(zip(ids, patients))
    disjoint = not ({by_id[s] for s in train_ids} & {by_id[s] for s in test_ids})
    return Fold(name, train_ids, test_ids, disjoint, known)


def _patients_in_order(patients: list[str]) -> list[str]:
    return list(dict.fromkeys(patients))


# ------------------------------------------------------------------------ schemes
@register_scheme("leave-one-patient-out")
def leave_one_patient_out(sample_ids: Sequence[str], patients: Sequence[str | None]) -> list[Fold]:
    """One fold per patient, whose samples are all held out."""
    ids, resolved, known = _patient_table(sample_ids, patients)
    order = _patients_in_order(resolved)
    if len(order) < 2:
        raise SplitError(
            f"leave-one-patient-out needs at least 2 patients, all {len(ids)} samples come from {order[0]!r} "
            "(use leave-one-sample-out, which is not patient-disjoint)"
        )
    return [
        _fold(_test_name(p), ids, resolved, {s for s, q in zip(ids, resolved) if q == p}, known) for p in order
    ]


@register_scheme("patient-kfold", takes_k=True)
def patient_kfold(sample_ids: Sequence[str], patients: Sequence[str | None], *, k: int) -> list[Fold]:
    """K folds of whole patients, balanced by sample counts (deterministic)."""
    ids, resolved, known = _patient_table(sample_ids, patients)
    order = _patients_in_order(resolved)
    if k > len(order):
        raise SplitError(f"patient-kfold:{k} needs at least {k} patients, found {len(order)}")
    members = {p: [s for s, q in zip(ids, resolved) if q == p] for p in order}
    folds: list[set[str]] = [set() for _ in range(k)]
    for p in sorted(order, key=lambda p: (-len(members[p]), p)):
        smallest = min(range(k), key=lambda i: (len(folds[i]), i))
        folds[smallest].update(members[p])
    return [_fold(f"fold-{i}", ids, resolved, test, known) for i, test in enumerate(folds)]


@register_scheme("leave-one-sample-out")
def leave_one_sample_out(sample_ids: Sequence[str], patients: Sequence[str | None]) -> list[Fold]:
    """One fold per sample; not patient-disjoint when a patient has several samples."""
    ids, resolved, known = _patient_table(sample_ids, patients)
    if len(ids) < 2:
        raise SplitError(f"leave-one-sample-out needs at least 2 samples, found {len(ids)}")
    return [_fold(f"test-sample-{s}", ids, resolved, {s}, known) for s in ids]


def read_split_tables(split_dir: str | Path) -> list[tuple[int, pd.DataFrame, pd.DataFrame, Path, Path]]:
    """Read HEST-Benchmark ``train_{k}.csv``/``test_{k}.csv`` pairs, ordered by ``k``.

    Returns
    -------
    list of (k, train table, test table, train path, test path)

    Raises
    ------
    InputError
        When the folder is missing or empty, a file lacks its pair or the
        ``sample_id`` column, or a fold has an empty test set.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise InputError(split_dir, "split folder not found (expected train_{k}.csv and test_{k}.csv files)")
    found: dict[int, dict[str, Path]] = {}
    for path in split_dir.iterdir():
        match = _SPLIT_FILE.match(path.name)
        if match:
            found.setdefault(int(match.group(2)), {})[match.group(1)] = path
    if not found:
        raise InputError(split_dir, "no train_{k}.csv / test_{k}.csv split files")
    tables = []
    for k in sorted(found):
        for side in ("train", "test"):
            if side not in found[k]:
                raise InputError(split_dir, f"fold {k} has no {side}_{k}.csv")
        train, test = (_read_split_csv(found[k][side]) for side in ("train", "test"))
        tables.append((k, train, test, found[k]["train"], found[k]["test"]))
    return tables


def _read_split_csv(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read split CSV ({' '.join(str(exc).split())})") from None
    if "sample_id" not in table.columns:
        raise InputError(path, f"no 'sample_id' column (found: {', '.join(map(str, table.columns))})")
    if table["sample_id"].duplicated().any():
        raise InputError(path, f"sample {table['sample_id'][table['sample_id'].duplicated()].iloc[0]!r} is listed twice")
    if path.name.startswith("test") and table.empty:
        raise InputError(path, "the test set is empty")
    return table


@register_scheme("official")
def official(sample_ids: Sequence[str], patients: Sequence[str | None], *, split_dir: str | Path | None = None) -> list[Fold]:
    """HEST-Benchmark split files, one fold per train_{k}/test_{k} pair."""
    if split_dir is None:
        raise SplitError("the official split needs the folder of its split files (split_dir)")
    ids, resolved, known = _patient_table(sample_ids, patients)
    known_ids = set(ids)
    folds = []
    for k, train, test, train_path, test_path in read_split_tables(split_dir):
        for table, path in ((train, train_path), (test, test_path)):
            unknown = [s for s in table["sample_id"] if s not in known_ids]
            if unknown:
                raise InputError(path, f"names {len(unknown)} unknown sample(s): {', '.join(unknown[:5])}")
        both = set(train["sample_id"]) & set(test["sample_id"])
        if both:
            raise InputError(test_path, f"sample(s) {', '.join(sorted(both))} are also in {train_path.name}")
        # Samples in neither file stay out of the fold, as in HEST.
        folds.append(_fold(f"official-{k}", ids, resolved, set(test["sample_id"]), known, train=set(train["sample_id"])))
    return folds


# ------------------------------------------------------------------------ entry point
def make_folds(
    spec: str | SplitSpec, sample_ids: Sequence[str], patients: Sequence[str | None], **options
) -> list[Fold]:
    """Folds of ``sample_ids`` under ``spec``.

    Parameters
    ----------
    spec
        ``"leave-one-patient-out"``, ``"patient-kfold:5"``, ``"official"``... or a :class:`SplitSpec`.
    sample_ids
        Unique sample ids.
    patients
        Patient id of each sample; ``None`` where unknown (the sample is then its own patient).
    **options
        Scheme options, e.g. ``split_dir`` for ``official``; options a scheme
        does not take are ignored, so callers may pass all they know.

    Raises
    ------
    SplitError
        Unknown scheme, too few patients, duplicate ids.
    InputError
        Unusable split files.
    """
    spec = SplitSpec.parse(spec)
    scheme = SCHEMES[spec.scheme]
    if scheme.takes_k:
        options["k"] = spec.k
    accepted = inspect.signature(scheme.make).parameters
    return scheme.make(sample_ids, patients, **{k: v for k, v in options.items() if k in accepted})


def list_schemes() -> dict[str, str]:
    """Registered scheme names and one-line descriptions."""
    return {name: scheme.description for name, scheme in SCHEMES.items()}
